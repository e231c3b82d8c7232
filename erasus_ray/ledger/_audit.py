"""What the ledger shows: its records (:class:`LedgerEntry`, :class:`Transition`) read from rows, their JSON form for
``erasus-ray ledger list|show|export``, and the audit document :meth:`DeletionLedger.export` writes.

Reading never fails on one bad row: timestamps no date can show render as ``"invalid:<value>"`` (:func:`iso`) and
unreadable JSON reads as None (:func:`~erasus_ray.ledger._schema.loads`). Cost: linear in the rows rendered.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from erasus_ray.ledger._keys import CONSOLE_PREFIX, hash_id_list
from erasus_ray.ledger._schema import FINAL_STATES, SCHEMA_VERSION, json_safe, loads
from erasus_ray.ledger.requests import DeletionRequest, created_at_in_range


def iso(ts: Any) -> str | None:
    """ISO 8601 (UTC) of a stored timestamp; never raises: a value no date can show (1e20, NaN, text in an old SQLite
    row) is shown as ``"invalid:<value>"``, so one bad row cannot break an audit read."""
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(float(ts), tz=timezone.utc).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError, TypeError):
        return f"invalid:{str(ts)[:40]}"


@dataclass
class Transition:
    """One committed state change."""

    request_id: str
    from_state: str | None
    to_state: str
    at: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"from": self.from_state, "to": self.to_state, "at": iso(self.at), "details": self.details}


@dataclass
class LedgerEntry:
    """A request as the ledger stores it: the request's fields, its state and what was done for it."""

    request_id: str
    client_id: str
    level: str
    ids: list[int] | None
    label: int | None
    reason: str
    created_at: float | None
    state: str
    state_reason: str | None
    error_code: str | None
    received_at: float
    updated_at: float
    coreset_ids: list[int] | None = None
    strategy: str | None = None
    metrics: dict[str, Any] | None = None
    model_hash_before: str | None = None
    model_hash_after: str | None = None
    seq: int = 0
    batch_id: str | None = None
    client_request_id: str | None = None
    submitter: str | None = None
    actor: str | None = None

    @property
    def operator_action(self) -> bool:
        """Submitted at the operator's console (in the name of ``client_id``), not by the client's own node."""
        return bool(self.submitter and self.submitter.startswith(CONSOLE_PREFIX))

    @property
    def accepted(self) -> bool:
        """Validated (and not rejected): the ledger owes this request an outcome."""
        return self.state not in ("received", "rejected")

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES

    def request(self) -> DeletionRequest:
        """The :class:`DeletionRequest` as the client sent it (its own ``request_id``; raises
        :class:`InvalidRequestError` for a stored malformed submission)."""
        return DeletionRequest(
            request_id=self.client_request_id or self.request_id,
            client_id=self.client_id,
            level=self.level,
            ids=self.ids,
            label=self.label,
            reason=self.reason,
            # the client's claim, for the record only: a value stored before it was bounded must not make the
            # stored request unreadable (the fingerprint leaves created_at out)
            created_at=self.created_at if created_at_in_range(self.created_at) else 0.0,
        )

    def to_dict(self, *, hash_ids: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "client_request_id": self.client_request_id,
            "client_id": self.client_id,
            "submitter": self.submitter,
            "actor": self.actor,
            "operator_action": self.operator_action,
            "level": self.level,
            "label": self.label,
            "reason": self.reason,
            "created_at": iso(self.created_at),
            "received_at": iso(self.received_at),
            "updated_at": iso(self.updated_at),
            "state": self.state,
            "state_reason": self.state_reason,
            "error_code": self.error_code,
            "n_ids": None if self.ids is None else len(self.ids),
            "strategy": self.strategy,
            "metrics": self.metrics,
            "model_hash_before": self.model_hash_before,
            "model_hash_after": self.model_hash_after,
            "n_coreset": None if self.coreset_ids is None else len(self.coreset_ids),
            "batch_id": self.batch_id,
        }
        if hash_ids:
            out["ids_sha256"] = hash_id_list(self.ids)
            out["coreset_ids_sha256"] = hash_id_list(self.coreset_ids)
        else:
            out["ids"] = self.ids
            out["coreset_ids"] = self.coreset_ids
        return out


def row_to_entry(row: Any) -> LedgerEntry:
    m = row._mapping
    return LedgerEntry(
        request_id=m["request_id"],
        client_id=m["client_id"],
        level=m["level"],
        ids=loads(m["ids"]),
        label=m["label"],
        reason=m["reason"] or "",
        created_at=m["created_at"],
        state=m["state"],
        state_reason=m["state_reason"],
        error_code=m["error_code"],
        received_at=m["received_at"],
        updated_at=m["updated_at"],
        coreset_ids=loads(m["coreset_ids"]),
        strategy=m["strategy"],
        metrics=loads(m["metrics"]),
        model_hash_before=m["model_hash_before"],
        model_hash_after=m["model_hash_after"],
        seq=m["seq"],
        batch_id=m["batch_id"],
        client_request_id=m["client_request_id"],
        submitter=m["submitter"],
        actor=m["actor"],
    )


def transition_from_row(row: Any) -> Transition:
    return Transition(row.request_id, row.from_state, row.to_state, row.at, loads(row.details) or {})


def audit_records(entries: list[LedgerEntry], transition_rows: list[Any], *, hash_ids: bool) -> list[dict[str, Any]]:
    """Per entry its :meth:`LedgerEntry.to_dict` with its ``transitions`` (from ``transition_rows``, in their order)."""
    by_request: dict[str, list[dict[str, Any]]] = {}
    for row in transition_rows:
        by_request.setdefault(row.request_id, []).append(transition_from_row(row).to_dict())
    out = []
    for entry in entries:
        item = entry.to_dict(hash_ids=hash_ids)
        item["transitions"] = by_request.get(entry.request_id, [])
        out.append(item)
    return out


def audit_document(records: list[dict[str, Any]], *, hash_ids: bool) -> str:
    """The audit file's JSON text: schema version, export time, whether ids are hashed, the records."""
    doc = {"schema_version": SCHEMA_VERSION, "exported_at": iso(time.time()), "hash_ids": hash_ids, "requests": records}
    return json.dumps(doc, indent=2, sort_keys=False)


def safe_payload(payload: Any, limit: int = 4000) -> str:
    """A bounded, JSON-safe text of a raw submission (for the audit of malformed requests)."""
    try:
        text = json.dumps(json_safe(payload), sort_keys=True) if isinstance(payload, Mapping) else repr(payload)
    except Exception:  # noqa: BLE001 - keys that cannot be sorted, hostile __repr__, ...
        try:
            text = repr(payload)
        except Exception:  # noqa: BLE001
            text = f"<unprintable {type(payload).__name__}>"
    return text[:limit]
