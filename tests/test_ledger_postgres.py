"""The deletion ledger on a real PostgreSQL server (``postgresql+psycopg://``): the same state machine, per-submitter
idempotency, schema migration and audit export as on SQLite, and the per-client rate limit under concurrent
submitters (two "server" engines, several threads each): the advisory lock keeps it exact under READ COMMITTED.

A throwaway server is started in a temporary directory on 127.0.0.1 (initdb + postgres, as the ``postgres`` user when
the tests run as root) and stopped by PID. Skipped when the PostgreSQL binaries or the psycopg driver are missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy")
psycopg = pytest.importorskip("psycopg")

from sqlalchemy import event  # noqa: E402

from erasus_ray.errors import InvalidRequestError  # noqa: E402
from erasus_ray.ledger import DeletionLedger, DeletionRequest, OwnershipRegistry, RequestLimits, scoped_key  # noqa: E402


def _binary(name: str) -> str | None:
    for candidate in (f"/usr/local/bin/{name}", shutil.which(name), f"/usr/lib/postgresql/15/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def pg_url():
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


#: the operator key set on every test database: a shared ledger takes console submissions only with it
KEY = "pg-test-operator-key"


@pytest.fixture
def pg_bare(pg_url):
    """A fresh database per test, no operator key set: its SQLAlchemy URL."""
    port = pg_url
    name = f"t{os.getpid()}_{time.monotonic_ns()}"
    with psycopg.connect(f"host=127.0.0.1 port={port} user=erasus dbname=postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://erasus@127.0.0.1:{port}/{name}"


@pytest.fixture
def pg_db(pg_bare):
    """A fresh database per test with the operator key ``KEY`` set: its SQLAlchemy URL."""
    with DeletionLedger(pg_bare) as led:
        led.set_operator_key(KEY)
    return pg_bare


@pytest.fixture
def owners() -> OwnershipRegistry:
    return OwnershipRegistry({"alice": range(0, 10), "bob": range(10, 20), "carol": range(20, 30)},
                             labels={i: i % 3 for i in range(30)}, operators=["server"])


def test_lifecycle_idempotency_and_export_on_postgresql(pg_db: str, owners: OwnershipRegistry) -> None:
    with DeletionLedger(pg_db, operator_key=KEY) as led:
        assert led.is_postgresql
        a = led.submit(DeletionRequest("r-1", "alice", ids=[3, 1], reason="GDPR"), owners, sender="alice")
        assert a.state == "validated" and a.request_id == "r-1"
        # another client re-sending it learns nothing; its own request under the same id lands on its own
        replay = led.submit(DeletionRequest("r-1", "alice", ids=[3, 1], reason="GDPR"), owners, sender="bob")
        assert replay.seq != a.seq and replay.error_code == "impersonation" and replay.request_id == scoped_key("r-1", "bob")
        c = led.submit(DeletionRequest("r-1", "carol", ids=[20]), owners, sender="carol")
        assert c.state == "validated" and c.request_id == scoped_key("r-1", "carol")
        with pytest.raises(InvalidRequestError) as info:
            led.submit(DeletionRequest("r-1", "carol", ids=[21]), owners, sender="carol")
        assert info.value.code == "conflict" and "validated" not in str(info.value)
        assert led.submit(DeletionRequest("r-1", "alice", ids=[1, 3], reason="GDPR"), owners, sender="alice").seq == a.seq
        # a 64-bit label and the batch path through SELECT ... FOR UPDATE
        big = led.submit(DeletionRequest("r-big", "server", "class", label=2**40), owners)
        assert big.state == "rejected" and big.label == 2**40
        batch = led.schedule_pending(batch_id="b-1", round=2)
        assert [e.request_id for e in batch] == ["r-1", c.request_id]
        led.record_results({e.request_id: {"new_state": "unlearned", "coreset_ids": e.ids} for e in batch})
        led.transition("r-1", "verified")
        audit = led.export(hash_ids=True)
        assert {(r["submitter"], r["client_request_id"], r["state"]) for r in audit} >= {
            ("alice", "r-1", "verified"), ("bob", "r-1", "rejected"), ("carol", "r-1", "unlearned")}
        assert led.check_integrity() == []


def test_a_version_2_schema_migrates_on_postgresql(pg_db: str, owners: OwnershipRegistry) -> None:
    with DeletionLedger(pg_db, operator_key=KEY) as led:
        led.submit(DeletionRequest("old", "alice", ids=[1]), owners)
        with led.engine.begin() as conn:
            conn.exec_driver_sql("DROP INDEX ux_deletion_requests_submitter_rid")
            conn.exec_driver_sql("ALTER TABLE deletion_requests DROP COLUMN submitter, DROP COLUMN client_request_id")
            conn.exec_driver_sql("UPDATE ledger_meta SET value = '2' WHERE key = 'schema_version'")
    with DeletionLedger(pg_db, operator_key=KEY) as led:
        old = led.get("old")
        assert (old.submitter, old.client_request_id) == ("alice", "old") and led.check_integrity() == []
        assert led.submit(DeletionRequest("old", "alice", ids=[1]), owners, sender="alice").seq == old.seq
        assert led.submit(DeletionRequest("old", "bob", ids=[10]), owners, sender="bob").request_id == scoped_key("old", "bob")


def _admitted(url: str, owners: OwnershipRegistry, *, lock: bool, rpm: int = 3, n_threads: int = 8) -> int:
    """n_threads submit distinct requests for one client at the same instant through two engines (two servers); a
    pause right after the rate-limit COUNT makes every transaction count before any other commits unless they are
    serialised. Returns how many were validated."""
    ledgers = [DeletionLedger(url, operator_key=KEY), DeletionLedger(url, operator_key=KEY)]
    for led in ledgers:
        led.is_postgresql = lock  # False: the lock is skipped (the control)

        @event.listens_for(led.engine, "after_cursor_execute")
        def _pause(conn, cursor, statement, *args):  # noqa: ANN001
            if statement.lstrip().upper().startswith("SELECT COUNT"):
                time.sleep(0.3)

    limits = RequestLimits(max_ids=10, max_requests_per_minute=rpm)
    now = time.time()
    states: list[str] = []
    barrier = threading.Barrier(n_threads)

    def go(k: int) -> None:
        barrier.wait()
        states.append(ledgers[k % 2].submit(DeletionRequest(f"rate-{lock}-{k}", "alice", ids=[k]), owners, limits, now=now).state)

    threads = [threading.Thread(target=go, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(states) == n_threads
    assert ledgers[0].check_integrity() == []
    for led in ledgers:
        led.close()
    return states.count("validated")


def test_rate_limit_is_exact_with_concurrent_submitters(pg_db: str, owners: OwnershipRegistry) -> None:
    assert _admitted(pg_db, owners, lock=True) == 3
    # the control: without the per-client advisory lock READ COMMITTED lets every racing submitter through
    with DeletionLedger(pg_db, operator_key=KEY) as led:
        with led.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM deletion_transitions")
            conn.exec_driver_sql("DELETE FROM deletion_requests")
    assert _admitted(pg_db, owners, lock=False) > 3


def test_fuzzed_and_nul_bearing_requests_are_rejected_not_crashing(pg_db: str, owners: OwnershipRegistry) -> None:
    """PostgreSQL checks what SQLite lets through (32-bit INTEGER, NUL in text): every hostile submission must still
    end as a stored rejection with a reason."""
    import sys

    import numpy as np

    sys.path.insert(0, str(Path(__file__).parent))
    from test_ledger import _malformed

    rng = np.random.default_rng(1)
    limits = RequestLimits(max_ids=16, max_requests_per_minute=None)
    with DeletionLedger(pg_db, operator_key=KEY) as led:
        nul = [
            {"request_id": "nul-1", "client_id": "ali\x00ce", "ids": [1]},
            {"request_id": "nul-2", "client_id": "alice", "ids": [1], "reason": "x\x00y"},
            {"request_id": "nul\x00-3", "client_id": "alice", "ids": [1]},
            {"request_id": "nul-4", "client_id": "alice", "level": "sam\x00ple", "ids": [1]},
        ]
        for payload in nul + [_malformed(rng, k, owners) for k in range(300)]:
            entry = led.submit(payload, owners, limits)
            assert entry.state == "rejected" and entry.state_reason and entry.error_code, (payload, entry)
        assert led.check_integrity() == [] and led.export(hash_ids=True)


def test_two_servers_share_batches_by_lease_on_postgresql(pg_db: str, owners: OwnershipRegistry) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_ledger import two_servers_share_batches_by_lease

    two_servers_share_batches_by_lease(pg_db, owners, operator_key=KEY)


def test_a_shared_ledger_refuses_console_submissions_without_an_operator_key(pg_bare: str, owners: OwnershipRegistry) -> None:
    from erasus_ray.errors import UnauthorizedRequestError

    with DeletionLedger(pg_bare) as led:
        assert led.shared
        with pytest.raises(UnauthorizedRequestError, match="set-operator-key") as info:
            led.submit(DeletionRequest("r-1", "alice", ids=[1]), owners)
        assert info.value.code == "operator_key" and led.entries() == []
        assert led.submit(DeletionRequest("r-1", "alice", ids=[1]), owners, sender="alice").state == "validated"
