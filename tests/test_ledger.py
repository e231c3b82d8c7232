"""Deletion requests, validation and the durable ledger: state machine, idempotency, audit export, CLI, crash safety
(a worker SIGKILLed at random points in 20 seeded trials) and a fuzz of 1000+ malformed requests.

One suite over every backend (``ledger_backends.py``): the ``ledger`` fixture runs on SQLite in a file, SQLite in
memory and PostgreSQL; tests that need several handles on one database (``shared_database``) on the file and on
PostgreSQL. Tests named ``..._on_postgresql`` cover what only PostgreSQL has (advisory locks under READ COMMITTED, its
migrations, its stricter types); the PostgreSQL cases skip without the server binaries or psycopg.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sqlalchemy")

from sqlalchemy import event  # noqa: E402

from erasus_ray.errors import (  # noqa: E402
    IllegalTransitionError,
    InvalidConfigError,
    InvalidRequestError,
    UnauthorizedRequestError,
    UnknownRequestError,
)
from erasus_ray.ledger import (  # noqa: E402
    DeletionLedger,
    DeletionRequest,
    OwnershipRegistry,
    RequestLimits,
    console_submitter,
    hash_id_list,
    scoped_key,
    validate,
)

sys.path.insert(0, str(Path(__file__).parent))
import ledger_crash_worker  # noqa: E402
from ledger_backends import (  # noqa: E402
    KEY,
    LEDGER_BACKENDS,
    SHARED_BACKENDS,
    LedgerDatabase,
    database_for,
    new_pg_database,
    pg_server,  # noqa: F401 - a fixture
)
from erasus_ray.ledger.ledger import SCHEMA_VERSION  # noqa: E402


@pytest.fixture
def owners() -> OwnershipRegistry:
    labels = {i: i % 3 for i in range(30)}
    return OwnershipRegistry(
        {"alice": range(0, 10), "bob": range(10, 20), "carol": range(20, 30)}, labels=labels, operators=["server"]
    )


@pytest.fixture(params=LEDGER_BACKENDS)
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> DeletionLedger:
    """A fresh ledger on each backend (SQLite file, SQLite in memory, PostgreSQL)."""
    with database_for(request.param, request, tmp_path).open() as led:
        yield led


@pytest.fixture(params=SHARED_BACKENDS)
def shared_database(request: pytest.FixtureRequest, tmp_path: Path) -> LedgerDatabase:
    """A fresh database several handles can share (a SQLite file, PostgreSQL): open handles with ``.open()``."""
    return database_for(request.param, request, tmp_path)


# ---- requests and validation ----------------------------------------------------------------------------------------
def test_request_round_trips_through_plain_dict_and_record() -> None:
    req = DeletionRequest("r-1", "alice", "sample", ids=[np.int64(3), 1], reason="art. 17", created_at=12.5)
    assert req.ids == [3, 1] and all(type(i) is int for i in req.ids)
    assert DeletionRequest.from_dict(req.to_dict()) == req
    record = req.to_record()
    assert "label" not in record and None not in record.values()  # Flower ConfigRecords hold no None
    assert DeletionRequest.from_record(record) == req
    json.dumps(req.to_dict())
    # same content, other creation time and id order: the same request for idempotency
    assert DeletionRequest("r-1", "alice", "sample", ids=[1, 3], reason="art. 17").fingerprint() == req.fingerprint()
    assert DeletionRequest("r-1", "alice", "sample", ids=[1, 4], reason="art. 17").fingerprint() != req.fingerprint()


def test_request_travels_as_a_flower_config_record(owners: OwnershipRegistry) -> None:
    flwr_app = pytest.importorskip("flwr.app")
    req = DeletionRequest("r-1", "alice", "sample", ids=[1, 2], reason="x")
    record = flwr_app.ConfigRecord(req.to_record())
    assert DeletionRequest.from_record(record) == req
    assert DeletionLedger().submit(record, owners).state == "validated"


@pytest.mark.parametrize(
    "payload, code, words",
    [
        ({"request_id": "r", "client_id": "alice", "ids": []}, "empty_ids", "empty"),
        ({"request_id": "r", "client_id": "alice"}, "empty_ids", "needs 'ids'"),
        ({"request_id": "r", "client_id": "alice", "ids": [1, 1]}, "malformed", "repeats"),
        ({"request_id": "r", "client_id": "alice", "ids": [1, "2"]}, "malformed", "integers"),
        ({"request_id": "r", "client_id": "alice", "ids": [True]}, "malformed", "integers"),
        ({"request_id": "r", "client_id": "alice", "ids": [-1]}, "malformed", "negative"),
        ({"request_id": "r", "client_id": "alice", "ids": "1,2"}, "malformed", "list"),
        ({"request_id": "r", "client_id": "alice", "level": "everything", "ids": [1]}, "malformed", "level"),
        ({"request_id": "r", "client_id": "alice", "level": "class"}, "malformed", "label"),
        ({"request_id": "r", "client_id": "alice", "level": "client", "ids": [1]}, "malformed", "neither"),
        ({"request_id": "", "client_id": "alice", "ids": [1]}, "malformed", "request_id"),
        ({"request_id": "r", "client_id": "a b", "ids": [1]}, "malformed", "client_id"),
        ({"request_id": "r", "ids": [1]}, "malformed", "missing"),
        ({"request_id": "r", "client_id": "alice", "idz": [1]}, "malformed", "unknown field"),
        ({"request_id": "r", "client_id": "alice", "ids": [1], "created_at": float("nan")}, "malformed", "created_at"),
        ({"request_id": "r", "client_id": "alice", "ids": [1], "reason": 5}, "malformed", "reason"),
    ],
)
def test_malformed_fields_are_refused_with_the_field_named(payload: dict, code: str, words: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        DeletionRequest.from_dict(payload)
    assert info.value.code == code
    assert words in str(info.value)


def test_validate_checks_ownership_size_and_rate(owners: OwnershipRegistry) -> None:
    limits = RequestLimits(max_ids=3, max_requests_per_minute=100)
    validate(DeletionRequest("a", "alice", ids=[0, 9]), owners, limits)
    with pytest.raises(UnauthorizedRequestError) as info:  # bob's ids
        validate(DeletionRequest("b", "alice", ids=[1, 12, 15]), owners, limits)
    assert info.value.code == "not_owner" and "[12, 15]" in str(info.value)
    with pytest.raises(InvalidRequestError) as info:
        validate(DeletionRequest("c", "alice", ids=[1, 99]), owners, limits)
    assert info.value.code == "unknown_ids" and "[99]" in str(info.value)
    with pytest.raises(InvalidRequestError) as info:
        validate(DeletionRequest("d", "alice", ids=[0, 1, 2, 3]), owners, limits)
    assert info.value.code == "too_many_ids"
    with pytest.raises(UnauthorizedRequestError) as info:
        validate(DeletionRequest("e", "mallory", ids=[0]), owners, limits)
    assert info.value.code == "unknown_client"
    validate(DeletionRequest("f", "server", ids=[0, 12, 25]), owners, limits)  # the operator may name any id
    with pytest.raises(UnauthorizedRequestError) as info:  # bob's node sends a request in alice's name
        validate(DeletionRequest("i", "alice", ids=[0]), owners, sender="bob")
    assert info.value.code == "impersonation"
    validate(DeletionRequest("j", "alice", ids=[0]), owners, sender="alice")
    validate(DeletionRequest("k", "alice", ids=[0]), owners, sender="server")  # an operator may relay

    # rate: 2 per minute per client, a sliding window
    rate = RequestLimits(max_ids=10, max_requests_per_minute=2)
    validate(DeletionRequest("g1", "alice", ids=[0]), owners, rate, now=0.0)
    validate(DeletionRequest("g2", "alice", ids=[0]), owners, rate, now=10.0)
    validate(DeletionRequest("h1", "bob", ids=[10]), owners, rate, now=11.0)  # another client's own budget
    with pytest.raises(InvalidRequestError) as info:
        validate(DeletionRequest("g3", "alice", ids=[0]), owners, rate, now=30.0)
    assert info.value.code == "rate_limited"
    validate(DeletionRequest("g4", "alice", ids=[0]), owners, rate, now=60.5)  # the first one left the window


def test_resolve_class_and_client_levels_by_hand(owners: OwnershipRegistry) -> None:
    # labels are id % 3
    assert owners.resolve(DeletionRequest("a", "alice", "class", label=1)).tolist() == [1, 4, 7]
    assert owners.resolve(DeletionRequest("b", "server", "class", label=2)).tolist() == list(range(2, 30, 3))
    assert owners.resolve(DeletionRequest("c", "bob", "client")).tolist() == list(range(10, 20))
    with pytest.raises(InvalidRequestError) as info:
        validate(DeletionRequest("d", "alice", "class", label=7), owners)
    assert info.value.code == "empty_ids"
    with pytest.raises(Exception, match="owned by both"):
        OwnershipRegistry({"x": [1, 2], "y": [2]})


# ---- the ledger -----------------------------------------------------------------------------------------------------
def test_lifecycle_transitions_history_and_export(ledger: DeletionLedger, owners: OwnershipRegistry, tmp_path: Path) -> None:
    entry = ledger.submit(DeletionRequest("r-1", "alice", ids=[3, 1, 2]), owners)
    assert entry.state == "validated" and entry.accepted and entry.ids == [3, 1, 2]
    ledger.transition("r-1", "scheduled", round=4)
    with pytest.raises(IllegalTransitionError, match="cannot go from 'scheduled' to 'verified'"):
        ledger.transition("r-1", "verified")
    ledger.record_result(
        "r-1", coreset_ids=[3, 1], strategy="grad_diff", model_hash_before="h0", model_hash_after="h1",
        metrics={"forget_acc": np.float32(0.25)}, new_state="unlearned",
    )
    ledger.record_result("r-1", metrics={"retain_acc": 0.99})  # merged, no transition
    ledger.transition("r-1", "verified", forget_acc=0.0)
    with pytest.raises(IllegalTransitionError, match="final state"):
        ledger.transition("r-1", "scheduled")
    with pytest.raises(UnknownRequestError):
        ledger.transition("nope", "scheduled")
    with pytest.raises(InvalidConfigError, match="needs a reason"):
        ledger.transition("r-1", "failed")

    got = ledger.get("r-1")
    assert (got.state, got.coreset_ids, got.strategy) == ("verified", [1, 3], "grad_diff")
    assert got.metrics == {"forget_acc": 0.25, "retain_acc": 0.99}
    assert [(t.from_state, t.to_state) for t in ledger.history("r-1")] == [
        (None, "received"), ("received", "validated"), ("validated", "scheduled"), ("scheduled", "unlearned"),
        ("unlearned", "verified"),
    ]
    assert ledger.history("r-1")[2].details == {"round": 4}
    times = [t.at for t in ledger.history("r-1")]
    assert times == sorted(times)

    out = tmp_path / "audit.json"
    plain = ledger.export()
    hashed = ledger.export(out, hash_ids=True)
    assert plain[0]["ids"] == [3, 1, 2] and plain[0]["coreset_ids"] == [1, 3]
    assert "ids" not in hashed[0] and hashed[0]["ids_sha256"] == hash_id_list([1, 2, 3])
    assert hashed[0]["model_hash_after"] == "h1" and len(hashed[0]["transitions"]) == 5
    doc = json.loads(out.read_text())
    assert doc["hash_ids"] is True and doc["requests"][0]["request_id"] == "r-1"
    assert "3, 1, 2" not in out.read_text()
    assert ledger.check_integrity() == []


def test_export_replaces_the_audit_file_atomically(
    ledger: DeletionLedger, owners: OwnershipRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash before the new audit file is published (here: its fsync fails) leaves the previous export whole and no
    temp file beside it; the next export replaces it."""
    from erasus_ray.utils import atomic

    folder = tmp_path / "audit"
    folder.mkdir()
    out = folder / "audit.json"
    ledger.submit(DeletionRequest("r-1", "alice", ids=[1]), owners)
    ledger.export(out)
    old = out.read_bytes()
    ledger.submit(DeletionRequest("r-2", "alice", ids=[2]), owners)

    def crash(_fd: int) -> None:
        raise OSError("simulated crash before the audit file is published")

    with monkeypatch.context() as patch:
        patch.setattr(atomic.os, "fsync", crash)
        with pytest.raises(OSError, match="simulated"):
            ledger.export(out)
    assert out.read_bytes() == old and [p.name for p in folder.iterdir()] == ["audit.json"]
    ledger.export(out)
    assert [r["request_id"] for r in json.loads(out.read_text())["requests"]] == ["r-1", "r-2"]
    assert [p.name for p in folder.iterdir()] == ["audit.json"]


def test_submit_is_idempotent_and_refuses_conflicts(
    ledger: DeletionLedger, owners: OwnershipRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    first = ledger.submit(DeletionRequest("r-1", "alice", ids=[1, 2], created_at=1.0), owners)
    again = ledger.submit({"request_id": "r-1", "client_id": "alice", "ids": [2, 1], "created_at": 99.0}, owners)
    assert again.seq == first.seq and again.state == "validated"
    assert len(ledger.entries()) == 1 and len(ledger.history("r-1")) == 2
    ledger.transition("r-1", "scheduled")
    assert ledger.submit(DeletionRequest("r-1", "alice", ids=[1, 2]), owners).state == "scheduled"  # no reset
    with pytest.raises(InvalidRequestError) as info:
        ledger.submit(DeletionRequest("r-1", "alice", ids=[1, 2, 3]), owners)
    assert info.value.code == "conflict"
    assert ledger.get("r-1").ids == [1, 2] and len(ledger.history("r-1")) == 3

    # a refused request is logged with its reason and stays refused
    with caplog.at_level("WARNING", logger="erasus_ray.ledger"):
        bad = ledger.submit(DeletionRequest("r-2", "alice", ids=[15]), owners)
    assert "r-2" in caplog.text and "not_owner" in caplog.text
    assert bad.state == "rejected" and bad.error_code == "not_owner" and "[15]" in bad.state_reason
    assert ledger.submit(DeletionRequest("r-2", "alice", ids=[15]), owners).seq == bad.seq
    assert not bad.accepted and ledger.counts() == {"scheduled": 1, "rejected": 1}


def test_compare_and_set_and_concurrent_submits(shared_database: LedgerDatabase, owners: OwnershipRegistry) -> None:
    a, b = shared_database.open(), shared_database.open()
    a.submit(DeletionRequest("r-1", "alice", ids=[1]))
    b.transition("r-1", "scheduled", expected="validated")
    with pytest.raises(IllegalTransitionError, match="another worker"):
        a.transition("r-1", "scheduled", expected="validated")

    # 8 threads on two engines race to submit the same 20 requests: each lands once
    errors: list[Exception] = []

    def submit_all(led: DeletionLedger, seed: int) -> None:
        order = np.random.default_rng(seed).permutation(20)
        try:
            for k in order:
                led.submit(DeletionRequest(f"c-{k}", "bob", ids=[10 + int(k) % 10]), owners)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=submit_all, args=((a, b)[s % 2], s)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(a.entries(client_id="bob")) == 20
    assert all(len(a.history(f"c-{k}")) == 2 for k in range(20))
    assert a.check_integrity() == []
    a.close()
    b.close()


def test_pending_survives_reopen_oldest_first(tmp_path: Path, owners: OwnershipRegistry) -> None:
    path = tmp_path / "restart.db"
    with DeletionLedger(path) as led:  # a plain path means SQLite
        for k in range(4):
            led.submit(DeletionRequest(f"r-{k}", "carol", ids=[20 + k]), owners)
        led.transition("r-1", "scheduled")
        led.transition("r-2", "scheduled")
        led.record_result("r-2", coreset_ids=[22], new_state="unlearned")
        led.transition("r-2", "verified")
        led.submit(DeletionRequest("r-x", "carol", ids=[1]), owners)  # rejected
    with DeletionLedger(f"sqlite:///{path}") as led:
        assert [(e.request_id, e.state) for e in led.pending()] == [("r-0", "validated"), ("r-1", "scheduled"), ("r-3", "validated")]
        assert [e.request_id for e in led.pending(states=["scheduled"])] == ["r-1"]
        with led.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    with pytest.raises(InvalidConfigError, match="unknown state"):
        DeletionLedger().pending(states=["done"])


def test_schedule_pending_batches_a_round(ledger: DeletionLedger, owners: OwnershipRegistry) -> None:
    for k in range(5):
        ledger.submit(DeletionRequest(f"r-{k}", ["alice", "bob"][k % 2], ids=[k % 2 * 10 + k]), owners)
    ledger.submit(DeletionRequest("r-bad", "alice", ids=[11]), owners)
    first = ledger.schedule_pending(limit=3, round=1)
    assert [e.request_id for e in first] == ["r-0", "r-1", "r-2"] and {e.state for e in first} == {"scheduled"}
    assert ledger.history("r-1")[-1].details == {"round": 1}
    assert [e.request_id for e in ledger.schedule_pending(round=2)] == ["r-3", "r-4"]
    assert ledger.schedule_pending(round=3) == []
    assert ledger.counts() == {"scheduled": 5, "rejected": 1} and ledger.check_integrity() == []


def test_cli_list_show_export(tmp_path: Path, owners: OwnershipRegistry, capsys: pytest.CaptureFixture) -> None:
    from erasus_ray.cli import main

    db = tmp_path / "cli.db"
    with DeletionLedger(db) as led:
        led.submit(DeletionRequest("r-ok", "alice", ids=[1, 2]), owners)
        led.submit(DeletionRequest("r-bad", "alice", ids=[11]), owners)
    assert main(["ledger", "--db", str(db), "list"]) == 0
    out = capsys.readouterr().out
    assert "r-ok" in out and "validated" in out and "does not own" in out and "2 request(s)" in out
    with DeletionLedger(db) as led:
        led.schedule_pending(batch_id="batch-7")
    assert main(["ledger", "--db", str(db), "list", "--batch", "batch-7"]) == 0
    out = capsys.readouterr().out
    assert "batch-7" in out and "r-ok" in out and "r-bad" not in out and "1 request(s)" in out
    assert main(["ledger", "--db", f"sqlite:///{db}", "show", "r-ok"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["ids"] == [1, 2] and [t["to"] for t in shown["transitions"]] == ["received", "validated", "scheduled"]
    assert shown["batch_id"] == "batch-7" and shown["transitions"][-1]["details"] == {"batch": "batch-7"}
    target = tmp_path / "audit.json"
    assert main(["ledger", "--db", str(db), "export", "--out", str(target), "--hash-ids"]) == 0
    audit = json.loads(target.read_text())["requests"]
    assert {r["request_id"] for r in audit} == {"r-ok", "r-bad"} and all("ids" not in r for r in audit)
    capsys.readouterr()
    assert main(["ledger", "--db", str(db), "show", "nope"]) == 2
    assert main(["ledger", "--db", str(tmp_path / "missing.db"), "list"]) == 2
    assert "no ledger file" in capsys.readouterr().err


# ---- fuzz -----------------------------------------------------------------------------------------------------------
_WEIRD_VALUES = [None, 1.5, float("nan"), float("inf"), -3, 2**70, True, "", " ", "x" * 300, "r\n1", "ü", [], {}, [[1]],
                 {"a": 1}, b"bytes", "'; DROP TABLE deletion_requests; --", object()]


def _malformed(rng: np.random.Generator, k: int, owners: OwnershipRegistry) -> object:
    """A request that must be refused: one of many seeded ways to break a valid one."""
    base = {"request_id": f"fz-{k}", "client_id": "alice", "level": "sample", "ids": [int(rng.integers(0, 10))]}
    kind = int(rng.integers(0, 14))
    weird = _WEIRD_VALUES[int(rng.integers(0, len(_WEIRD_VALUES)))]
    if kind == 0:  # not a mapping at all
        return [[base], 1, "x", None, 3.5, (base,)][int(rng.integers(0, 6))]
    if kind == 1:  # a required field missing
        base.pop(["request_id", "client_id"][int(rng.integers(0, 2))])
    elif kind == 2:  # a field of the wrong type or an unusable value
        field = ["request_id", "client_id", "level", "ids"][int(rng.integers(0, 4))]
        base[field] = "1" if field == "ids" and weird == [] else weird
    elif kind == 3:  # an unknown extra field
        base[f"extra_{int(rng.integers(0, 99))}"] = weird if weird is not None else 1
    elif kind == 4:  # ids with a non-integer
        base["ids"] = [1, weird if not isinstance(weird, int) or isinstance(weird, bool) else "7"]
    elif kind == 5:
        base["ids"] = []
    elif kind == 6:  # repeated or negative ids
        base["ids"] = [2, 2] if rng.random() < 0.5 else [-int(rng.integers(1, 100))]
    elif kind == 7:  # too many ids (limit 16)
        base["client_id"] = "server"
        base["ids"] = list(range(int(rng.integers(17, 30))))
    elif kind == 8:  # ids nobody owns
        base["ids"] = [int(rng.integers(30, 10**9))]
    elif kind == 9:  # another client's ids
        base["ids"] = [int(rng.integers(10, 30))]
    elif kind == 10:  # a level with the wrong fields
        base.update([{"level": "class"}, {"level": "client"}, {"level": "class", "label": 1}][int(rng.integers(0, 3))])
    elif kind == 11:  # an unknown client
        base["client_id"] = f"mallory-{int(rng.integers(0, 5))}"
    elif kind == 12:  # bad created_at / reason / an integer too large to store
        choice = int(rng.integers(0, 3))
        if choice == 0:
            base["created_at"] = [None, "soon", float("nan"), float("inf"), -3, [], {}][int(rng.integers(0, 7))]
        elif choice == 1:
            base["reason"] = [None, 5, ["a"], "r" * 2001][int(rng.integers(0, 4))]
        else:
            base.update({"level": "class", "label": 2**70, "ids": None} if rng.random() < 0.5 else {"ids": [2**64]})
    else:  # a non-string key
        base[int(rng.integers(0, 9))] = 1
    return base


def test_fuzzed_malformed_requests_are_each_rejected_with_a_reason(tmp_path: Path, owners: OwnershipRegistry) -> None:
    rng = np.random.default_rng(0)
    limits = RequestLimits(max_ids=16, max_requests_per_minute=None)
    with DeletionLedger(f"sqlite:///{tmp_path / 'fuzz.db'}", synchronous="NORMAL") as led:
        valid = 0
        for k in range(1200):
            payload = _malformed(rng, k, owners)
            entry = led.submit(payload, owners, limits)
            assert entry.state == "rejected", (payload, entry)
            assert entry.state_reason and len(entry.state_reason) > 10 and entry.error_code
            if k % 100 == 0:  # valid requests still go through between the bad ones
                good = led.submit(DeletionRequest(f"ok-{k}", "bob", ids=[10 + (k // 100) % 10]), owners, limits)
                assert good.state == "validated"
                valid += 1
        counts = led.counts()
        assert counts["validated"] == valid
        assert led.check_integrity() == []
        codes = {e.error_code for e in led.entries(states=["rejected"])}
        assert {"malformed", "empty_ids", "too_many_ids", "unknown_ids", "not_owner", "unknown_client"} <= codes
        assert led.export(hash_ids=True)  # the audit export serialises every stored rejection
        json.dumps(led.export())


# ---- crash safety ---------------------------------------------------------------------------------------------------
def _crash_requests(rng: np.random.Generator) -> tuple[list[dict], set[str], dict[str, list[int]]]:
    owners = {"alice": list(range(0, 10)), "bob": list(range(10, 20)), "carol": list(range(20, 30))}
    free = {c: list(rng.permutation(ids)) for c, ids in owners.items()}
    requests, valid = [], set()
    for k in range(8):
        client = ["alice", "bob", "carol"][k % 3]
        if k in (3, 6):  # refused: another client's id / an unknown id
            ids = [int(owners["bob" if client != "bob" else "alice"][0])] if k == 3 else [999]
        else:
            ids = [int(free[client].pop()) for _ in range(int(rng.integers(1, 3)))]
            valid.add(f"req-{k}")
        requests.append({"request_id": f"req-{k}", "client_id": client, "ids": ids})
    return requests, valid, owners


def test_worker_sigkilled_at_random_points_completes_every_request_exactly_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")  # forked from this process: no 1-7 s re-import per restart
    n_points = 8 + 6 * 5  # submissions + 5 crash points per valid request, roughly
    kills_total = 0
    for trial in range(20):
        rng = np.random.default_rng(1000 + trial)
        requests, valid, owners = _crash_requests(rng)
        db = f"sqlite:///{tmp_path / f'crash{trial}.db'}"
        model_path = tmp_path / f"model{trial}.json"
        ledger_crash_worker.save_model(
            model_path, {"weights": {str(i): 1.0 for i in range(30)}, "touches": {}, "applied": []}
        )
        # 1-3 crashes at seeded points (some as external SIGKILLs at a random moment), then a clean run
        for _ in range(int(rng.integers(1, 4))):
            external = rng.random() < 0.3
            kill_at = 0 if external else int(rng.integers(1, n_points))
            proc = ctx.Process(target=ledger_crash_worker.serve, args=(db, str(model_path), requests, owners, kill_at))
            proc.start()
            if external:
                proc.join(float(rng.uniform(0.0, 0.15)))
                proc.kill()
            proc.join(60)
            kills_total += proc.exitcode == -9
            assert proc.exitcode in (0, -9), proc.exitcode
        proc = ctx.Process(target=ledger_crash_worker.serve, args=(db, str(model_path), requests, owners, 0))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0

        with DeletionLedger(db) as led:
            assert led.check_integrity() == []
            entries = {e.request_id: e for e in led.entries()}
            assert set(entries) == {r["request_id"] for r in requests}  # each stored once
            assert {rid for rid, e in entries.items() if e.state == "verified"} == valid, trial
            assert {rid for rid, e in entries.items() if e.state == "rejected"} == {"req-3", "req-6"}
            assert led.pending() == []
            for rid in valid:
                to = [t.to_state for t in led.history(rid)]
                assert to.count("received") == 1 and to.count("unlearned") == 1 and to.count("verified") == 1, (trial, to)
        model = ledger_crash_worker.load_model(model_path)
        applied = [a["request_id"] for a in model["applied"]]
        assert sorted(applied) == sorted(valid), (trial, applied)  # every accepted request, none twice
        forgotten = {i for r in requests if r["request_id"] in valid for i in r["ids"]}
        assert all(model["touches"][str(i)] == 1 for i in forgotten)
        assert all(model["weights"][str(i)] == (0.0 if i in forgotten else 1.0) for i in range(30))
        by_rid = {a["request_id"]: a for a in model["applied"]}
        assert all(entries[rid].model_hash_after == by_rid[rid]["after"] for rid in valid)
    assert kills_total >= 20  # the trials really crashed the worker


def test_fresh_interpreter_resumes_after_sigkill(tmp_path: Path) -> None:
    """The same protocol across real process restarts (no state inherited by fork): kill, start anew, finish."""
    import os
    import signal
    import subprocess

    rng = np.random.default_rng(7)
    requests, valid, owners = _crash_requests(rng)
    model_path = tmp_path / "model.json"
    ledger_crash_worker.save_model(model_path, {"weights": {str(i): 1.0 for i in range(30)}, "touches": {}, "applied": []})
    package = Path(__file__).resolve().parents[1] / "erasus_ray"
    # load erasus_ray.ledger without erasus_ray/__init__ (which imports torch: seconds per start on a loaded machine)
    code = (
        "import json, sys, types\n"
        f"pkg = types.ModuleType('erasus_ray'); pkg.__path__ = [{str(package)!r}]; sys.modules['erasus_ray'] = pkg\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import ledger_crash_worker\n"
        "ledger_crash_worker.serve(**json.load(open(sys.argv[1])))\n"
    )
    exitcodes = []
    for kill_at in (5, 17, 0):
        args = tmp_path / f"args{kill_at}.json"
        args.write_text(json.dumps({"db": str(tmp_path / "fresh.db"), "model_path": str(model_path), "requests": requests,
                                    "owners": owners, "kill_at": kill_at}))
        proc = subprocess.run([sys.executable, "-c", code, str(args)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": ""})
        exitcodes.append(proc.returncode)
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-2000:]
    assert exitcodes == [-signal.SIGKILL, -signal.SIGKILL, 0]
    with DeletionLedger(tmp_path / "fresh.db") as led:
        assert {e.request_id for e in led.entries(states=["verified"])} == valid
        assert led.pending() == [] and led.check_integrity() == []
    applied = [a["request_id"] for a in ledger_crash_worker.load_model(model_path)["applied"]]
    assert sorted(applied) == sorted(valid)


def test_a_request_changed_after_construction_is_rechecked(ledger: DeletionLedger) -> None:
    req = DeletionRequest("r-1", "alice", ids=[1])
    req.label = 2**70  # type: ignore[assignment]  # would overflow a 64-bit column
    entry = ledger.submit(req)
    assert entry.state == "rejected" and "label" in entry.state_reason and entry.request_id == "r-1"
    assert ledger.check_integrity() == []
    req2 = DeletionRequest("r-2", "alice", ids=[1])
    req2.ids = 5  # type: ignore[assignment]
    assert ledger.submit(req2).state == "rejected"


def test_submit_with_an_authenticated_sender_refuses_impersonation(ledger: DeletionLedger, owners: OwnershipRegistry) -> None:
    entry = ledger.submit(DeletionRequest("r-1", "alice", ids=[1]), owners, sender="bob")
    assert entry.state == "rejected" and entry.error_code == "impersonation" and "'bob'" in entry.state_reason
    # stored in bob's namespace under a scoped key: it squats nothing of alice's
    assert (entry.submitter, entry.client_request_id, entry.request_id) == ("bob", "r-1", scoped_key("r-1", "bob"))
    assert [t.to_state for t in ledger.history(entry.request_id)] == ["received", "rejected"]
    assert ledger.find("r-1") is None
    genuine = ledger.submit(DeletionRequest("r-1", "alice", ids=[1]), owners, sender="alice")
    assert genuine.state == "validated" and genuine.request_id == "r-1" and genuine.submitter == "alice"
    assert ledger.submit(DeletionRequest("r-2", "alice", ids=[1]), owners, sender="alice").state == "validated"


# ---- idempotency is per submitter (security) ---------------------------------------------------------------------------
def test_another_client_resending_a_request_id_learns_nothing_and_squats_nothing(
    ledger: DeletionLedger, owners: OwnershipRegistry, tmp_path: Path
) -> None:
    a = ledger.submit(DeletionRequest("r-1", "alice", ids=[1, 2], reason="alice's secret"), owners, sender="alice")
    ledger.transition(a.request_id, "scheduled", round=3)
    # bob re-sends alice's exact request: the sender check runs first, bob gets his own rejected copy, not alice's entry
    replay = ledger.submit(DeletionRequest("r-1", "alice", ids=[1, 2], reason="alice's secret"), owners, sender="bob")
    assert replay.seq != a.seq and replay.request_id != "r-1" and replay.submitter == "bob"
    assert replay.state == "rejected" and replay.error_code == "impersonation"
    assert "scheduled" not in replay.state_reason and "[1, 2]" not in replay.state_reason
    # carol uses the same client-supplied id for her own request: no collision, no error, nothing of alice's state
    own = ledger.submit(DeletionRequest("r-1", "carol", ids=[20]), owners, sender="carol")
    assert own.state == "validated" and own.client_request_id == "r-1" and own.request_id == scoped_key("r-1", "carol")
    assert own.seq not in (a.seq, replay.seq)
    # retries are idempotent in each namespace; a different content under one's own id is a conflict naming no state
    assert ledger.submit(DeletionRequest("r-1", "carol", ids=[20]), owners, sender="carol").seq == own.seq
    assert ledger.submit(DeletionRequest("r-1", "alice", ids=[1, 2], reason="alice's secret"), owners, sender="bob").seq == replay.seq
    for sender, request in (("carol", DeletionRequest("r-1", "carol", ids=[21])), ("bob", DeletionRequest("r-1", "bob", ids=[10]))):
        with pytest.raises(InvalidRequestError) as info:
            ledger.submit(request, owners, sender=sender)
        assert info.value.code == "conflict"
        for word in ("scheduled", "validated", "rejected", "alice", "[1, 2]", "secret"):
            assert word not in str(info.value)
    # alice's genuine retry is still idempotent and her request is untouched
    again = ledger.submit(DeletionRequest("r-1", "alice", ids=[2, 1], reason="alice's secret"), owners, sender="alice")
    assert (again.seq, again.state, again.request_id) == (a.seq, "scheduled", "r-1")
    assert len(ledger.history("r-1")) == 3
    # lookups by (submitter, client-supplied id)
    assert ledger.find("r-1", client_id="carol").seq == own.seq and ledger.get("r-1", "alice").seq == a.seq
    assert ledger.find("r-1", client_id="bob").seq == replay.seq and ledger.find("r-2", client_id="alice") is None
    # the audit export lists all three, each with its client's id and the submitter
    audit = ledger.export(tmp_path / "audit.json", hash_ids=True)
    rows = {(r["submitter"], r["client_id"], r["client_request_id"], r["state"]) for r in audit}
    assert rows == {("alice", "alice", "r-1", "scheduled"), ("bob", "alice", "r-1", "rejected"), ("carol", "carol", "r-1", "validated")}
    assert ledger.check_integrity() == []


def test_without_a_sender_two_clients_may_share_a_request_id(ledger: DeletionLedger, owners: OwnershipRegistry) -> None:
    """The operator console (no sender): the namespace is the console's, per client named in the request."""
    a = ledger.submit(DeletionRequest("same", "alice", ids=[1]), owners)
    b = ledger.submit(DeletionRequest("same", "bob", ids=[10]), owners)
    assert (a.request_id, b.request_id) == ("same", scoped_key("same", console_submitter("bob")))
    assert a.state == b.state == "validated" and ledger.get(b.request_id).ids == [10]
    assert ledger.submit(DeletionRequest("same", "bob", ids=[10]), owners).seq == b.seq
    assert [e.request().request_id for e in ledger.entries()] == ["same", "same"]  # as each client sent it
    assert [e.request_id for e in ledger.schedule_pending(batch_id="b1")] == ["same", b.request_id]


def test_concurrent_clients_racing_for_one_request_id_each_get_their_own(
    shared_database: LedgerDatabase, owners: OwnershipRegistry
) -> None:
    ledgers = [shared_database.open() for _ in range(3)]
    out: dict[str, list] = {}
    errors: list[Exception] = []

    def go(k: int, client: str, ids: list[int]) -> None:
        try:
            out.setdefault(client, []).append(ledgers[k % 3].submit(DeletionRequest("dup", client, ids=ids), owners, sender=client).seq)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    jobs = [(k, c, i) for k in range(4) for c, i in (("alice", [1]), ("bob", [10]), ("carol", [20]))]
    threads = [threading.Thread(target=go, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(len(set(seqs)) == 1 for seqs in out.values()) and len({s[0] for s in out.values()}) == 3
    entries = ledgers[0].entries()
    assert sorted(e.client_id for e in entries) == ["alice", "bob", "carol"]
    assert sum(e.request_id == "dup" for e in entries) == 1 and ledgers[0].check_integrity() == []
    for led in ledgers:
        led.close()


# ---- batches and the persisted rate limit ----------------------------------------------------------------------------
def test_batches_are_scheduled_and_recorded_together(ledger: DeletionLedger, owners: OwnershipRegistry) -> None:
    for k in range(3):
        ledger.submit(DeletionRequest(f"r-{k}", "alice", ids=[k]), owners)
    first = ledger.schedule_pending(batch_id="batch-1", round=3)
    assert [e.batch_id for e in first] == ["batch-1"] * 3
    assert ledger.history("r-0")[-1].details == {"batch": "batch-1", "round": 3}
    ledger.submit(DeletionRequest("r-3", "alice", ids=[3]), owners)
    # a waiting batch takes in a request validated later; entries(batch_id=) lists the whole batch
    assert [e.request_id for e in ledger.schedule_pending(batch_id="batch-1", round=4)] == ["r-3"]
    assert [e.request_id for e in ledger.entries(batch_id="batch-1")] == ["r-0", "r-1", "r-2", "r-3"]
    with pytest.raises(InvalidConfigError, match="batch_id"):
        ledger.schedule_pending(batch_id="bad id")

    # record_results is one transaction: an illegal move anywhere leaves every request of the batch as it was
    moves = {f"r-{k}": {"new_state": "unlearned", "coreset_ids": [k], "batch": "batch-1"} for k in range(4)}
    with pytest.raises(IllegalTransitionError):
        ledger.record_results({**moves, "r-3": {"new_state": "verified"}})
    assert {e.state for e in ledger.entries(batch_id="batch-1")} == {"scheduled"}
    assert all(e.coreset_ids is None for e in ledger.entries())
    done = ledger.record_results(moves)
    assert [(e.state, e.coreset_ids) for e in done] == [("unlearned", [k]) for k in range(4)]
    ledger.record_results({"r-0": {"new_state": "verified"}, "r-1": {"new_state": "failed", "reason": "gap 0.9"}})
    assert ledger.get("r-1").state_reason == "gap 0.9" and ledger.history("r-2")[-1].details == {"batch": "batch-1"}
    with pytest.raises(InvalidConfigError, match="needs a reason"):
        ledger.record_results({"r-2": {"new_state": "failed"}})
    assert ledger.export()[0]["batch_id"] == "batch-1" and ledger.check_integrity() == []


def test_a_version_1_ledger_file_gains_the_batch_column(tmp_path: Path, owners: OwnershipRegistry) -> None:
    path = tmp_path / "v1.db"
    with DeletionLedger(path) as led:
        led.submit(DeletionRequest("old", "alice", ids=[1]), owners)
        with led.engine.begin() as conn:  # what a ledger written before batches looks like
            conn.exec_driver_sql("ALTER TABLE deletion_requests DROP COLUMN batch_id")
            conn.exec_driver_sql("UPDATE ledger_meta SET value = '1' WHERE key = 'schema_version'")
    with DeletionLedger(path) as led:
        assert led.get("old").batch_id is None and led.get("old").state == "validated"
        assert led.schedule_pending(batch_id="b-1")[0].batch_id == "b-1"
        with led.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT value FROM ledger_meta WHERE key = 'schema_version'").scalar() == str(SCHEMA_VERSION)


def test_a_version_2_ledger_file_gains_per_submitter_idempotency(tmp_path: Path, owners: OwnershipRegistry) -> None:
    """A file written before schema 3 (global request ids, no submitter columns): its rows keep their keys and stay
    idempotent for their clients; another client can then use the same id."""
    path = tmp_path / "v2.db"
    with DeletionLedger(path) as led:
        led.submit(DeletionRequest("old", "alice", ids=[1]), owners)
        led.submit(DeletionRequest("old-bad", "bob", ids=[1]), owners)
        with led.engine.begin() as conn:  # what a version-2 file looks like
            conn.exec_driver_sql("DROP INDEX ux_deletion_requests_submitter_rid")
            conn.exec_driver_sql("ALTER TABLE deletion_requests DROP COLUMN submitter")
            conn.exec_driver_sql("ALTER TABLE deletion_requests DROP COLUMN client_request_id")
            conn.exec_driver_sql("UPDATE ledger_meta SET value = '2' WHERE key = 'schema_version'")
    with DeletionLedger(path) as led:
        old = led.get("old")
        assert (old.submitter, old.client_request_id, old.state) == ("alice", "old", "validated")
        assert led.get("old-bad").submitter == "bob" and led.check_integrity() == []
        assert led.submit(DeletionRequest("old", "alice", ids=[1]), owners, sender="alice").seq == old.seq  # idempotent
        with pytest.raises(InvalidRequestError, match="already used"):
            led.submit(DeletionRequest("old", "alice", ids=[2]), owners, sender="alice")
        other = led.submit(DeletionRequest("old", "bob", ids=[10]), owners, sender="bob")
        assert other.state == "validated" and other.request_id == scoped_key("old", "bob")
        with led.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT value FROM ledger_meta WHERE key = 'schema_version'").scalar() == str(SCHEMA_VERSION)
            with pytest.raises(Exception, match="UNIQUE"):  # the index is there
                conn.exec_driver_sql(
                    "INSERT INTO deletion_requests (request_id, client_id, level, reason, fingerprint, state, received_at, updated_at, "
                    "client_request_id, submitter) VALUES ('x', 'alice', 'sample', '', 'f', 'validated', 0, 0, 'old', 'alice')"
                )


def test_rate_limit_is_counted_from_the_ledger_and_survives_a_reopen(
    shared_database: LedgerDatabase, owners: OwnershipRegistry
) -> None:
    t0 = 1_700_000_000.0
    with shared_database.open() as led:
        limits = RequestLimits(max_ids=10, max_requests_per_minute=2)
        assert led.submit(DeletionRequest("a-1", "alice", ids=[0]), owners, limits, now=t0).state == "validated"
        assert led.submit(DeletionRequest("a-bad", "alice", ids=[15]), owners, limits, now=t0 + 1).state == "rejected"
        assert led.submit(DeletionRequest("a-2", "alice", ids=[1]), owners, limits, now=t0 + 2).state == "validated"
    # a restarted server: new ledger object, new limits object - the window is in the rows, not in memory
    with shared_database.open() as led:
        limits = RequestLimits(max_ids=10, max_requests_per_minute=2)
        over = led.submit(DeletionRequest("a-3", "alice", ids=[2]), owners, limits, now=t0 + 30)
        assert over.state == "rejected" and over.error_code == "rate_limited" and "2 accepted request(s)" in over.state_reason
        assert led.submit(DeletionRequest("b-1", "bob", ids=[10]), owners, limits, now=t0 + 30).state == "validated"  # own budget
        assert led.submit(DeletionRequest("a-4", "alice", ids=[3]), owners, limits, now=t0 + 60.5).state == "validated"
        assert led.submit(DeletionRequest("a-5", "alice", ids=[4]), owners, limits, now=t0 + 61).state == "rejected"
        assert led.submit(DeletionRequest("a-6", "alice", ids=[5]), owners, limits, now=t0 + 62.5).state == "validated"
        assert led.submit(DeletionRequest("a-4", "alice", ids=[3]), owners, limits, now=t0 + 63).state == "validated"  # idempotent
        assert led.check_integrity() == []


# ---- hardening (issue #24): timestamps, console attribution, no enumeration oracle -----------------------------------
@pytest.mark.parametrize("claim", [1e20, 2**70, 4_102_444_801, -1, float("inf")])
def test_an_out_of_range_created_at_is_refused_at_the_door(ledger: DeletionLedger, owners: OwnershipRegistry, claim) -> None:
    with pytest.raises(InvalidRequestError, match="created_at") as info:
        DeletionRequest("r-1", "alice", ids=[1], created_at=claim)
    assert info.value.code == "malformed"
    entry = ledger.submit({"request_id": "r-1", "client_id": "alice", "ids": [1], "created_at": claim}, owners, sender="alice")
    assert entry.state == "rejected" and "created_at" in entry.state_reason and "2100" in entry.state_reason
    assert ledger.export() and ledger.submit(DeletionRequest("r-2", "alice", ids=[1]), owners, sender="alice").state == "validated"
    assert DeletionRequest("r-3", "alice", ids=[1], created_at=4_102_444_800).created_at == 4_102_444_800.0  # the bound itself


def test_stored_timestamps_no_date_can_show_do_not_break_audit_reads(
    tmp_path: Path, owners: OwnershipRegistry, capsys: pytest.CaptureFixture
) -> None:
    """Rows written before the bound (or by hand): a 1e20 claim, a NaN and text in a timestamp column, a transition
    at 1e300. Every audit read (API and CLI) still answers, showing what cannot be a date as ``invalid:<value>``."""
    from erasus_ray.cli import main

    db = tmp_path / "old.db"
    with DeletionLedger(db) as led:
        for k in range(3):
            led.submit(DeletionRequest(f"r-{k}", "alice", ids=[k]), owners)
        with led.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE deletion_requests SET created_at = 1e20 WHERE request_id = 'r-0'")
            conn.exec_driver_sql("UPDATE deletion_requests SET created_at = 'junk', updated_at = 'x' WHERE request_id = 'r-1'")
            conn.exec_driver_sql("UPDATE deletion_transitions SET at = 1e300 WHERE request_id = 'r-2'")
        audit = {r["request_id"]: r for r in led.export(tmp_path / "audit.json")}
        assert audit["r-0"]["created_at"] == "invalid:1e+20" and audit["r-1"]["updated_at"] == "invalid:x"
        assert audit["r-2"]["transitions"][0]["at"] == "invalid:1e+300"
        assert led.get("r-0").request().created_at == 0.0  # the stored request stays usable (resolve, revalidate)
        assert led.get("r-1").request().ids == [1]
    for argv in (["list"], ["list", "--json"], ["export"], ["show", "r-0"], ["show", "r-2"]):
        capsys.readouterr()
        assert main(["ledger", "--db", str(db), *argv]) == 0, argv
        assert "r-" in capsys.readouterr().out


def test_a_client_learns_only_that_ids_are_not_its_own(ledger: DeletionLedger, owners: OwnershipRegistry) -> None:
    """``unknown_ids`` vs ``not_owner`` would tell a client which ids another client holds: one answer for both."""
    foreign = ledger.submit(DeletionRequest("r-1", "alice", ids=[15]), owners, sender="alice")  # bob's id
    unknown = ledger.submit(DeletionRequest("r-2", "alice", ids=[999]), owners, sender="alice")  # nobody's
    assert foreign.error_code == unknown.error_code == "not_owner"
    assert foreign.state_reason.replace("[15]", "[N]") == unknown.state_reason.replace("[999]", "[N]")
    mixed = ledger.submit(DeletionRequest("r-3", "alice", ids=[1, 15, 999]), owners, sender="alice")
    assert mixed.error_code == "not_owner" and "[15, 999]" in mixed.state_reason and "2 of" in mixed.state_reason
    # the ledger's own audit keeps the split (never sent to the client)
    assert ledger.history(foreign.request_id)[-1].details["detail"] == {"unknown_ids": 0, "other_clients_ids": 1}
    assert ledger.history(unknown.request_id)[-1].details["detail"] == {"unknown_ids": 1, "other_clients_ids": 0}
    with pytest.raises(UnauthorizedRequestError) as info:
        validate(DeletionRequest("k", "alice", ids=[999]), owners, sender="alice")
    assert info.value.code == "not_owner"
    # the operator's console and an operator sender keep the detail
    assert ledger.submit(DeletionRequest("r-4", "alice", ids=[999]), owners).error_code == "unknown_ids"
    assert ledger.submit(DeletionRequest("r-5", "server", ids=[999]), owners, sender="server").error_code == "unknown_ids"


def test_console_submissions_are_recorded_as_operator_actions(ledger: DeletionLedger, owners: OwnershipRegistry) -> None:
    from erasus_ray.ledger.ledger import console_user

    entry = ledger.submit(DeletionRequest("r-1", "alice", ids=[1]), owners)  # the console, in alice's name
    assert entry.operator_action and entry.actor == f"console:{console_user()}" and entry.submitter == console_submitter("alice")
    assert ledger.history("r-1")[0].details == {"actor": entry.actor, "on_behalf_of": "alice"}
    shown = entry.to_dict()
    assert shown["operator_action"] is True and shown["actor"] == entry.actor and shown["client_id"] == "alice"
    own = ledger.submit(DeletionRequest("r-2", "alice", ids=[2]), owners, sender="alice")
    assert not own.operator_action and own.actor == "node:alice" and own.submitter == "alice"
    assert ledger.history(own.request_id)[0].details == {"actor": "node:alice"}
    with pytest.raises(InvalidConfigError, match="sender"):
        ledger.submit(DeletionRequest("r-3", "alice", ids=[3]), owners, sender=console_submitter("alice"))


def test_a_malformed_console_submission_does_not_squat_the_clients_request_id(
    ledger: DeletionLedger, owners: OwnershipRegistry
) -> None:
    forged = ledger.submit({"request_id": "r-9", "client_id": "alice", "ids": "1"}, owners)  # malformed, alice's name
    assert forged.state == "rejected" and forged.operator_action
    # alice's own r-9 is hers: validated, not the console's rejection replayed, not a conflict
    own = ledger.submit(DeletionRequest("r-9", "alice", ids=[1]), owners, sender="alice")
    assert own.state == "validated" and own.seq != forged.seq and own.client_request_id == "r-9" and own.submitter == "alice"
    assert ledger.submit(DeletionRequest("r-9", "alice", ids=[1]), owners, sender="alice").seq == own.seq
    # an accepted console action in alice's name does not take her id either
    relayed = ledger.submit(DeletionRequest("r-10", "alice", ids=[2]), owners)
    mine = ledger.submit(DeletionRequest("r-10", "alice", ids=[3]), owners, sender="alice")
    assert relayed.state == mine.state == "validated" and relayed.seq != mine.seq and ledger.check_integrity() == []


def test_a_shared_ledger_takes_console_submissions_only_with_the_operator_key(tmp_path: Path, owners: OwnershipRegistry) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    key = "k" * 20
    with DeletionLedger(url) as led:
        assert not led.shared
        with pytest.raises(InvalidConfigError, match="16"):
            led.set_operator_key("short")
        led.set_operator_key(key)
        assert led.shared
        with pytest.raises(UnauthorizedRequestError) as info:
            led.submit(DeletionRequest("r-1", "alice", ids=[1]), owners)
        assert info.value.code == "operator_key" and led.entries() == []  # nothing written
        with pytest.raises(UnauthorizedRequestError, match="wrong"):
            led.submit(DeletionRequest("r-1", "alice", ids=[1]), owners, operator_key="x" * 20)
        assert led.submit(DeletionRequest("r-1", "alice", ids=[1]), owners, operator_key=key).state == "validated"
        # a node's client needs no operator key: its identity is the authenticated sender
        assert led.submit(DeletionRequest("r-2", "bob", ids=[10]), owners, sender="bob").state == "validated"
        with pytest.raises(UnauthorizedRequestError, match="current"):
            led.set_operator_key("n" * 20)
        led.set_operator_key("n" * 20, current=key)
    with DeletionLedger(url, operator_key="n" * 20) as led:  # the handle carries the console's key
        assert led.submit(DeletionRequest("r-3", "alice", ids=[3]), owners).operator_action
        assert led.get("r-3").to_dict()["operator_action"] and "operator_key" not in json.dumps(led.export())


# ---- two servers on one ledger: batch leases (issue #24 item 10) -------------------------------------------------------
def test_two_servers_on_one_database_share_batches_by_lease(shared_database: LedgerDatabase, owners: OwnershipRegistry) -> None:
    """Two ledger handles on one database (two servers): a live lease keeps the other server off the batch without
    an error; an expired lease (a crashed server) is taken over; the old owner then finds it lost the batch."""
    a, b = shared_database.open(), shared_database.open()
    try:
        for k in range(3):
            a.submit(DeletionRequest(f"r-{k}", "alice", ids=[k]), owners, sender="alice")
        assert len(a.schedule_pending(batch_id="batch-1", owner="srv-a", lease_s=60, round=1)) == 3
        assert a.history("r-0")[-1].details == {"batch": "batch-1", "owner": "srv-a", "round": 1}
        b.submit(DeletionRequest("r-3", "alice", ids=[3]), owners, sender="alice")
        # srv-b must not join or drive srv-a's live batch: nothing scheduled, no error
        assert b.schedule_pending(batch_id="batch-1", owner="srv-b", lease_s=60) == []
        assert b.get("r-3").state == "validated" and not b.claim_batch("batch-1", "srv-b", lease_s=60)
        lease = b.batch_lease("batch-1")
        assert lease.owner == "srv-a" and lease.live()
        assert a.claim_batch("batch-1", "srv-a", lease_s=60)  # renewal by its owner
        # srv-a crashes: once its lease has run out, srv-b takes the batch over; srv-a (if it wakes) has lost it
        later = time.time() + 120
        assert b.claim_batch("batch-1", "srv-b", lease_s=600, now=later)
        assert b.batch_lease("batch-1").owner == "srv-b" and not a.claim_batch("batch-1", "srv-a", lease_s=60)
        assert not a.release_batch("batch-1", "srv-a") and b.release_batch("batch-1", "srv-b")
        assert b.batch_lease("batch-1") is None
        # a race for a fresh batch: exactly one server schedules it
        results: dict[str, list] = {}
        threads = [
            threading.Thread(target=lambda led=led, who=who: results.__setitem__(who, led.schedule_pending(batch_id="batch-2", owner=who)))
            for led, who in ((a, "srv-a"), (b, "srv-b"))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(len(v) for v in results.values()) == [0, 1] and a.check_integrity() == []
        with pytest.raises(InvalidConfigError, match="lease_s"):
            a.claim_batch("batch-2", "srv-a", lease_s=0)
        with pytest.raises(InvalidConfigError, match="batch_id"):
            a.schedule_pending(owner="srv-a")
    finally:
        a.close()
        b.close()



def test_scoped_keys_batches_and_a_64_bit_label_round_trip(ledger: DeletionLedger, owners: OwnershipRegistry) -> None:
    """Per-submitter idempotency, a 64-bit label (PostgreSQL's INTEGER is 32-bit) and a batch through
    ``SELECT ... FOR UPDATE``, end to end on each backend."""
    a = ledger.submit(DeletionRequest("r-1", "alice", ids=[3, 1], reason="GDPR"), owners, sender="alice")
    assert a.state == "validated" and a.request_id == "r-1"
    replay = ledger.submit(DeletionRequest("r-1", "alice", ids=[3, 1], reason="GDPR"), owners, sender="bob")
    assert replay.seq != a.seq and replay.error_code == "impersonation" and replay.request_id == scoped_key("r-1", "bob")
    c = ledger.submit(DeletionRequest("r-1", "carol", ids=[20]), owners, sender="carol")
    assert c.state == "validated" and c.request_id == scoped_key("r-1", "carol")
    assert ledger.submit(DeletionRequest("r-1", "alice", ids=[1, 3], reason="GDPR"), owners, sender="alice").seq == a.seq
    big = ledger.submit(DeletionRequest("r-big", "server", "class", label=2**40), owners)
    assert big.state == "rejected" and big.label == 2**40
    batch = ledger.schedule_pending(batch_id="b-1", round=2)
    assert [e.request_id for e in batch] == ["r-1", c.request_id]
    ledger.record_results({e.request_id: {"new_state": "unlearned", "coreset_ids": e.ids} for e in batch})
    ledger.transition("r-1", "verified")
    audit = ledger.export(hash_ids=True)
    assert {(r["submitter"], r["client_request_id"], r["state"]) for r in audit} >= {
        ("alice", "r-1", "verified"), ("bob", "r-1", "rejected"), ("carol", "r-1", "unlearned")}
    assert ledger.check_integrity() == []


# ---- what only PostgreSQL has: advisory locks, its migrations, its stricter types, no console without a key -------------
@pytest.fixture
def pg_database(pg_server: int) -> LedgerDatabase:  # noqa: F811 - pg_server is the imported fixture
    return LedgerDatabase("postgresql", new_pg_database(pg_server), {"operator_key": KEY})


def test_a_version_2_schema_migrates_on_postgresql(pg_database: LedgerDatabase, owners: OwnershipRegistry) -> None:
    with pg_database.open() as led:
        led.submit(DeletionRequest("old", "alice", ids=[1]), owners)
        with led.engine.begin() as conn:
            conn.exec_driver_sql("DROP INDEX ux_deletion_requests_submitter_rid")
            conn.exec_driver_sql("ALTER TABLE deletion_requests DROP COLUMN submitter, DROP COLUMN client_request_id")
            conn.exec_driver_sql("UPDATE ledger_meta SET value = '2' WHERE key = 'schema_version'")
    with pg_database.open() as led:
        old = led.get("old")
        assert (old.submitter, old.client_request_id) == ("alice", "old") and led.check_integrity() == []
        assert led.submit(DeletionRequest("old", "alice", ids=[1]), owners, sender="alice").seq == old.seq
        assert led.submit(DeletionRequest("old", "bob", ids=[10]), owners, sender="bob").request_id == scoped_key("old", "bob")


def _admitted(database: LedgerDatabase, owners: OwnershipRegistry, *, lock: bool, rpm: int = 3, n_threads: int = 8) -> int:
    """n_threads submit distinct requests for one client at the same instant through two engines (two servers); a
    pause right after the rate-limit COUNT makes every transaction count before any other commits unless they are
    serialised. Returns how many were validated."""
    ledgers = [database.open(), database.open()]
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


def test_rate_limit_is_exact_with_concurrent_submitters_on_postgresql(
    pg_database: LedgerDatabase, owners: OwnershipRegistry
) -> None:
    assert _admitted(pg_database, owners, lock=True) == 3
    # the control: without the per-client advisory lock READ COMMITTED lets every racing submitter through
    with pg_database.open() as led:
        with led.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM deletion_transitions")
            conn.exec_driver_sql("DELETE FROM deletion_requests")
    assert _admitted(pg_database, owners, lock=False) > 3


def test_fuzzed_and_nul_bearing_requests_are_rejected_not_crashing_on_postgresql(
    pg_database: LedgerDatabase, owners: OwnershipRegistry
) -> None:
    """PostgreSQL checks what SQLite lets through (32-bit INTEGER, NUL in text): every hostile submission must still
    end as a stored rejection with a reason."""
    rng = np.random.default_rng(1)
    limits = RequestLimits(max_ids=16, max_requests_per_minute=None)
    with pg_database.open() as led:
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


def test_a_shared_ledger_refuses_console_submissions_without_an_operator_key_on_postgresql(
    pg_server: int, owners: OwnershipRegistry  # noqa: F811 - pg_server is the imported fixture
) -> None:
    with DeletionLedger(new_pg_database(pg_server, operator_key=None)) as led:
        assert led.shared
        with pytest.raises(UnauthorizedRequestError, match="set-operator-key") as info:
            led.submit(DeletionRequest("r-1", "alice", ids=[1]), owners)
        assert info.value.code == "operator_key" and led.entries() == []
        assert led.submit(DeletionRequest("r-1", "alice", ids=[1]), owners, sender="alice").state == "validated"


# ---- the controller's verification decides the state ---------------------------------------------------------------
def test_the_ledger_records_the_controllers_verification_and_its_state_follows_it(owners: OwnershipRegistry) -> None:
    """Three real runs on wine (issue 14): the adaptive closed loop that forgets class 0 (passed), a fixed 10% coreset
    that the controller measures as failing on the whole forget set (measured forget accuracy 0.46), and a forget set
    with no measurable target (passed None). Each request's state is what its verification says - verified, failed
    with the failing criterion as the reason, unlearned with the reason kept - and the ledger stores the target and
    every criterion exactly as the controller measured them."""
    from erasus_ray import ErasusUnlearner
    from erasus_ray.benchmarks import load_benchmark
    from erasus_ray.ledger import verification_result

    b = load_benchmark("wine", scenario="class", seed=0)
    some = b.retain.subset(b.retain.ids[:10])
    runs = {
        "pass": ErasusUnlearner(b.original, progress=False).fit(forget_data=b.forget, retain_data=b.retain),
        "fail": ErasusUnlearner(b.original, selector="el2n", fraction=0.1, progress=False).fit(forget_data=b.forget, retain_data=b.retain),
        "none": ErasusUnlearner(b.original, selector=None, progress=False).fit(forget_data=some, retain_data=b.retain.subset(b.retain.ids[10:])),
    }
    assert [runs[k].verified for k in ("pass", "fail", "none")] == [True, False, None]
    with DeletionLedger("sqlite://") as led:
        for name, run in runs.items():
            led.submit(DeletionRequest(name, "alice", ids=[1, 2]), owners)
            led.transition(name, "scheduled")
            led.record_result(name, new_state="unlearned")
            led.record_verification(name, run.verification, metrics={"seconds": 1.0})
        states = {e.request_id: e.state for e in led.entries()}
        assert states == {"pass": "verified", "fail": "failed", "none": "unlearned"}
        for name, run in runs.items():
            m = led.get(name).metrics
            rec = m["verification"]
            assert m["verified"] is run.verified and m["seconds"] == 1.0
            assert rec["target"] == run.verification["target"] and rec["mode"] == run.verification["mode"]
            assert rec.get("criteria") == run.verification.get("criteria")
        fail = led.get("fail")
        (crit,) = runs["fail"].verification["criteria"]
        assert crit["name"] == "forget_acc" and f"forget_acc={crit['value']:.4g}" in fail.state_reason and "class target" in fail.state_reason
        assert "not verifiable" in led.get("none").metrics["verification"]["why"]
    # a verification that does not pass can never be recorded as verified
    assert verification_result({**runs["pass"].verification, "passed": False})["new_state"] == "failed"


def test_a_federated_request_fails_when_a_clients_controller_failed_even_if_the_server_rule_passes() -> None:
    """The coordinator's verdict: the server's rule against the retrain model and each owning client's controller
    verification decide together (erasus_ray.federated.coordinator._verify_batch)."""
    from erasus_ray.evaluation.verification import combined_verification, gold_rule_record
    from erasus_ray.ledger import verification_result

    checks = {"forget_acc": {"measurable": True, "gap_after": 0.01, "tolerance": 0.05, "passed": True, "closed_fraction": None},
              "mia_svc_efficacy": {"measurable": False}}
    server = gold_rule_record(True, checks, "")
    assert server["passed"] and [c["name"] for c in server["criteria"]] == ["gap_forget_acc"]
    ok = {"mode": "closed_loop", "target": "class", "passed": True}
    bad = {"mode": "closed_loop", "target": "heldout", "passed": False, "stopped": "budget spent"}
    unmeasured = {"mode": "unverified", "target": None, "passed": None}
    assert verification_result(combined_verification(server, {"client-0": [ok, unmeasured]}))["new_state"] == "verified"
    out = verification_result(combined_verification(server, {"client-0": [ok], "client-1": [bad]}))
    assert out["new_state"] == "failed" and "client-1: heldout target failed (budget spent)" in out["reason"]
    assert out["metrics"]["verification"]["parts"]["client-1"] == [bad] and out["metrics"]["verified"] is False


def test_reopen_is_the_only_way_out_of_verified(ledger: DeletionLedger, owners: OwnershipRegistry) -> None:
    ledger.submit(DeletionRequest("r-1", "alice", ids=[3]), owners)
    ledger.transition("r-1", "scheduled")
    ledger.record_result("r-1", metrics={"model_version": 1}, new_state="unlearned")
    ledger.transition("r-1", "verified")
    with pytest.raises(IllegalTransitionError, match="final state"):
        ledger.transition("r-1", "validated", reopened=True)  # a plain transition never takes the reopen edge
    with pytest.raises(InvalidConfigError, match="reason"):
        ledger.reopen(["r-1"], "")
    [entry] = ledger.reopen(["r-1", "nope"], "rolled back", metrics={"model_version": None})
    assert (entry.state, entry.state_reason, entry.metrics["model_version"]) == ("validated", "rolled back", None)
    assert ledger.history("r-1")[-1].details["reopened"] is True and ledger.check_integrity() == []
    assert ledger.reopen(["r-1"], "again") == []  # not verified any more: nothing to reopen
