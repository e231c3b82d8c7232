"""The durable deletion ledger: every deletion request, every state it passed through, and what was done for it.

States::

    received -> validated -> scheduled -> unlearned -> verified
         \\           \\           \\            \\
          rejected     rejected    failed       failed        (+ received/validated -> failed)

:meth:`DeletionLedger.submit` writes ``received`` and ``validated``/``rejected`` in one transaction, so a crash never
leaves a request stored but unjudged. ``scheduled -> scheduled`` (re-scheduled after a crash or a later round) and ``unlearned -> scheduled`` (verification
asked for another pass) are allowed; ``verified``, ``rejected`` and ``failed`` are final, except that
:meth:`DeletionLedger.reopen` moves ``verified -> validated`` (transition detail ``reopened``) when the model version
that served a deletion is rolled back. Each transition is one committed
row (from, to, timestamp, details) in the ``transitions`` table, written in the same transaction as the request's new
state, so the state always equals the last transition.

Idempotency is per submitter: the key is (``submitter``, client-supplied ``request_id``), where the submitter is the
authenticated ``sender`` that delivered the request (its Flower node's client) or, without one (the operator's
console, a local caller), ``@console/<the client the request names>`` (:func:`console_submitter`): a console
submission is an operator action (``actor`` ``console:<OS user>``) in a namespace of its own, never the client's. Resubmitting returns the stored entry, never a second one;
the same key with a different content is refused (``conflict``, a message that names no stored state). Two clients may
use the same client-supplied id: each gets its own request. The ledger's own key (``LedgerEntry.request_id``, what
:meth:`transition`, :meth:`get`, ... take) is the client-supplied id when that is free, else
``<id>#<16 hex of sha256(submitter)>`` (``#`` is not allowed in a client-supplied id, so the two never collide);
``LedgerEntry.client_request_id`` is always the id the client sent. The sender check (``impersonation``) runs before
the idempotent lookup: a client re-sending another client's request finds nothing of it - its copy is stored and
rejected in its own namespace, under a scoped key.

Crash safety: every write is one transaction (SQLite in WAL mode with ``synchronous=FULL`` by default, ``BEGIN
IMMEDIATE`` so a read-then-write cannot interleave with another writer). A restarted server calls :meth:`pending` and
resumes each unfinished request from its state. To unlearn a request exactly once, the server must make the model
update idempotent per request - the pattern the crash test exercises: the saved model checkpoint lists the request ids
it already contains; a resumed ``scheduled`` request whose id is in the checkpoint skips straight to
:meth:`record_result` (``new_state="unlearned"``).

Batches: :meth:`schedule_pending` moves every validated request (or a chosen set) to ``scheduled`` under one
``batch_id`` in one transaction - the requests one unlearning round serves together - and :meth:`record_results`
moves a whole batch on (``unlearned``, then ``verified``/``failed``) in one transaction, so a crash never leaves half
a batch recorded. The federated coordinator uses both (``erasus_ray/federated/coordinator.py``).

Storage: SQLAlchemy 2 Core; ``sqlite:///path.db`` (default, embedded), ``sqlite://`` (in memory, one process) or any
SQLAlchemy URL (e.g. ``postgresql+psycopg://...`` for several server nodes; rows are then locked with
``SELECT ... FOR UPDATE``, and the per-client rate limit is counted under a transaction-scoped advisory lock on the
client, ``pg_advisory_xact_lock``, so two servers cannot both take a client's last slot under READ COMMITTED).

Layout (as Optuna splits a storage): this module is the contract (:class:`DeletionLedger`) and the state machine
(:data:`ALLOWED`, :meth:`DeletionLedger.transition`); ``_schema.py`` holds the tables, the state vocabulary, the JSON
column codec, engine set-up and migrations; ``_keys.py`` the ledger-key, console-namespace and operator-key
derivations; ``_leases.py`` the batch leases; ``_audit.py`` the records and their export form.

Example:
    >>> ledger = DeletionLedger("sqlite:///deletions.db")
    >>> entry = ledger.submit(DeletionRequest("r-1", "alice", "sample", ids=[3, 17]), ownership=owners)
    >>> ledger.transition("r-1", "scheduled", round=4)
    >>> ledger.record_result("r-1", coreset_ids=[17], strategy="grad_diff", new_state="unlearned")
    >>> ledger.transition("r-1", "verified", forget_acc=0.0)
    >>> ledger.export("audit.json", hash_ids=True)

Cost: one transaction per call (a few ms on SQLite with fsync); :meth:`export` reads every row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import secrets
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from erasus_ray.errors import (
    IllegalTransitionError,
    InvalidConfigError,
    InvalidRequestError,
    UnauthorizedRequestError,
    UnknownRequestError,
)
from erasus_ray.ledger import _leases
from erasus_ray.ledger._audit import (
    LedgerEntry,
    Transition,
    audit_document,
    audit_records,
    row_to_entry,
    safe_payload,
    transition_from_row,
)
from erasus_ray.ledger._keys import (
    CONSOLE_PREFIX,
    MIN_OPERATOR_KEY_CHARS,
    OPERATOR_KEY_ENV,
    advisory_key,
    candidate_keys,
    console_submitter,
    console_user,
    hash_id_list,
    hash_operator_key,
    operator_key_matches,
    scoped_key,
    unparsed_key,
)
from erasus_ray.ledger._leases import BatchLease
from erasus_ray.ledger._schema import (
    DEFAULT_LEDGER_ENV,
    DEFAULT_LEDGER_FILE,
    FINAL_STATES,
    PENDING_STATES,
    SCHEMA_VERSION,
    STATES,
    default_ledger_url,
    dumps,
    json_safe,
    leases_table,
    loads,
    meta_table,
    normalise_url,
    open_engine,
    open_schema,
    requests_table,
    transitions_table,
)
from erasus_ray.ledger.requests import (
    NAME_PATTERN,
    DeletionRequest,
    OwnershipRegistry,
    RequestLimits,
    validate,
)
from erasus_ray.utils.atomic import atomic_write_text

#: re-exported: ``from erasus_ray.ledger.ledger import ...`` of every name this module held before the split keeps working
__all__ = [
    "ALLOWED", "CONSOLE_PREFIX", "DEFAULT_LEDGER_ENV", "DEFAULT_LEDGER_FILE", "FINAL_STATES", "MIN_OPERATOR_KEY_CHARS",
    "OPERATOR_KEY_ENV", "PENDING_STATES", "SCHEMA_VERSION", "STATES", "BatchLease", "DeletionLedger", "LedgerEntry",
    "Transition", "console_submitter", "console_user", "default_ledger_url", "hash_id_list", "leases_table",
    "meta_table", "requests_table", "scoped_key", "transitions_table",
]
logger = logging.getLogger("erasus_ray.ledger")

#: the state machine: from each state (None: not stored yet) the states a request may move to
ALLOWED: dict[str | None, frozenset[str]] = {
    None: frozenset({"received"}),
    "received": frozenset({"validated", "rejected", "failed"}),
    "validated": frozenset({"scheduled", "rejected", "failed"}),
    "scheduled": frozenset({"scheduled", "unlearned", "failed"}),
    "unlearned": frozenset({"verified", "scheduled", "failed"}),
    "verified": frozenset(),
    "rejected": frozenset(),
    "failed": frozenset(),
}
#: the one move out of a final state: :meth:`DeletionLedger.reopen` (the model version that served a verified deletion
#: was rolled back, so the deletion is owed again); a plain :meth:`~DeletionLedger.transition` never takes it
REOPEN = ("verified", "validated")


def _legal(current: str | None, new_state: str, reopen: bool) -> bool:
    return new_state in ALLOWED[current] or ((current, new_state) == REOPEN and reopen)


class DeletionLedger:
    """A durable record of deletion requests and their progress.

    Args:
        url: a SQLAlchemy URL (``sqlite:///path.db``, ``postgresql+psycopg://...``), a file path (SQLite), or None for
            an in-memory SQLite ledger (tests, one process).
        wal: SQLite only: use write-ahead logging (concurrent readers, one writer, crash-safe).
        synchronous: SQLite only: ``FULL`` (default; a committed transition survives power loss) or ``NORMAL``
            (survives a process crash, not a power loss; faster).
        busy_timeout_s: SQLite only: how long a writer waits for another writer's lock.
        operator_key: the operator credential this handle's console submissions present on a shared ledger
            (:meth:`set_operator_key`); ``submit(operator_key=...)`` overrides it per call.
    """

    def __init__(
        self,
        url: str | Path | None = None,
        *,
        wal: bool = True,
        synchronous: str = "FULL",
        busy_timeout_s: float = 30.0,
        echo: bool = False,
        operator_key: str | None = None,
    ) -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise InvalidConfigError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}")
        self.url = normalise_url(url)
        self.operator_key = operator_key
        self._verified_keys: set[tuple[str, str]] = set()  # (stored hash, key) pairs checked once per handle
        self.is_sqlite = self.url.startswith("sqlite")
        self.engine: Engine = open_engine(
            self.url, wal=wal, synchronous=synchronous.upper(), busy_timeout_s=busy_timeout_s, echo=echo
        )
        open_schema(self.engine)
        self.is_postgresql = self.engine.dialect.name == "postgresql"

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "DeletionLedger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DeletionLedger({self.engine.url.render_as_string(hide_password=True)!r})"

    # ---- the operator credential ----------------------------------------------------------------------------------
    @property
    def shared(self) -> bool:
        """Whether console submissions need the operator key: a server database (not a SQLite file), or any ledger
        an operator key was set on."""
        return not self.is_sqlite or self._stored_operator_key() is not None

    def set_operator_key(self, key: str, *, current: str | None = None) -> None:
        """Set (or, with the ``current`` key, change) the operator key; from then on console submissions
        (:meth:`submit` without ``sender``) must present it.

        Only a salted PBKDF2-SHA256 hash is stored (``ledger_meta``). Use a random secret of at least 16 characters
        (``python -c "import secrets; print(secrets.token_urlsafe(24))"``) and hand it to the console through
        ``$ERASUS_RAY_OPERATOR_KEY``. The key guards the ledger's API: whoever holds the database's own credentials can
        write rows directly, so guard those too. Cost: one PBKDF2 (100 000 rounds, ~0.1 s) here and once per handle
        that checks a key.
        """
        if not isinstance(key, str) or len(key) < MIN_OPERATOR_KEY_CHARS:
            raise InvalidConfigError(f"key: an operator key needs at least {MIN_OPERATOR_KEY_CHARS} characters")
        with self.engine.begin() as conn:
            stored = conn.execute(
                select(meta_table.c.value).where(meta_table.c.key == "operator_key").with_for_update()
            ).scalar_one_or_none()
            if stored is not None and (current is None or not operator_key_matches(current, stored)):
                raise UnauthorizedRequestError("this ledger already has an operator key: pass the current one to change it",
                                               code="operator_key")
            value = hash_operator_key(key, secrets.token_bytes(16))
            if stored is None:
                conn.execute(insert(meta_table).values(key="operator_key", value=value))
            else:
                conn.execute(update(meta_table).where(meta_table.c.key == "operator_key").values(value=value))

    def _stored_operator_key(self) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(meta_table.c.value).where(meta_table.c.key == "operator_key")).scalar_one_or_none()

    def _check_operator(self, key: str | None) -> None:
        """Raise :class:`UnauthorizedRequestError` ``operator_key`` unless a console submission may go ahead."""
        stored = self._stored_operator_key()
        if stored is None:
            if self.is_sqlite:
                return
            raise UnauthorizedRequestError(
                f"this ledger is shared ({self.engine.dialect.name}): console submissions need an operator key; set one "
                f"with `erasus-ray ledger set-operator-key` (DeletionLedger.set_operator_key)", code="operator_key",
            )
        key = self.operator_key if key is None else key
        if key is None:
            raise UnauthorizedRequestError(
                f"this ledger needs the operator key for console submissions: pass operator_key (CLI: ${OPERATOR_KEY_ENV})",
                code="operator_key",
            )
        token = (stored, hashlib.sha256(str(key).encode()).hexdigest())
        if token not in self._verified_keys:
            if not operator_key_matches(str(key), stored):
                raise UnauthorizedRequestError("wrong operator key", code="operator_key")
            self._verified_keys.add(token)

    # ---- writes ---------------------------------------------------------------------------------------------------
    def submit(
        self,
        request: DeletionRequest | Mapping[str, Any],
        ownership: OwnershipRegistry | None = None,
        limits: RequestLimits | None = None,
        *,
        now: float | None = None,
        sender: str | None = None,
        operator_key: str | None = None,
    ) -> LedgerEntry:
        """Record a request and validate it: returns its entry, ``validated`` or ``rejected`` (with ``state_reason``).

        Idempotent per submitter (module docstring): a ``request_id`` the same submitter already used returns the
        stored entry unchanged (no second row, no second validation, no rate-limit charge) - also when it was rejected:
        retry with a new ``request_id``. The same id with a different content raises :class:`InvalidRequestError`
        ``conflict`` and changes nothing. Another submitter's request under the same id is never looked at: the new
        request is stored on its own (under a scoped ledger key, ``LedgerEntry.request_id``), and nothing about the
        other one - its existence, state or content - reaches the caller.

        A submission that cannot be parsed (a dict with wrong fields or types) is stored as ``rejected`` with the
        parser's reason; without a usable ``request_id`` it is stored under ``invalid-<sha256 of the payload>``.
        The rejected entry is returned, not raised: the caller answers the client with ``entry.state_reason``.

        ``ownership`` / ``limits`` enable the ownership and size checks of :func:`validate`; without them only the
        fields are checked. ``sender``: the authenticated client that delivered it (a client id); a request in another
        client's name is then rejected (``impersonation``) in the same transaction, and ids that are not the
        client's own get one answer (``not_owner``) whether unknown or another client's (the rejected transition's
        details keep the split for the audit).

        Without ``sender`` the request comes from the operator's console: it is recorded as such - ``actor``
        ``console:<OS user>``, ``LedgerEntry.operator_action``, ``on_behalf_of`` the client it names on the
        ``received`` transition - in a namespace of its own (:func:`console_submitter`), so a console submission in a
        client's name (well-formed or not) never replays, conflicts with or squats that client's own request ids. On
        a shared ledger (not a SQLite file, or one with an operator key set: :meth:`set_operator_key`) a console
        submission must present the operator key (``operator_key``, else the handle's) or it raises
        :class:`UnauthorizedRequestError` ``operator_key`` and writes nothing.

        Rate limit (``limits.max_requests_per_minute``): counted from the ledger's own rows, not in memory - the
        client's requests *accepted* (not rejected) with ``received_at`` in the 60 s before ``now`` - inside the
        transaction that inserts the new one (SQLite ``BEGIN IMMEDIATE``: two writers cannot both take the last slot).
        So the window survives a server restart and is shared by every server process on the same ledger. Refused
        requests do not use up the budget (they change nothing); a request over the limit is ``rejected``
        (``rate_limited``). ``now``: the receive time, seconds since the epoch (default: the clock).
        """
        now_wall = time.time() if now is None else float(now)
        if sender is None:
            self._check_operator(operator_key)
        elif not isinstance(sender, str) or not NAME_PATTERN.fullmatch(sender):
            raise InvalidConfigError(f"sender must be the authenticated client's id, got {str(sender)[:60]!r}")
        parsed: DeletionRequest | None = None
        error: InvalidRequestError | None = None
        payload_text: str | None = None
        # an instance is re-checked too: its fields may have been changed after construction
        source: Any = request
        if isinstance(request, DeletionRequest):
            source = {k: getattr(request, k, None) for k in ("request_id", "client_id", "level", "ids", "label", "reason", "created_at")}
        try:
            parsed = DeletionRequest.from_dict(source)
        except InvalidRequestError as err:
            error = err
        except Exception as err:  # noqa: BLE001 - a hostile payload must not crash the server
            error = InvalidRequestError(f"cannot parse the request: {type(err).__name__}: {str(err)[:200]}")
        if error is not None:
            payload_text = safe_payload(source)
        if parsed is not None:
            rid = parsed.request_id
            fingerprint = parsed.fingerprint()
        else:
            assert error is not None
            rid, fingerprint = unparsed_key(error, source, payload_text)
        row = self._row_for(parsed, source, rid, fingerprint, payload_text, now_wall)
        claimed = row["client_id"]
        submitter = sender if sender is not None else console_submitter(claimed)
        # the sender check comes first: the idempotent lookup is in the submitter's own namespace only
        existing = self.find(rid, client_id=submitter)
        if existing is not None:
            return self._same_or_conflict(existing, fingerprint)
        size_limits = None if limits is None else dataclasses.replace(limits, max_requests_per_minute=None)
        if parsed is not None:
            try:
                validate(parsed, ownership, size_limits, sender=sender)
            except InvalidRequestError as err:
                error = err
        impersonating = sender is not None and submitter != claimed and not (ownership is not None and submitter in ownership.operators)
        row.update(
            client_request_id=rid, submitter=submitter, actor=f"node:{sender}" if sender is not None else f"console:{console_user()}"
        )
        keys = candidate_keys(rid, submitter, impersonating=impersonating)
        for attempt, key in enumerate(keys):
            if attempt == 0 and len(keys) == 2 and self.find(key) is not None:
                continue  # another submitter holds the plain key
            try:
                final_error = self._insert_submission(key, row, error, parsed, limits, now_wall, now)
            except IntegrityError:
                # a concurrent submit won: the same submitter's resubmission, or another submitter took the plain key
                stored = self.find(rid, client_id=submitter)
                if stored is not None:
                    return self._same_or_conflict(stored, fingerprint)
                if key is keys[-1]:
                    raise
                continue
            if final_error is not None:
                # refused requests are logged (security: e.g. a client asking to delete another client's ids)
                logger.warning(
                    "deletion request %s from %r (submitter %r, %s) rejected (%s): %s %s", key, claimed, submitter, row["actor"],
                    final_error.code, final_error, getattr(final_error, "audit_detail", ""),
                )
            return self.get(key)
        raise AssertionError("unreachable")  # pragma: no cover

    def _insert_submission(
        self, key: str, row: dict[str, Any], error: InvalidRequestError | None, parsed: DeletionRequest | None,
        limits: RequestLimits | None, now_wall: float, now: float | None,
    ) -> InvalidRequestError | None:
        """Insert a judged submission under ledger key ``key`` with its two transitions, in one transaction; returns
        the rejection (the given ``error`` or ``rate_limited``) or None."""
        row = dict(row, request_id=key)
        with self.engine.begin() as conn:
            rpm = None if limits is None else limits.max_requests_per_minute
            if error is None and rpm is not None and parsed is not None:
                error = self._rate_limit_error(conn, parsed, rpm, now_wall)
            final = "validated" if error is None else "rejected"
            details = {} if error is None else {"reason": str(error), "code": error.code}
            if error is not None and getattr(error, "audit_detail", None):
                details["detail"] = error.audit_detail  # type: ignore[union-attr]  # the operator's audit, not the client's answer
            received = {"actor": row["actor"]}
            if row["submitter"].startswith(CONSOLE_PREFIX):
                received["on_behalf_of"] = row["client_id"]
            row.update(state=final, state_reason=None if error is None else str(error), error_code=None if error is None else error.code)
            conn.execute(insert(requests_table).values(**row))
            conn.execute(
                insert(transitions_table),
                [
                    {"request_id": key, "from_state": None, "to_state": "received", "at": now_wall, "details": dumps(received)},
                    {"request_id": key, "from_state": "received", "to_state": final, "at": now_wall if now is not None else time.time(),
                     "details": dumps(details) if details else None},
                ],
            )
        return error

    def _rate_limit_error(
        self, conn: Connection, parsed: DeletionRequest, rpm: int, now_wall: float
    ) -> InvalidRequestError | None:
        """``rate_limited`` when the client already has ``rpm`` accepted requests received in the 60 s up to
        ``now_wall``, counted inside ``conn``'s (inserting) transaction; else None."""
        if self.is_postgresql:
            # READ COMMITTED does not stop two servers from both counting n-1 and inserting: serialise
            # submissions per client with a lock released at commit (SQLite: BEGIN IMMEDIATE already does)
            conn.execute(select(func.pg_advisory_xact_lock(advisory_key("rate:" + parsed.client_id))))
        recent = conn.execute(
            select(func.count()).select_from(requests_table).where(
                requests_table.c.client_id == parsed.client_id,
                requests_table.c.state != "rejected",
                requests_table.c.received_at > now_wall - 60.0,
                requests_table.c.received_at <= now_wall,
            )
        ).scalar_one()
        if recent < rpm:
            return None
        return InvalidRequestError(
            f"client {parsed.client_id!r} already has {recent} accepted request(s) in the last 60 s; at most "
            f"{rpm} per minute - retry later with a new request_id",
            code="rate_limited",
            request_id=parsed.request_id,
        )

    def _same_or_conflict(self, existing: LedgerEntry, fingerprint: str) -> LedgerEntry:
        with self.engine.connect() as conn:
            stored = conn.execute(
                select(requests_table.c.fingerprint).where(requests_table.c.request_id == existing.request_id)
            ).scalar_one()
        if stored != fingerprint:
            # the submitter's own request (the lookup is per submitter); still, the message names no stored state
            raise InvalidRequestError(
                f"request_id {existing.client_request_id or existing.request_id!r} was already used for a different "
                "request; use a new request_id",
                code="conflict",
                request_id=existing.request_id,
            )
        return existing

    @staticmethod
    def _row_for(
        parsed: DeletionRequest | None, raw: Any, rid: str, fingerprint: str, payload_text: str | None, now: float
    ) -> dict[str, Any]:
        if parsed is not None:
            return {
                "request_id": rid,
                "client_id": parsed.client_id,
                "level": parsed.level,
                "ids": dumps(parsed.ids),
                "label": parsed.label,
                "reason": parsed.reason,
                "created_at": parsed.created_at,
                "fingerprint": fingerprint,
                "received_at": now,
                "updated_at": now,
                "payload": None,
            }

        def text_field(key: str, limit: int) -> str:
            try:
                value = raw.get(key) if isinstance(raw, Mapping) else None
            except Exception:  # noqa: BLE001
                value = None
            # NUL cannot be stored in a PostgreSQL text column: shown as U+FFFD
            return value[:limit].replace("\x00", "\ufffd") if isinstance(value, str) else ""

        return {
            "request_id": rid,
            "client_id": text_field("client_id", 256),
            "level": text_field("level", 16),
            "ids": None,
            "label": None,
            "reason": text_field("reason", 2000),
            "created_at": None,
            "fingerprint": fingerprint,
            "received_at": now,
            "updated_at": now,
            "payload": payload_text,
        }

    def transition(
        self, request_id: str, new_state: str, *, expected: str | Iterable[str] | None = None, reason: str | None = None, **details: Any
    ) -> LedgerEntry:
        """Move a request to ``new_state`` and commit a transition row (``details`` are stored as JSON).

        ``expected``: the state(s) the caller believes the request is in; if it is elsewhere (another worker moved
        it), raises :class:`IllegalTransitionError` and writes nothing - a compare-and-set. ``reason`` is required for
        ``rejected`` and ``failed``.

        Raises:
            UnknownRequestError: no such request.
            IllegalTransitionError: the move is not in the state machine (e.g. from a final state).
        """
        if new_state not in STATES:
            raise IllegalTransitionError(f"unknown state {new_state!r}; states are {list(STATES)}")
        if new_state in ("rejected", "failed") and not reason:
            raise InvalidConfigError(f"moving {request_id!r} to {new_state!r} needs a reason")
        with self.engine.begin() as conn:
            self._move(conn, request_id, new_state, expected=expected, reason=reason, details=details)
        return self.get(request_id)

    def _move(
        self,
        conn: Connection,
        request_id: str,
        new_state: str,
        *,
        expected: str | Iterable[str] | None,
        reason: str | None,
        details: Mapping[str, Any],
        values: Mapping[str, Any] | None = None,
        reopen: bool = False,
    ) -> None:
        current = conn.execute(
            select(requests_table.c.state).where(requests_table.c.request_id == request_id).with_for_update()
        ).scalar_one_or_none()
        if current is None:
            raise UnknownRequestError(f"no request {request_id!r} in the ledger")
        if expected is not None:
            allowed_from = {expected} if isinstance(expected, str) else set(expected)
            if current not in allowed_from:
                raise IllegalTransitionError(
                    f"request {request_id!r} is {current!r}, not {sorted(allowed_from)}: another worker moved it"
                )
        if not _legal(current, new_state, reopen):
            raise IllegalTransitionError(
                f"request {request_id!r} cannot go from {current!r} to {new_state!r}; from {current!r} it may go to "
                f"{sorted(ALLOWED[current]) or 'nowhere (final state)'}"
            )
        now = time.time()
        # state_reason says why the request is where it is: required for rejected/failed, optional otherwise (e.g.
        # "unlearned, not verified: no baseline"); a move without a reason clears the previous one
        changes: dict[str, Any] = {"state": new_state, "updated_at": now, "state_reason": reason, "error_code": None}
        if new_state in ("rejected", "failed"):
            changes["error_code"] = details.get("code") if isinstance(details.get("code"), str) else new_state
        if values:
            changes.update(values)
        conn.execute(update(requests_table).where(requests_table.c.request_id == request_id).values(**changes))
        stored = dict(details)
        if reason is not None:
            stored["reason"] = reason
        conn.execute(
            insert(transitions_table).values(
                request_id=request_id, from_state=current, to_state=new_state, at=now, details=dumps(stored) if stored else None
            )
        )

    def schedule_pending(
        self, *, limit: int | None = None, client_id: str | None = None, batch_id: str | None = None,
        request_ids: Iterable[str] | None = None, owner: str | None = None, lease_s: float = 300.0, **details: Any
    ) -> list[LedgerEntry]:
        """Move validated requests (oldest first, at most ``limit``; only ``request_ids`` when given) to ``scheduled``
        in one transaction and return them: the batch of one unlearning round. ``batch_id`` is stored on each request
        (``LedgerEntry.batch_id``, :meth:`entries` ``batch_id=``) and on its transition row with ``details`` (e.g.
        ``round=7``); scheduling more requests under an existing ``batch_id`` adds them to that batch.

        Requests already ``scheduled`` (a round interrupted by a crash) are not returned: resume those with
        ``pending(states=["scheduled"])`` / ``entries(batch_id=...)``.

        ``owner`` (a server's id, needs ``batch_id``): take or renew the batch's lease (:meth:`claim_batch`) in the
        same transaction; while another server's lease on it is live nothing is scheduled and ``[]`` comes back (that
        server runs the batch), so two servers on one ledger never drive one batch. The owner is on the transitions.
        """
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise InvalidConfigError(f"limit must be a positive integer or None, got {limit!r}")
        if batch_id is not None and (not isinstance(batch_id, str) or not NAME_PATTERN.fullmatch(batch_id) or len(batch_id) > 64):
            raise InvalidConfigError(f"batch_id must be 1-64 characters of letters, digits and '._:@/-', got {batch_id!r}")
        query = select(requests_table.c.request_id).where(requests_table.c.state == "validated").order_by(requests_table.c.seq)
        if client_id is not None:
            query = query.where(requests_table.c.client_id == client_id)
        if request_ids is not None:
            query = query.where(requests_table.c.request_id.in_(list(request_ids)))
        if limit is not None:
            query = query.limit(limit)
        if owner is not None:
            if batch_id is None:
                raise InvalidConfigError("owner: a lease is on a batch; pass batch_id too")
            _leases.check_lease_args(batch_id, owner, lease_s)
            details = {"owner": owner, **details}
        if batch_id is not None:
            details = {"batch": batch_id, **details}
        with self.engine.begin() as conn:
            if owner is not None and not _leases.claim(conn, batch_id, owner, lease_s, None, serialise=self.is_postgresql):
                return []
            ids = list(conn.execute(query.with_for_update()).scalars())
            for rid in ids:
                self._move(conn, rid, "scheduled", expected="validated", reason=None, details=details,
                           values=None if batch_id is None else {"batch_id": batch_id})
        return [self.get(rid) for rid in ids]

    def record_result(
        self,
        request_id: str,
        *,
        coreset_ids: Sequence[int] | None = None,
        strategy: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        model_hash_before: str | None = None,
        model_hash_after: str | None = None,
        new_state: str | None = None,
        expected: str | Iterable[str] | None = None,
        **details: Any,
    ) -> LedgerEntry:
        """Store what was done for a request (only the arguments given are written; ``metrics`` are merged).

        With ``new_state`` (e.g. ``"unlearned"``) the result and the transition are one transaction: a crash leaves
        either both or neither.
        """
        with self.engine.begin() as conn:
            self._record(
                conn, request_id, coreset_ids=coreset_ids, strategy=strategy, metrics=metrics, model_hash_before=model_hash_before,
                model_hash_after=model_hash_after, new_state=new_state, expected=expected, details=details,
            )
        return self.get(request_id)

    def record_results(self, results: Mapping[str, Mapping[str, Any]]) -> list[LedgerEntry]:
        """:meth:`record_result` for several requests in **one** transaction (``{request_id: keyword arguments}``):
        a batch's requests change state together or not at all - a crash never leaves half a batch recorded."""
        if not results:
            return []
        known = {"coreset_ids", "strategy", "metrics", "model_hash_before", "model_hash_after", "new_state", "expected"}
        with self.engine.begin() as conn:
            for rid, kwargs in results.items():
                kwargs = dict(kwargs)
                details = {k: kwargs.pop(k) for k in list(kwargs) if k not in known}
                self._record(conn, rid, details=details, **kwargs)
        return [self.get(rid) for rid in results]

    def _record(
        self,
        conn: Connection,
        request_id: str,
        *,
        coreset_ids: Sequence[int] | None = None,
        strategy: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        model_hash_before: str | None = None,
        model_hash_after: str | None = None,
        new_state: str | None = None,
        expected: str | Iterable[str] | None = None,
        details: dict[str, Any],
    ) -> None:
        values: dict[str, Any] = {}
        if coreset_ids is not None:
            values["coreset_ids"] = dumps(sorted(int(i) for i in coreset_ids))
        if strategy is not None:
            values["strategy"] = str(strategy)
        if model_hash_before is not None:
            values["model_hash_before"] = str(model_hash_before)
        if model_hash_after is not None:
            values["model_hash_after"] = str(model_hash_after)
        row = conn.execute(
            select(requests_table.c.metrics, requests_table.c.state).where(requests_table.c.request_id == request_id).with_for_update()
        ).first()
        if row is None:
            raise UnknownRequestError(f"no request {request_id!r} in the ledger")
        if metrics is not None:
            merged = dict(loads(row.metrics) or {})
            merged.update(json_safe(dict(metrics)))
            values["metrics"] = dumps(merged)
        if new_state is not None:
            reason = details.pop("reason", None)
            if new_state in ("rejected", "failed") and not reason:
                raise InvalidConfigError(f"moving {request_id!r} to {new_state!r} needs a reason")
            self._move(conn, request_id, new_state, expected=expected, reason=reason, details=details, values=values)
        elif values:
            if row.state in ("rejected",):
                raise IllegalTransitionError(f"request {request_id!r} was rejected: it has no result to record")
            values["updated_at"] = time.time()
            conn.execute(update(requests_table).where(requests_table.c.request_id == request_id).values(**values))

    def reopen(self, request_ids: Iterable[str], reason: str, metrics: Mapping[str, Any] | None = None,
               **details: Any) -> list[LedgerEntry]:
        """Move verified requests back to ``validated`` in one transaction (the transition says ``reopened`` and
        why; ``metrics`` are merged into each): the model version that served them was rolled back, so they are owed
        again and the next unlearning round takes them. Requests not ``verified`` are left as they are (reopening
        twice is a no-op). Returns the reopened entries."""
        if not reason:
            raise InvalidConfigError("reopen needs a reason")
        wanted = list(request_ids)
        with self.engine.begin() as conn:
            rows = conn.execute(select(requests_table.c.request_id, requests_table.c.metrics).where(
                requests_table.c.request_id.in_(wanted), requests_table.c.state == "verified").with_for_update()).all()
            for rid, stored in rows:
                values = {"metrics": dumps({**(loads(stored) or {}), **json_safe(dict(metrics or {}))})}
                self._move(conn, rid, "validated", expected="verified", reason=reason, details={**details, "reopened": True},
                           values=values, reopen=True)
        return [self.get(rid) for rid, _ in rows]

    def record_verification(self, request_id: str, verification: Mapping[str, Any], *, expected: str | Iterable[str] | None = "unlearned",
                            **extra: Any) -> LedgerEntry:
        """Record a run's verification for a request and let it decide the state (:func:`verification_result`)."""
        return self.record_results({request_id: verification_result(verification, expected=expected, **extra)})[0]

    # ---- batch leases ---------------------------------------------------------------------------------------------
    def claim_batch(self, batch_id: str, owner: str, *, lease_s: float = 300.0, now: float | None = None) -> bool:
        """Take or renew the lease on a batch for ``owner`` (a server's id) until ``now + lease_s``: True when
        ``owner`` now holds it, False (nothing written) while another owner's lease is live.

        Several servers on one ledger (PostgreSQL) each call this before driving a batch, and again between long
        steps (renewal): a batch whose lease expired belongs to a server that crashed (or stalled past its lease) and
        is taken over, logged; a live one is left to its owner. Leases compare wall clocks of different servers: keep
        ``lease_s`` well above their clock skew and above the longest step between renewals. Cost: one transaction.
        """
        _leases.check_lease_args(batch_id, owner, lease_s)
        with self.engine.begin() as conn:
            return _leases.claim(conn, batch_id, owner, lease_s, now, serialise=self.is_postgresql)

    def release_batch(self, batch_id: str, owner: str) -> bool:
        """Give up ``owner``'s lease on a batch (done with it); False when ``owner`` did not hold it."""
        with self.engine.begin() as conn:
            return _leases.release(conn, batch_id, owner)

    def batch_lease(self, batch_id: str) -> BatchLease | None:
        """The lease on a batch (live or expired), or None when no server holds one."""
        with self.engine.connect() as conn:
            return _leases.read(conn, batch_id)

    # ---- reads ----------------------------------------------------------------------------------------------------
    def find(self, request_id: str, client_id: str | None = None) -> LedgerEntry | None:
        """The entry with ledger key ``request_id``, or None. With ``client_id``: the request that submitter (the
        authenticated sender, else the client the request names) sent under its own ``request_id`` - the
        idempotency key - whatever its ledger key."""
        if client_id is None:
            where = requests_table.c.request_id == request_id
        else:
            where = (requests_table.c.submitter == client_id) & (requests_table.c.client_request_id == request_id)
        with self.engine.connect() as conn:
            row = conn.execute(select(requests_table).where(where)).first()
        return None if row is None else row_to_entry(row)

    def get(self, request_id: str, client_id: str | None = None) -> LedgerEntry:
        """:meth:`find`; raises :class:`UnknownRequestError` if there is none."""
        entry = self.find(request_id, client_id)
        if entry is None:
            raise UnknownRequestError(f"no request {request_id!r}{'' if client_id is None else f' of {client_id!r}'} in the ledger")
        return entry

    def entries(
        self, states: Iterable[str] | None = None, client_id: str | None = None, batch_id: str | None = None
    ) -> list[LedgerEntry]:
        """All entries (optionally in ``states`` / of one client / of one batch), oldest first."""
        query = select(requests_table).order_by(requests_table.c.seq)
        if batch_id is not None:
            query = query.where(requests_table.c.batch_id == batch_id)
        if states is not None:
            wanted = self._check_states(states)
            query = query.where(requests_table.c.state.in_(wanted))
        if client_id is not None:
            query = query.where(requests_table.c.client_id == client_id)
        with self.engine.connect() as conn:
            return [row_to_entry(r) for r in conn.execute(query)]

    def pending(self, states: Iterable[str] | None = None, client_id: str | None = None) -> list[LedgerEntry]:
        """Unfinished requests, oldest first: what a restarted server resumes (default: every non-final state)."""
        return self.entries(PENDING_STATES if states is None else states, client_id=client_id)

    def history(self, request_id: str) -> list[Transition]:
        """Every committed transition of a request, in order."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(transitions_table).where(transitions_table.c.request_id == request_id).order_by(transitions_table.c.id)
            ).all()
        if not rows and self.find(request_id) is None:
            raise UnknownRequestError(f"no request {request_id!r} in the ledger")
        return [transition_from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Number of requests per state."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(requests_table.c.state, func.count()).group_by(requests_table.c.state)).all()
        return {state: int(n) for state, n in rows}

    def export(
        self, path: str | Path | None = None, *, hash_ids: bool = False, states: Iterable[str] | None = None
    ) -> list[dict[str, Any]]:
        """The audit trail: per request its ids (or ``ids_sha256`` with ``hash_ids=True``), coreset ids, strategy,
        metrics, model hashes, state and every transition. Written as JSON to ``path`` when given, atomically
        (:func:`~erasus_ray.utils.atomic.atomic_write_text`: temp file, ``fsync``, ``os.replace``), so a crash or a
        full disk mid-write leaves the previous audit file whole, never a truncated one.

        Note: a SHA-256 of small integer ids hides them from a casual reader, not from someone who hashes candidate
        id lists; treat a hashed export as pseudonymised, not anonymised.
        """
        entries = self.entries(states)
        with self.engine.connect() as conn:
            rows = conn.execute(select(transitions_table).order_by(transitions_table.c.id)).all()
        records = audit_records(entries, rows, hash_ids=hash_ids)
        if path is not None:
            atomic_write_text(path, audit_document(records, hash_ids=hash_ids))
        return records

    def check_integrity(self) -> list[str]:
        """Problems found (empty when consistent): every request's state equals its last transition, transitions
        chain through legal moves from ``received``, no transition is orphaned."""
        problems: list[str] = []
        with self.engine.connect() as conn:
            states = {r.request_id: r.state for r in conn.execute(select(requests_table.c.request_id, requests_table.c.state))}
            rows = conn.execute(select(transitions_table).order_by(transitions_table.c.id)).all()
            unkeyed = conn.execute(
                select(requests_table.c.request_id).where(
                    requests_table.c.submitter.is_(None) | requests_table.c.client_request_id.is_(None)
                )
            ).scalars().all()
        problems += [f"{rid!r} has no submitter / client_request_id (idempotency key)" for rid in unkeyed]
        chains: dict[str, list[Any]] = {}
        for r in rows:
            if r.request_id not in states:
                problems.append(f"transition {r.id} refers to unknown request {r.request_id!r}")
                continue
            chains.setdefault(r.request_id, []).append(r)
        for rid, state in states.items():
            chain = chains.get(rid, [])
            if not chain:
                problems.append(f"{rid!r} has no transitions")
                continue
            prev: str | None = None
            for t in chain:
                if t.from_state != prev or not _legal(prev, t.to_state, bool((loads(t.details) or {}).get("reopened"))):
                    problems.append(f"{rid!r}: illegal or broken transition {t.from_state!r} -> {t.to_state!r} after {prev!r}")
                prev = t.to_state
            if prev != state:
                problems.append(f"{rid!r}: state {state!r} but last transition ends in {prev!r}")
        return problems

    @staticmethod
    def _check_states(states: Iterable[str]) -> list[str]:
        wanted = [states] if isinstance(states, str) else list(states)
        unknown = [s for s in wanted if s not in STATES]
        if unknown:
            raise InvalidConfigError(f"unknown state(s) {unknown}; states are {list(STATES)}")
        return wanted



def verification_result(verification: Mapping[str, Any], *, expected: str | Iterable[str] | None = "unlearned",
                        **extra: Any) -> dict[str, Any]:
    """The :meth:`DeletionLedger.record_results` entry of a request whose run was verified: the verification record
    (:func:`~erasus_ray.evaluation.verification.verification_record` - the controller's target, each criterion's value
    and bounds, pass/fail - or a :func:`~erasus_ray.evaluation.verification.combined_verification`) goes to
    ``metrics["verification"]`` and ``metrics["verified"]``, and **it** decides the state: ``passed`` True ->
    ``verified``; False -> ``failed`` with the failing criteria as the reason; None (nothing measurable) -> the state
    stays (``unlearned``), the record saying why. ``extra``: more ``record_result`` arguments (``metrics`` merged)."""
    from erasus_ray.evaluation.verification import failing_criteria, verification_record

    record = verification_record(verification)
    passed = record.get("passed")
    metrics = {**dict(extra.pop("metrics", None) or {}), "verification": record, "verified": passed}
    out: dict[str, Any] = {**extra, "metrics": metrics}
    if passed is None:
        return out
    out.update(new_state="verified" if passed else "failed", expected=expected)
    if not passed and "reason" not in out:
        failing = record.get("why_failed") or failing_criteria(record)
        out["reason"] = f"not verified ({record.get('target')} target, {record.get('mode')}): {failing}"
    return out
