"""The deletion service (issue 18) without Ray: the FastAPI app through ``TestClient`` and the plain worker, on the
wine benchmark (178 samples, a converged MLP; 4 clients own the train ids round-robin)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from erasus_ray.errors import InvalidConfigError
from erasus_ray.serve import DeletionService, ServeConfig, UnlearningWorker, create_app
from erasus_ray.serve.api import NOT_OWNER_MESSAGE


@pytest.fixture(scope="module")
def wine():
    from erasus_ray.benchmarks import load_benchmark

    return load_benchmark("wine", scenario="class", seed=0)


def _service(tmp_path, wine, **config):
    service = DeletionService(ServeConfig(benchmark="wine", state_dir=str(tmp_path / "state"), **config), benchmark=wine)
    keys = {name: service.keys.add(name) for name in ("client-0", "client-1")}
    keys["operator"] = service.keys.add("operator", role="operator")
    return service, TestClient(create_app(service)), keys


@pytest.fixture
def served(tmp_path, wine):
    service, client, keys = _service(tmp_path, wine)
    yield service, client, keys
    service.close()


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


def _post(client, key, **body):
    return client.post("/v1/deletions", json=body, headers=_auth(key))


def _predict(client, key, service):
    x = service.benchmark.test.base.x[:4].tolist()
    return client.post("/predict", json={"inputs": x}, headers=_auth(key))


def test_calls_without_a_valid_key_are_refused(served):
    service, client, keys = served
    mine = service.ownership.ids_of("client-0")[:2].tolist()
    assert client.post("/v1/deletions", json={"request_id": "r1", "ids": mine}).status_code == 401
    forged = keys["client-0"][:-4] + "AAAA"  # right client, wrong secret
    for key in (forged, "erk_client-0.nope", "not-a-key", keys["client-0"] + "x"):
        r = _post(client, key, request_id="r1", ids=mine)
        assert r.status_code == 401 and r.json()["detail"]["code"] == "unauthenticated"
    assert client.get("/v1/deletions", headers=_auth(forged)).status_code == 401
    assert service.ledger.entries() == []  # nothing reached the ledger
    # only hashes are stored: no key's secret appears in the ledger's meta table
    with service.ledger.engine.connect() as conn:
        stored = " ".join(v for (v,) in conn.exec_driver_sql("SELECT value FROM ledger_meta"))
    assert all(key.rpartition(".")[2] not in stored for key in keys.values())


def test_another_clients_ids_are_refused_without_naming_them(served):
    service, client, keys = served
    mine = service.ownership.ids_of("client-0")[:2].tolist()
    theirs = service.ownership.ids_of("client-1")[:3].tolist()
    r = _post(client, keys["client-0"], request_id="grab", ids=mine + theirs)
    assert r.status_code == 403
    detail = r.json()["detail"]
    assert detail["code"] == "not_owner" and detail["message"] == NOT_OWNER_MESSAGE
    assert "client-1" not in r.text
    # the refusal is recorded; reading it back shows neither who owns the ids nor the ledger's audit split
    status = client.get("/v1/deletions/grab", headers=_auth(keys["client-0"])).json()
    assert status["state"] == "rejected" and "client-1" not in json.dumps(status)
    assert all("detail" not in t["details"] for t in status["history"])
    assert service.ledger.get("grab").state == "rejected"


def test_a_client_reads_only_its_own_ids(served):
    service, client, keys = served
    own = client.get("/v1/ownership", headers=_auth(keys["client-0"])).json()
    assert own["ids"] == service.ownership.ids_of("client-0").tolist() and own["n_ids"] == len(own["ids"]) > 0
    assert not set(own["ids"]) & set(service.ownership.ids_of("client-1").tolist())
    assert client.get("/v1/ownership").status_code == 401


def test_another_clients_request_reads_like_a_missing_one(served):
    service, client, keys = served
    theirs = service.ownership.ids_of("client-1")[:2].tolist()
    assert _post(client, keys["client-1"], request_id="secret-1", ids=theirs).status_code == 202
    other = client.get("/v1/deletions/secret-1", headers=_auth(keys["client-0"]))
    missing = client.get("/v1/deletions/never-filed", headers=_auth(keys["client-0"]))
    assert other.status_code == missing.status_code == 404 and other.json() == missing.json()
    assert client.get("/v1/deletions", headers=_auth(keys["client-0"])).json() == {"requests": []}
    listed = client.get("/v1/deletions?state=validated", headers=_auth(keys["operator"])).json()["requests"]
    assert [e["request_id"] for e in listed] == ["secret-1"]


def test_operator_only_endpoints_refuse_clients(served):
    service, client, keys = served
    r = _post(client, keys["client-0"], request_id="cls", level="class", label=0)
    assert r.status_code == 403 and r.json()["detail"]["code"] == "operator_only"
    assert client.post("/v1/model/rollback", headers=_auth(keys["client-0"])).status_code == 403
    assert service.ledger.entries() == []
    assert _post(client, keys["operator"], request_id="cls", level="class", label=0).status_code == 202


def test_same_client_request_id_returns_the_same_request(served):
    service, client, keys = served
    mine = service.ownership.ids_of("client-0")[:2].tolist()
    first = _post(client, keys["client-0"], request_id="once", ids=mine)
    again = _post(client, keys["client-0"], request_id="once", ids=list(reversed(mine)))
    assert first.status_code == again.status_code == 202 and first.json() == again.json()
    assert len(service.ledger.entries()) == 1
    changed = _post(client, keys["client-0"], request_id="once", ids=mine[:1])
    assert changed.status_code == 409 and changed.json()["detail"]["code"] == "conflict"
    # another client may use the same id: its own request
    theirs = service.ownership.ids_of("client-1")[:1].tolist()
    other = _post(client, keys["client-1"], request_id="once", ids=theirs)
    assert other.status_code == 202 and other.json()["request_id"] != first.json()["request_id"]


def test_malformed_bodies_are_4xx_with_a_reason(served):
    service, client, keys = served
    for body in ({}, {"request_id": 5, "ids": [1]}, {"request_id": "x", "ids": ["1"]}, {"request_id": "x", "idz": [1]},
                 {"request_id": "x", "ids": []}, {"request_id": "x", "level": "galaxy"}, {"request_id": "bad id!", "ids": [1]}):
        r = _post(client, keys["client-0"], **body)
        assert 400 <= r.status_code < 500 and r.json()["detail"], (body, r.status_code, r.text)
    assert service.ledger.check_integrity() == []


def test_a_verified_deletion_publishes_a_new_version(served):
    service, client, keys = served
    assert _predict(client, keys["client-0"], service).json()["model_version"] == 0
    mine = service.ownership.ids_of("client-0")[:3].tolist()
    assert _post(client, keys["client-0"], request_id="forget-me", ids=mine).status_code == 202
    done = UnlearningWorker(service).run_once()
    assert done["published"] == 1
    status = client.get("/v1/deletions/forget-me", headers=_auth(keys["client-0"])).json()
    assert status["state"] == "verified" and status["model_version"] == 1
    assert status["metrics"]["verification"]["passed"] is True
    assert [t["to"] for t in status["history"]] == ["received", "validated", "scheduled", "unlearned", "verified"]
    assert _predict(client, keys["client-0"], service).json()["model_version"] == 1
    assert set(service.versions.meta(1)["forgotten_ids"]) == set(mine)
    assert UnlearningWorker(service).run_once() is None  # nothing left pending


def test_a_run_that_fails_verification_keeps_the_served_version(tmp_path, wine):
    # open loop, a step too small to move anything: the class target (forget accuracy <= 0.05) cannot hold
    service, client, keys = _service(tmp_path, wine, unlearner={"epochs": 1, "lr": 1e-12})
    try:
        before = client.post("/predict", json={"inputs": wine.forget.base.x[:4].tolist()}, headers=_auth(keys["operator"])).json()
        assert _post(client, keys["operator"], request_id="cls0", level="class", label=0).status_code == 202
        done = UnlearningWorker(service).run_once()
        assert done["published"] is None and done["verification"]["passed"] is False
        entry = service.ledger.get("cls0")
        assert entry.state == "failed" and "not verified" in entry.state_reason
        after = client.post("/predict", json={"inputs": wine.forget.base.x[:4].tolist()}, headers=_auth(keys["operator"])).json()
        assert after == before and after["model_version"] == 0 and service.versions.current == 0
    finally:
        service.close()


def test_operator_rolls_back_to_the_previous_version(served):
    service, client, keys = served
    mine = service.ownership.ids_of("client-0")[:2].tolist()
    _post(client, keys["client-0"], request_id="r", ids=mine)
    assert UnlearningWorker(service).run_once()["published"] == 1
    r = client.post("/v1/model/rollback", headers=_auth(keys["operator"]))
    assert r.status_code == 200 and r.json() == {"model_version": 0, "reopened": ["r"]}
    assert _predict(client, keys["client-1"], service).json()["model_version"] == 0
    again = client.post("/v1/model/rollback", headers=_auth(keys["operator"]))
    assert again.status_code == 409 and again.json()["detail"]["code"] == "no_previous_version"
    # the rolled-back version carried request r: it is owed again, and the next round serves it in a new version
    reopened = service.ledger.get("r")
    assert reopened.state == "validated" and reopened.state_reason.startswith("reopened: model version 1")
    assert reopened.metrics["model_version"] is None and service.ledger.check_integrity() == []
    assert UnlearningWorker(service).run_once()["published"] == 2  # not "already served by v1": v1 is off the lineage
    entry = service.ledger.get("r")
    assert entry.state == "verified" and entry.metrics["model_version"] == 2 and service.versions.lineage() == [2, 0]
    assert [t["to"] for t in client.get("/v1/deletions/r", headers=_auth(keys["client-0"])).json()["history"]][-4:] == \
        ["validated", "scheduled", "unlearned", "verified"]


def test_a_rollback_that_crashed_before_reopening_is_reopened_by_the_next_worker(served):
    service, client, keys = served
    _post(client, keys["client-0"], request_id="r", ids=service.ownership.ids_of("client-0")[:2].tolist())
    assert UnlearningWorker(service).run_once()["published"] == 1
    service.versions.rollback()  # the index is written, the process dies before the ledger is told
    assert service.ledger.get("r").state == "verified"
    UnlearningWorker(service)
    assert service.ledger.get("r").state == "validated"


def test_config_is_validated_with_the_key_named():
    with pytest.raises(InvalidConfigError, match="port"):
        ServeConfig.from_mapping({"port": 0})
    with pytest.raises(InvalidConfigError, match="benchmark"):
        ServeConfig.from_mapping({"benchmark": "imagenet"})
    with pytest.raises(InvalidConfigError, match="batch_sise"):
        ServeConfig.from_mapping({"batch_sise": 3})


def test_a_worker_killed_after_publishing_is_resumed_without_a_second_version(served, monkeypatch):
    """The crash window between publishing a version and recording its requests: the next worker finds the requests
    ``scheduled``, sees a published version serving them, and records them verified - no second run, no v2."""
    service, client, keys = served
    mine = service.ownership.ids_of("client-0")[:2].tolist()
    _post(client, keys["client-0"], request_id="crash", ids=mine)

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed after publishing")

    monkeypatch.setattr(UnlearningWorker, "_record", die)
    with pytest.raises(KeyboardInterrupt):
        UnlearningWorker(service).run_once()
    monkeypatch.undo()
    assert service.versions.current == 1 and service.ledger.get("crash").state == "scheduled"
    resumed = UnlearningWorker(service).run_once()
    assert resumed == {"published": None, "requests": [], "resumed": True}
    entry = service.ledger.get("crash")
    assert entry.state == "verified" and entry.metrics["model_version"] == 1 and service.versions.current == 1
    assert service.ledger.check_integrity() == []


# --- verification power (a 3-id deletion cannot be told from held-out data by any model) ----------------------------


def test_heldout_power_is_stated_and_shrinks_with_n():
    from erasus_ray.evaluation.verification import HeldoutTarget, auc_detectable, auc_min_members

    small, large = HeldoutTarget().power(3, 72), HeldoutTarget().power(60, 72)
    assert small["detectable"] > 0.95 > 0.8 > large["detectable"] > 0.5
    assert "indistinguishable at n=3" in small["statement"] and "detectable AUC >= " in small["statement"]
    n = auc_min_members(0.8, 72)
    assert auc_detectable(n, 72) <= 0.8 < auc_detectable(n - 1, 72)
    assert auc_min_members(0.8, 1) is None  # one held-out sample: no forget set is large enough


def _file(client, service, keys, name, k, start=0):
    ids = service.ownership.ids_of(name)[start:start + k].tolist()
    assert _post(client, keys[name], request_id=f"{name}-{start}", ids=ids).status_code == 202
    return f"{name}-{start}"


def test_low_power_fail_policy_fails_a_tiny_deletion_with_the_statement(tmp_path, wine):
    service, client, keys = _service(tmp_path, wine, on_low_power="fail", max_detectable_auc=0.8)
    try:
        rid = _file(client, service, keys, "client-0", 3)
        assert UnlearningWorker(service).run_once() is None  # nothing ran
        entry = service.ledger.get(rid)
        assert entry.state == "failed" and entry.error_code == "low_power"
        assert "indistinguishable at n=3" in entry.state_reason and "detectable AUC >=" in entry.state_reason
        assert service.versions.current == 0 and service.ledger.check_integrity() == []
    finally:
        service.close()


def test_low_power_batch_policy_waits_then_verifies_on_the_union(tmp_path, wine):
    service, client, keys = _service(tmp_path, wine, on_low_power="batch", max_detectable_auc=0.8, low_power_wait_s=3600)
    try:
        worker = UnlearningWorker(service)
        first = _file(client, service, keys, "client-0", 3)
        assert worker.run_once() is None
        held = service.ledger.get(first)
        assert held.state == "validated" and held.metrics["power"]["low"] is True
        status = client.get(f"/v1/deletions/{first}", headers=_auth(keys["client-0"])).json()
        assert "indistinguishable at n=3" in status["metrics"]["power"]["statement"]
        # more requests arrive: their union reaches the power, and one round serves them all
        need = held.metrics["power"]["min_n_forget"]  # what an AUC of 0.75 would need at 72 held-out samples
        rids = [first] + [_file(client, service, keys, "client-1", 8, start=8 * k) for k in range(3)]
        power = worker.power(service.ledger.entries(states=["validated"]))
        assert power["n_forget"] == 27 and power["low"] is False and 3 < need
        done = worker.run_once()
        assert sorted(done["requests"]) == sorted(rids)
        assert done["verification"]["power"]["n_forget"] == 27
    finally:
        service.close()


def test_low_power_accept_policy_says_so_on_the_verified_request(served):
    service, client, keys = served  # defaults: accept, max_detectable_auc 0.8
    rid = _file(client, service, keys, "client-0", 3)
    done = UnlearningWorker(service).run_once()
    entry = service.ledger.get(rid)
    assert done["published"] == 1 and entry.state == "verified"
    assert entry.state_reason.startswith("low verification power: indistinguishable at n=3")
    assert entry.metrics["verification"]["power"]["detectable"] > 0.8


# --- audit export, fuzzing, rate limit ----------------------------------------------------------------------------------


def _export(client, key, **params):
    r = client.get("/v1/audit/export", params=params, headers=_auth(key))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in r.text.splitlines()]


def test_audit_export_is_json_lines_and_a_client_sees_only_its_own(served):
    service, client, keys = served
    mine = service.ownership.ids_of("client-0")[:2].tolist()
    theirs = service.ownership.ids_of("client-1")[:2].tolist()
    _post(client, keys["client-0"], request_id="a", ids=mine)
    _post(client, keys["client-1"], request_id="b", ids=theirs)
    _post(client, keys["client-0"], request_id="grab", ids=mine + theirs)  # refused, recorded
    UnlearningWorker(service).run_once()  # a and b in one batch: one coreset over both clients' ids
    everything = _export(client, keys["operator"])
    assert sorted(r["client_request_id"] for r in everything) == ["a", "b", "grab"]
    assert all(r["transitions"] for r in everything)
    own = _export(client, keys["client-0"])
    assert sorted(r["client_request_id"] for r in own) == ["a", "grab"]
    text = json.dumps(own)
    assert "client-1" not in text and not set(theirs) & set(_ids_in(own, "coreset_ids"))
    assert not any("detail" in t["details"] for r in own for t in r["transitions"])
    hashed = _export(client, keys["client-0"], hash_ids="true", state="verified")
    assert [r["client_request_id"] for r in hashed] == ["a"] and "ids" not in hashed[0] and hashed[0]["ids_sha256"]
    assert client.get("/v1/audit/export", params={"state": "nope"}, headers=_auth(keys["operator"])).status_code == 422
    assert client.get("/v1/audit/export").status_code == 401


def _ids_in(records, key):
    return [i for r in records for i in (r.get(key) or [])]


def _fuzzed_bodies(rng, mine, theirs, max_ids):
    """Malformed or hostile deletion bodies (seeded): wrong types, unknown fields, non-JSON, over-limit id lists,
    other clients' ids, bad levels and request ids."""
    junk = [None, True, 1.5, -1, 2**70, "x", "", [], {}, [None], ["1"], [1.5], {"a": 1}, "\x00", "é" * 300]
    fields = ["request_id", "level", "ids", "label", "reason"]
    kind = int(rng.integers(8))
    body: dict = {"request_id": f"f{int(rng.integers(10**6))}", "ids": list(mine[:2])}
    if kind == 0:
        body[fields[int(rng.integers(len(fields)))]] = junk[int(rng.integers(len(junk)))]
    elif kind == 1:
        body["unknown_" + str(int(rng.integers(100)))] = 1
    elif kind == 2:
        body["ids"] = list(range(max_ids + 1 + int(rng.integers(1000))))
    elif kind == 3:
        body["ids"] = list(mine[:1]) + [int(i) for i in rng.choice(theirs, size=int(rng.integers(1, 4)), replace=False)]
    elif kind == 4:
        body["level"] = ["galaxy", "CLASS", "", "client "][int(rng.integers(4))]
    elif kind == 5:
        body["request_id"] = ["bad id!", "#x", "a" * 500, "../x", ""][int(rng.integers(5))]
    elif kind == 6:
        body.pop(fields[int(rng.integers(3))], None)
        body["level"] = "class"  # operator-only, and a client's class body lacks a label
    else:
        return [b"{", b"[]", b"null", b'{"request_id":', "{\"ids\": [1,}".encode(), b"\xff\xfe"][int(rng.integers(6))]
    return body


def test_fuzzed_deletion_bodies_are_4xx_with_a_reason_and_leak_nothing(tmp_path, wine):
    import numpy as np

    service, client, keys = _service(tmp_path, wine, max_ids=40, max_requests_per_minute=None)
    try:
        mine = service.ownership.ids_of("client-0").tolist()
        theirs = service.ownership.ids_of("client-1").tolist()
        rng = np.random.default_rng(0)
        statuses, accepted_ids = {}, set()
        for _ in range(1200):
            body = _fuzzed_bodies(rng, mine, theirs, service.config.max_ids)
            if isinstance(body, bytes):
                r = client.post("/v1/deletions", content=body, headers={**_auth(keys["client-0"]), "content-type": "application/json"})
            else:
                r = _post(client, keys["client-0"], **body)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 202:  # a mutation that happened to stay valid (e.g. reason "x"): the caller's own ids
                assert set(body["ids"]) <= set(mine), body
                accepted_ids.add(r.json()["request_id"])  # a repeated request id returns the same request
                continue
            assert 400 <= r.status_code < 500, (body, r.status_code, r.text[:300])
            assert r.json()["detail"], body
            assert "client-1" not in r.text
            if r.status_code == 403:  # a refusal of other clients' ids names none of them
                assert not any(str(i) in r.json()["detail"]["message"] for i in theirs)
        assert {403, 422} <= set(statuses) and sum(n for c, n in statuses.items() if c >= 400) > 1000, statuses
        accepted = [e for e in service.ledger.entries() if e.state != "rejected"]
        assert {e.request_id for e in accepted} == accepted_ids and all(set(e.ids) <= set(mine) for e in accepted)
        assert service.ledger.check_integrity() == []
    finally:
        service.close()


def test_rate_limit_is_honoured_per_client(tmp_path, wine):
    service, client, keys = _service(tmp_path, wine, max_requests_per_minute=3)
    try:
        mine = service.ownership.ids_of("client-0").tolist()
        codes = [_post(client, keys["client-0"], request_id=f"r{k}", ids=mine[k:k + 1]).status_code for k in range(5)]
        assert codes == [202, 202, 202, 429, 429]
        other = _post(client, keys["client-1"], request_id="r0", ids=service.ownership.ids_of("client-1")[:1].tolist())
        assert other.status_code == 202  # another client's budget is its own
        assert len([e for e in service.ledger.entries() if e.state == "validated"]) == 4
    finally:
        service.close()


def test_the_serve_cli_builder_reads_the_yaml(tmp_path):
    pytest.importorskip("ray.serve")
    import yaml

    from erasus_ray.serve.app import app_builder

    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"benchmark": "iris", "state_dir": str(tmp_path / "s")}))
    app = app_builder({"config": str(path)})
    assert type(app).__name__ == "Application"
    from pathlib import Path

    cluster = yaml.safe_load((Path(__file__).parent.parent / "clusters" / "serve-app.yaml").read_text())
    assert cluster["applications"][0]["import_path"] == "erasus_ray.serve.app:app_builder"
    assert cluster["http_options"]["port"] not in (8000, 8265)
    with pytest.raises(InvalidConfigError, match="benchmark"):
        (tmp_path / "bad.yaml").write_text("benchmark: imagenet\n")
        app_builder({"config": str(tmp_path / "bad.yaml")})
