"""Per-client API keys of the deletion service, stored in the ledger's own database (``ledger_meta``) as salted
PBKDF2 hashes only - the same derivation as the ledger's operator key (:mod:`erasus_ray.ledger._keys`).

A key reads ``erk_<client id>.<secret>``: the client id part says which stored hash to check (one PBKDF2, not one per
client), the secret is 32 random bytes. A key is shown once, when :meth:`ClientKeys.add` creates it.

Cost: :meth:`add` one PBKDF2 (~0.1 s); :meth:`authenticate` one PBKDF2 the first time a key is seen by this handle,
then one SELECT of its row (the verified (key, row) pair is cached, so a replaced key fails at once everywhere).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass

from sqlalchemy import delete, insert, select

from erasus_ray.errors import InvalidConfigError
from erasus_ray.ledger import DeletionLedger
from erasus_ray.ledger._keys import hash_operator_key, operator_key_matches
from erasus_ray.ledger._schema import meta_table
from erasus_ray.ledger.requests import NAME_PATTERN

KEY_PREFIX = "erk_"
ROLES = ("client", "operator")


@dataclass(frozen=True)
class Principal:
    """Who an authenticated call comes from."""

    client_id: str
    role: str

    @property
    def operator(self) -> bool:
        return self.role == "operator"


def _meta_key(client_id: str) -> str:
    # ledger_meta.key is 64 characters: a client id may be 128, so its hash names the row
    return "apikey:" + hashlib.sha256(client_id.encode()).hexdigest()[:48]


class ClientKeys:
    """API keys of a ledger's clients and operators (one key per id; adding again replaces it)."""

    def __init__(self, ledger: DeletionLedger) -> None:
        self.ledger = ledger
        self._verified: dict[str, Principal] = {}  # sha256(key, stored row) -> principal: one PBKDF2 per key and row

    def add(self, client_id: str, role: str = "client") -> str:
        """Create (or replace) ``client_id``'s key and return it; only its hash is stored."""
        if not isinstance(client_id, str) or not NAME_PATTERN.fullmatch(client_id):
            raise InvalidConfigError(f"client_id must be 1-128 letters, digits and '._:@/-', got {str(client_id)[:60]!r}")
        if role not in ROLES:
            raise InvalidConfigError(f"role must be one of {list(ROLES)}, got {role!r}")
        secret = secrets.token_urlsafe(32)
        value = json.dumps({"client_id": client_id, "role": role, "hash": hash_operator_key(secret, secrets.token_bytes(16))})
        with self.ledger.engine.begin() as conn:
            conn.execute(delete(meta_table).where(meta_table.c.key == _meta_key(client_id)))
            conn.execute(insert(meta_table).values(key=_meta_key(client_id), value=value))
        return f"{KEY_PREFIX}{client_id}.{secret}"

    def authenticate(self, key: str | None) -> Principal | None:
        """The principal a presented key belongs to, or None (no key, malformed, unknown client, wrong secret)."""
        if not isinstance(key, str) or not key.startswith(KEY_PREFIX) or "." not in key:
            return None
        client_id, _, secret = key[len(KEY_PREFIX):].rpartition(".")
        if not NAME_PATTERN.fullmatch(client_id or "-") or not secret:
            return None
        with self.ledger.engine.connect() as conn:
            stored = conn.execute(select(meta_table.c.value).where(meta_table.c.key == _meta_key(client_id))).scalar_one_or_none()
        if stored is None:
            return None
        # the cache is keyed by the stored row too: a key replaced by another process stops working here at once
        token = hashlib.sha256((key + "\0" + stored).encode()).hexdigest()
        if token in self._verified:
            return self._verified[token]
        record = json.loads(stored)
        if record.get("client_id") != client_id or not operator_key_matches(secret, record.get("hash", "")):
            return None
        principal = Principal(client_id, record.get("role", "client"))
        self._verified[token] = principal
        return principal
