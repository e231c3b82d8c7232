"""The deletion ledger: deletion requests, their validation, and a durable record of their progress (issue #5).

- :class:`DeletionRequest`, :class:`OwnershipRegistry`, :class:`RequestLimits`, :func:`validate` (``requests.py``);
- :class:`DeletionLedger` and the state machine (``ledger.py``), over its schema and migrations (``_schema.py``),
  key derivation (``_keys.py``), batch leases (``_leases.py``) and records/audit export (:class:`LedgerEntry`,
  :class:`Transition`, ``_audit.py``).

Needs SQLAlchemy 2 (``pip install 'erasus-ray[fl]'``).
"""

from erasus_ray.ledger.ledger import (
    ALLOWED,
    DEFAULT_LEDGER_ENV,
    DEFAULT_LEDGER_FILE,
    FINAL_STATES,
    OPERATOR_KEY_ENV,
    PENDING_STATES,
    STATES,
    BatchLease,
    DeletionLedger,
    LedgerEntry,
    Transition,
    console_submitter,
    default_ledger_url,
    hash_id_list,
    scoped_key,
    verification_result,
)
from erasus_ray.ledger.requests import LEVELS, MAX_CREATED_AT, DeletionRequest, OwnershipRegistry, RequestLimits, validate

__all__ = [
    "verification_result",
    "ALLOWED",
    "BatchLease",
    "DEFAULT_LEDGER_ENV",
    "DEFAULT_LEDGER_FILE",
    "FINAL_STATES",
    "LEVELS",
    "MAX_CREATED_AT",
    "OPERATOR_KEY_ENV",
    "PENDING_STATES",
    "STATES",
    "DeletionLedger",
    "DeletionRequest",
    "LedgerEntry",
    "OwnershipRegistry",
    "RequestLimits",
    "Transition",
    "console_submitter",
    "default_ledger_url",
    "hash_id_list",
    "scoped_key",
    "validate",
]
