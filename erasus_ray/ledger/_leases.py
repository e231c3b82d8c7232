"""Batch leases: which server drives a scheduled batch, until when (table ``batch_leases``).

Several servers on one ledger (PostgreSQL) each take a batch's lease before driving it and renew it between long
steps; an expired lease belongs to a server that crashed (or stalled past its lease) and is taken over, logged.
Leases compare wall clocks of different servers: keep ``lease_s`` well above their clock skew. The functions take a
connection so the facade can claim a lease inside a larger transaction (:meth:`DeletionLedger.schedule_pending`).
Cost: one row read and at most one row written per claim.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection

from erasus_ray.errors import InvalidConfigError
from erasus_ray.ledger._audit import iso
from erasus_ray.ledger._keys import advisory_key
from erasus_ray.ledger._schema import leases_table

logger = logging.getLogger("erasus_ray.ledger")


@dataclass(frozen=True)
class BatchLease:
    """Who drives a batch (``owner``, a server id) and until when (``expires_at``, seconds since the epoch)."""

    batch_id: str
    owner: str
    expires_at: float
    claimed_at: float

    def live(self, now: float | None = None) -> bool:
        return self.expires_at > (time.time() if now is None else now)


def check_lease_args(batch_id: str, owner: str, lease_s: float) -> None:
    """Raise :class:`InvalidConfigError` naming the argument unless the three fit the ``batch_leases`` columns."""
    if not isinstance(batch_id, str) or not batch_id or len(batch_id) > 64:
        raise InvalidConfigError(f"batch_id must be 1-64 characters, got {str(batch_id)[:80]!r}")
    if not isinstance(owner, str) or not owner or len(owner) > 256:
        raise InvalidConfigError(f"owner must be a server id of 1-256 characters, got {str(owner)[:80]!r}")
    if isinstance(lease_s, bool) or not isinstance(lease_s, (int, float)) or not math.isfinite(lease_s) or lease_s <= 0:
        raise InvalidConfigError(f"lease_s must be a positive number of seconds, got {lease_s!r}")


def claim(conn: Connection, batch_id: str, owner: str, lease_s: float, now: float | None, *, serialise: bool) -> bool:
    """Take or renew ``owner``'s lease inside ``conn``'s transaction; False while another owner's lease is live.

    ``serialise`` (PostgreSQL): take a transaction-scoped advisory lock on the batch first, so two servers inserting
    its first lease cannot both succeed (SQLite's ``BEGIN IMMEDIATE`` already serialises writers).
    """
    now = time.time() if now is None else float(now)
    if serialise:
        conn.execute(select(func.pg_advisory_xact_lock(advisory_key("batch:" + batch_id))))
    row = conn.execute(select(leases_table).where(leases_table.c.batch_id == batch_id).with_for_update()).first()
    if row is None:
        conn.execute(insert(leases_table).values(batch_id=batch_id, owner=owner, expires_at=now + lease_s, claimed_at=now))
        return True
    if row.owner != owner:
        if row.expires_at > now:
            return False
        logger.warning("batch %s: the lease of %r expired at %s; %r takes the batch over", batch_id, row.owner, iso(row.expires_at), owner)
    claimed_at = row.claimed_at if row.owner == owner else now
    conn.execute(
        update(leases_table).where(leases_table.c.batch_id == batch_id)
        .values(owner=owner, expires_at=now + lease_s, claimed_at=claimed_at)
    )
    return True


def release(conn: Connection, batch_id: str, owner: str) -> bool:
    """Delete ``owner``'s lease on the batch; False when ``owner`` did not hold it."""
    gone = conn.execute(
        leases_table.delete().where((leases_table.c.batch_id == batch_id) & (leases_table.c.owner == owner))
    ).rowcount
    return bool(gone)


def read(conn: Connection, batch_id: str) -> BatchLease | None:
    """The lease on a batch (live or expired), or None."""
    row = conn.execute(select(leases_table).where(leases_table.c.batch_id == batch_id)).first()
    return None if row is None else BatchLease(row.batch_id, row.owner, float(row.expires_at), float(row.claimed_at))
