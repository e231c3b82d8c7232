"""The ledger backends every ledger test runs over, as Optuna's ``testing/storages.py`` runs its storage tests over
``STORAGE_MODES``: SQLite in a file, SQLite in memory (one handle) and PostgreSQL (a throwaway server).

The PostgreSQL server is started once per session in a temporary directory on 127.0.0.1 (initdb + postgres, as the
``postgres`` user when the tests run as root) and stopped by PID; each test gets a fresh database on it. Tests on the
``postgresql`` backend skip when the PostgreSQL binaries or the psycopg driver are missing. Cost: ~2 s to start the
server, ~0.1 s per fresh database.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from erasus_ray.ledger import DeletionLedger

#: every backend; ``SHARED_BACKENDS`` are those several handles (servers, threads, a reopen) can share
LEDGER_BACKENDS = ("sqlite-file", "sqlite-memory", "postgresql")
SHARED_BACKENDS = ("sqlite-file", "postgresql")
#: the operator key set on every PostgreSQL test database: a shared ledger takes console submissions only with it
KEY = "pg-test-operator-key"


@dataclass
class LedgerDatabase:
    """One test database: its URL, and what each handle on it needs (the operator key on a shared ledger)."""

    backend: str
    url: str | None
    handle: dict[str, Any] = field(default_factory=dict)

    def open(self, **kwargs: Any) -> DeletionLedger:
        return DeletionLedger(self.url, **self.handle, **kwargs)


def database_for(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> LedgerDatabase:
    """A fresh database on ``backend`` (the PostgreSQL one with ``KEY`` set); skips when the backend is missing."""
    if backend == "sqlite-file":
        return LedgerDatabase(backend, f"sqlite:///{tmp_path / 'ledger.db'}")
    if backend == "sqlite-memory":
        return LedgerDatabase(backend, None)
    if backend == "postgresql":
        url = new_pg_database(request.getfixturevalue("pg_server"))
        return LedgerDatabase(backend, url, {"operator_key": KEY})
    raise ValueError(f"unknown ledger backend {backend!r}; backends are {LEDGER_BACKENDS}")


def new_pg_database(port: int, *, operator_key: str | None = KEY) -> str:
    """Create a fresh database on the throwaway server (with ``operator_key`` set unless None): its SQLAlchemy URL."""
    import psycopg

    name = f"t{os.getpid()}_{time.monotonic_ns()}"
    with psycopg.connect(f"host=127.0.0.1 port={port} user=erasus dbname=postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://erasus@127.0.0.1:{port}/{name}"
    if operator_key is not None:
        with DeletionLedger(url) as led:
            led.set_operator_key(operator_key)
    return url


def _binary(name: str) -> str | None:
    for candidate in (f"/usr/local/bin/{name}", shutil.which(name), f"/usr/lib/postgresql/15/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="session")
def pg_server() -> Iterator[int]:
    """A throwaway PostgreSQL server for the session: its port. Skips without the binaries or psycopg."""
    psycopg = pytest.importorskip("psycopg")
    initdb, postgres = _binary("initdb"), _binary("postgres")
    if initdb is None or postgres is None:
        pytest.skip("PostgreSQL binaries (initdb, postgres) not found")
    prefix: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="erasus-pg-"))
    if os.geteuid() == 0:  # postgres refuses to run as root
        if shutil.which("setpriv") is None:
            shutil.rmtree(base)
            pytest.skip("running as root without setpriv: cannot start postgres as another user")
        try:
            shutil.chown(base, "postgres", "postgres")
        except (LookupError, PermissionError):
            shutil.rmtree(base)
            pytest.skip("running as root and there is no 'postgres' user to run the server")
        os.chmod(base, 0o755)
        prefix = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
    data = base / "data"
    init = subprocess.run(prefix + [initdb, "-D", str(data), "-U", "erasus", "--auth=trust", "-E", "UTF8", "--no-sync"],
                          capture_output=True, text=True, timeout=120)
    if init.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"initdb failed: {init.stderr[-500:]}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        prefix + [postgres, "-D", str(data), "-p", str(port), "-k", str(base), "-c", "listen_addresses=127.0.0.1",
                  "-c", "fsync=off", "-c", "max_connections=50"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(f"host=127.0.0.1 port={port} user=erasus dbname=postgres", connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"postgres did not start: {(base / 'server.log').read_text()[-2000:]}")
                time.sleep(0.1)
        yield port
    finally:
        proc.send_signal(signal.SIGINT)  # fast shutdown, by PID
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        shutil.rmtree(base, ignore_errors=True)
