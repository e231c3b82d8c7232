"""The ledger's storage: its tables, the vocabulary of the ``state`` column, how JSON columns are encoded, how an
engine is opened (SQLite pragmas) and how an older database is brought up to the current schema.

The contract (:class:`~erasus_ray.ledger.DeletionLedger`) and its state machine live in ``ledger.py``; this module only
knows rows. Cost: :func:`open_schema` runs ``CREATE TABLE IF NOT EXISTS`` and one inspection per migrated column, once
per handle.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    inspect,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool

logger = logging.getLogger("erasus_ray.ledger")

#: every value of ``deletion_requests.state``; the legal moves between them are the state machine (``ledger.ALLOWED``)
STATES: tuple[str, ...] = ("received", "validated", "scheduled", "unlearned", "verified", "rejected", "failed")
FINAL_STATES: frozenset[str] = frozenset({"verified", "rejected", "failed"})
#: states a restarted server resumes (everything not final)
PENDING_STATES: tuple[str, ...] = ("received", "validated", "scheduled", "unlearned")
#: 2: deletion_requests.batch_id; 3: client_request_id and submitter, unique together (per-submitter idempotency);
#: 4: deletion_requests.actor (who really submitted: a node's client or the console's OS user) and batch_leases.
#: Older files are brought up to date in place on open (:func:`migrate`).
SCHEMA_VERSION = 4

metadata = MetaData()
requests_table = Table(
    "deletion_requests",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(256), nullable=False, unique=True),
    Column("client_id", String(256), nullable=False),
    Column("level", String(16), nullable=False),
    Column("ids", Text),  # JSON list of ints, or NULL
    Column("label", BigInteger),  # labels are 64-bit (PostgreSQL's INTEGER is 32-bit)
    Column("reason", Text, nullable=False, default=""),
    Column("created_at", Float),
    Column("fingerprint", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("state_reason", Text),  # why it was rejected / failed
    Column("error_code", String(32)),
    Column("received_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("coreset_ids", Text),  # JSON
    Column("strategy", String(128)),
    Column("metrics", Text),  # JSON
    Column("model_hash_before", String(128)),
    Column("model_hash_after", String(128)),
    Column("payload", Text),  # the raw submission, for malformed requests that cannot be parsed
    Column("batch_id", String(64)),  # the unlearning round (batch) that scheduled it; NULL until scheduled
    Column("client_request_id", String(256)),  # the id the client sent (request_id may be scoped: module docstring)
    Column("submitter", String(256)),  # the authenticated sender, else CONSOLE_PREFIX + the client named
    Column("actor", String(256)),  # node:<sender> or console:<OS user>; NULL for rows written before schema 4
)
Index("ix_deletion_requests_state", requests_table.c.state, requests_table.c.seq)
Index(
    "ux_deletion_requests_submitter_rid", requests_table.c.submitter, requests_table.c.client_request_id, unique=True
)
Index("ix_deletion_requests_client_time", requests_table.c.client_id, requests_table.c.received_at)
transitions_table = Table(
    "deletion_transitions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(256), ForeignKey("deletion_requests.request_id"), nullable=False, index=True),
    Column("from_state", String(16)),
    Column("to_state", String(16), nullable=False),
    Column("at", Float, nullable=False),
    Column("details", Text),  # JSON
)
meta_table = Table("ledger_meta", metadata, Column("key", String(64), primary_key=True), Column("value", Text))
#: who drives a scheduled batch, until when (:meth:`DeletionLedger.claim_batch`)
leases_table = Table(
    "batch_leases",
    metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("owner", String(256), nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("claimed_at", Float, nullable=False),
)


def json_safe(obj: Any) -> Any:
    """JSON-serialisable copy: numpy/torch scalars to Python numbers, non-finite floats to strings."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None  # type: ignore[assignment]
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in obj]
    if np is not None and isinstance(obj, np.ndarray):
        return [json_safe(v) for v in obj.tolist()]
    if np is not None and isinstance(obj, np.generic):
        obj = obj.item()
    if hasattr(obj, "item") and callable(obj.item) and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except Exception:
            return repr(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def dumps(obj: Any) -> str | None:
    """The JSON text stored in a JSON column (sorted keys, :func:`json_safe`), or None."""
    return None if obj is None else json.dumps(json_safe(obj), sort_keys=True)


def loads(text: str | None) -> Any:
    """The stored JSON, or None (logged) when a row holds text that is not JSON: an audit read never fails on it."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        logger.warning("the ledger holds unreadable JSON %r; read as None", str(text)[:80])
        return None


#: environment variable naming the default ledger (a SQLAlchemy URL or a SQLite path)
DEFAULT_LEDGER_ENV = "ERASUS_RAY_LEDGER"
#: the default ledger file, relative to the working directory, when the variable is unset
DEFAULT_LEDGER_FILE = "erasus-ledger.db"


def default_ledger_url() -> str:
    """The durable default ledger: ``$ERASUS_RAY_LEDGER`` (URL or SQLite path), else ``./erasus-ledger.db`` - the
    ledger ``erasus-ray ledger list|show|export`` reads without ``--db``."""
    return normalise_url(os.environ.get(DEFAULT_LEDGER_ENV) or DEFAULT_LEDGER_FILE)


def normalise_url(url: str | Path | None) -> str:
    """A SQLAlchemy URL: None is an in-memory SQLite ledger, a path (no ``://``) a SQLite file."""
    if url is None:
        return "sqlite://"
    if isinstance(url, Path) or "://" not in str(url):
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    return str(url)


def _create_parent_folder(url: str) -> None:
    """Create the folder of a SQLite file URL: SQLite creates the file but not its folder, and failed with "unable to
    open database file" for ``sqlite:///new-dir/ledger.db``."""
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def open_engine(url: str, *, wal: bool, synchronous: str, busy_timeout_s: float, echo: bool) -> Engine:
    """An engine on ``url`` (normalised); SQLite gets its busy timeout, one shared connection when in memory (else
    every checkout would see an empty database) and the pragmas of :func:`_configure_sqlite`."""
    kwargs: dict[str, Any] = {"echo": echo}
    is_sqlite = url.startswith("sqlite")
    memory = is_sqlite and url in ("sqlite://", "sqlite:///:memory:")
    if is_sqlite:
        kwargs["connect_args"] = {"timeout": busy_timeout_s, "check_same_thread": False}
        if memory:
            kwargs["poolclass"] = StaticPool
    if is_sqlite and not memory:
        _create_parent_folder(url)
    engine = create_engine(url, **kwargs)
    if is_sqlite:
        _configure_sqlite(engine, wal=wal and not memory, synchronous=synchronous, busy_ms=int(busy_timeout_s * 1000))
    return engine


def _configure_sqlite(engine: Engine, *, wal: bool, synchronous: str, busy_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # pysqlite's own transaction handling defers BEGIN and breaks BEGIN IMMEDIATE: take it over (SQLAlchemy docs,
        # "Serializable isolation / Savepoints / Transactional DDL").
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        if wal:
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute(f"PRAGMA busy_timeout={busy_ms}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # IMMEDIATE takes the write lock at BEGIN: a read-check-write (transition) cannot lose a race.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def open_schema(engine: Engine) -> None:
    """Create the tables (idempotent), migrate an older database (:func:`migrate`) and stamp ``SCHEMA_VERSION``."""
    metadata.create_all(engine)
    migrate(engine)
    with engine.begin() as conn:
        if _schema_version(conn) is None:
            try:
                conn.execute(insert(meta_table).values(key="schema_version", value=str(SCHEMA_VERSION)))
            except IntegrityError:  # another process created it first
                pass
        else:
            conn.execute(update(meta_table).where(meta_table.c.key == "schema_version").values(value=str(SCHEMA_VERSION)))


def _schema_version(conn: Connection) -> str | None:
    return conn.execute(select(meta_table.c.value).where(meta_table.c.key == "schema_version")).scalar_one_or_none()


def migrate(engine: Engine) -> None:
    """Bring an older database up to date in place.

    Version 1 -> 2: add ``batch_id`` (NULL for the old rows). Version 2 -> 3: add ``client_request_id`` and
    ``submitter``, fill them from ``request_id`` and ``client_id`` (before version 3 the ledger key was the
    client's id and the namespace was global, so every old row keeps its key and stays idempotent for its client),
    then the unique index on the pair. Version 3 -> 4: add ``actor`` (NULL for the old rows: who submitted them
    was not recorded; a console submission of an older version stays in its client's namespace) and the
    ``batch_leases`` table (``create_all``). Each step is idempotent, so a crash mid-migration or two processes
    opening the file together leave it consistent: the fill runs again until ``schema_version`` says 3.
    """
    def columns() -> set[str]:
        return {c["name"] for c in inspect(engine).get_columns("deletion_requests")}

    columns_added = (
        ("batch_id", "VARCHAR(64)"), ("client_request_id", "VARCHAR(256)"), ("submitter", "VARCHAR(256)"), ("actor", "VARCHAR(256)"),
    )
    for name, sql_type in columns_added:
        if name not in columns():
            try:
                with engine.begin() as conn:
                    conn.exec_driver_sql(f"ALTER TABLE deletion_requests ADD COLUMN {name} {sql_type}")
            except Exception:  # noqa: BLE001 - another process added it first
                if name not in columns():
                    raise
    with engine.connect() as conn:
        version = _schema_version(conn)
    if version is not None and int(version) < 3:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":  # SQLite's INTEGER is already 64-bit
                conn.exec_driver_sql("ALTER TABLE deletion_requests ALTER COLUMN label TYPE BIGINT")
            conn.execute(
                update(requests_table).where(requests_table.c.client_request_id.is_(None))
                .values(client_request_id=requests_table.c.request_id)
            )
            conn.execute(
                update(requests_table).where(requests_table.c.submitter.is_(None)).values(submitter=requests_table.c.client_id)
            )
            conn.exec_driver_sql(
                "CREATE UNIQUE INDEX IF NOT EXISTS ux_deletion_requests_submitter_rid "
                "ON deletion_requests (submitter, client_request_id)"
            )
