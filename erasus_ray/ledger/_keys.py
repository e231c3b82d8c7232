"""Keys and credentials of the ledger: the ledger key of a submission (plain, scoped, or ``invalid-<hash>`` for one
that cannot be parsed), the console's idempotency namespace, the operator key's salted hash, advisory-lock keys and
the id-list hash of the audit export.

Pure functions of their arguments (no database): the ledger (``ledger.py``) decides when to use them. Cost: one
SHA-256 each, except the operator key (PBKDF2, 100 000 rounds, ~0.1 s).
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import json
from typing import Any, Mapping, Sequence

from erasus_ray.errors import InvalidRequestError
from erasus_ray.ledger.requests import NAME_PATTERN

#: the submitter (idempotency namespace) of console submissions made in a client's name: ``@console/<client>``. A
#: client id starts with a letter or digit and a node sender must be one, so no node ever shares this namespace.
CONSOLE_PREFIX = "@console/"
#: environment variable the CLI reads the operator key from (:meth:`DeletionLedger.set_operator_key`)
OPERATOR_KEY_ENV = "ERASUS_RAY_OPERATOR_KEY"
MIN_OPERATOR_KEY_CHARS = 16
_KEY_ITERATIONS = 100_000


def scoped_key(request_id: str, submitter: str) -> str:
    """The ledger key of a request whose client-supplied id another submitter already holds:
    ``<request_id>#<first 16 hex digits of sha256(submitter)>``. ``#`` is not allowed in a client-supplied id, so a
    scoped key never equals one."""
    return f"{request_id}#{hashlib.sha256(submitter.encode()).hexdigest()[:16]}"


def candidate_keys(request_id: str, submitter: str, *, impersonating: bool) -> list[str]:
    """The ledger keys a submission may take, in order: the plain id, then its scoped key; only the scoped key for a
    request in another client's name (it must not squat that client's id)."""
    scoped = scoped_key(request_id, submitter)
    return [scoped] if impersonating else [request_id, scoped]


def unparsed_key(error: InvalidRequestError, source: Any, payload_text: str | None) -> tuple[str, str]:
    """``(request id, fingerprint)`` of a submission that could not be parsed: the fingerprint hashes the bounded
    payload text; the id is the one it names when that is a well-formed id, else ``invalid-<32 hex of it>``."""
    raw_id = error.request_id
    if raw_id is None and isinstance(source, Mapping):
        try:
            candidate = source.get("request_id")
        except Exception:  # noqa: BLE001 - a hostile mapping
            candidate = None
        raw_id = candidate if isinstance(candidate, str) else None
    fingerprint = hashlib.sha256((payload_text or "").encode()).hexdigest()
    rid = raw_id if raw_id is not None and NAME_PATTERN.fullmatch(raw_id) else f"invalid-{fingerprint[:32]}"
    return rid, fingerprint


def console_submitter(client_id: str) -> str:
    """The idempotency namespace of console submissions in ``client_id``'s name (``@console/<client>``): apart from the
    client's own (its node's) namespace, so the console can neither replay nor squat a client's request id."""
    return CONSOLE_PREFIX + client_id


def console_user() -> str:
    """The OS user at the console (``getpass.getuser()``; ``"unknown"`` where the system cannot tell)."""
    try:
        return getpass.getuser()[:200] or "unknown"
    except Exception:  # noqa: BLE001 - no passwd entry / no LOGNAME in a container
        return "unknown"


def hash_operator_key(key: str, salt: bytes) -> str:
    """The stored form of an operator key: ``pbkdf2_sha256$<iterations>$<salt hex>$<digest hex>``."""
    digest = hashlib.pbkdf2_hmac("sha256", key.encode(), salt, _KEY_ITERATIONS)
    return f"pbkdf2_sha256${_KEY_ITERATIONS}${salt.hex()}${digest.hex()}"


def operator_key_matches(key: str, stored: str) -> bool:
    """Whether ``key`` hashes to ``stored`` (constant-time compare; False for a malformed stored value)."""
    try:
        _, iterations, salt, digest = stored.split("$")
        mine = hashlib.pbkdf2_hmac("sha256", key.encode(), bytes.fromhex(salt), int(iterations))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(mine.hex(), digest)


def advisory_key(text: str) -> int:
    """A signed 64-bit key for PostgreSQL's advisory locks."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big", signed=True)


def hash_id_list(ids: Sequence[int] | None) -> str | None:
    """SHA-256 of the sorted ids as canonical JSON (the audit export's ``ids_sha256``)."""
    if ids is None:
        return None
    return hashlib.sha256(json.dumps(sorted(int(i) for i in ids)).encode()).hexdigest()
