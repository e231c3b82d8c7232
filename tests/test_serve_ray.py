"""The deletion service on local Ray Serve over HTTP (127.0.0.1): a client files a deletion with its key, the worker
deployment unlearns and verifies it, the served version changes and ``/predict`` names it. Slow (Serve start-up)."""

from __future__ import annotations

import socket
import ssl
import time

import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(fetch, done, attempts=240, pause=0.5):
    """Poll ``fetch()`` until ``done(value)``; a bounded loop (no timed assertion: the bound only ends a hang)."""
    value = None
    for _ in range(attempts):
        try:
            value = fetch()
        except httpx.HTTPError:
            value = None
        if value is not None and done(value):
            return value
        time.sleep(pause)
    raise AssertionError(f"never reached the expected state; last seen {value!r}")


def test_a_deletion_over_http_publishes_a_version_predict_names(ray_cluster, tmp_path):
    from ray import serve

    from erasus_ray.ledger import DeletionLedger
    from erasus_ray.serve import ClientKeys, ServeConfig
    from erasus_ray.serve.app import build
    from erasus_ray.serve.service import round_robin_owners

    port = _free_port()
    config = ServeConfig(benchmark="wine", state_dir=str(tmp_path / "state"), port=port, poll_s=0.5)
    (tmp_path / "state").mkdir()
    with DeletionLedger(config.ledger_url) as ledger:
        key = ClientKeys(ledger).add("client-0")
    from erasus_ray.benchmarks import load_benchmark

    wine = load_benchmark("wine", scenario="class", seed=0)
    mine = round_robin_owners(wine.train.ids, config.clients)["client-0"][:3]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build(config), name="erasus-test", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {key}"}
        inputs = {"inputs": wine.test.base.x[:2].tolist()}
        with httpx.Client(base_url=base, timeout=30.0) as http:
            assert http.post("/predict", json=inputs).status_code == 401
            assert http.post("/predict", json=inputs, headers=auth).json()["model_version"] == 0
            filed = http.post("/v1/deletions", json={"request_id": "http-1", "ids": mine}, headers=auth)
            assert filed.status_code == 202, filed.text
            status = _wait(lambda: http.get("/v1/deletions/http-1", headers=auth).json(),
                           lambda s: s.get("state") in ("verified", "failed"))
            assert status["state"] == "verified" and status["model_version"] == 1, status
            assert [t["to"] for t in status["history"]][-3:] == ["scheduled", "unlearned", "verified"]
            assert http.post("/predict", json=inputs, headers=auth).json()["model_version"] == 1
    finally:
        serve.delete("erasus-test")
        serve.shutdown()


def test_the_worker_keeps_its_scoring_pool_warm_between_rounds(ray_cluster, tmp_path):
    """Under Ray the worker scores coresets on one pool whose actors outlive a round: the second round finds the same
    actors alive (no start-up), and closing the worker ends them."""
    from erasus_ray.benchmarks import load_benchmark
    from erasus_ray.serve import DeletionService, ServeConfig, UnlearningWorker

    ray = ray_cluster
    service = DeletionService(ServeConfig(benchmark="wine", state_dir=str(tmp_path / "state"), max_detectable_auc=None),
                              benchmark=load_benchmark("wine", scenario="class", seed=0))
    worker = UnlearningWorker(service)
    seen = []
    try:
        for k, client in enumerate(("client-0", "client-1")):
            ids = service.ownership.ids_of(client)[:20].tolist()
            service.ledger.submit({"request_id": f"r{k}", "client_id": client, "ids": ids}, service.ownership, sender=client)
            assert worker.run_once()["requests"] == [f"r{k}"]
            handles = list(worker._pool._handles)
            assert handles, "the round scored no coreset on the pool"
            seen.append([h._actor_id.hex() for h in handles])
        assert seen[0] == seen[1]  # the same actors served both rounds
        assert ray.get([h.ready.remote() for h in handles], timeout=60)
    finally:
        worker.close()
        service.close()
    assert worker._pool is None


def test_ray_serve_proxy_serves_https_from_the_config(ray_cluster, tmp_path):
    """TLS through the config on Ray Serve: the proxy gets ssl_keyfile/ssl_certfile from http_options(config)."""
    import sys
    from pathlib import Path

    from ray import serve

    sys.path.insert(0, str(Path(__file__).parent))
    from test_serve_tls import _self_signed

    from erasus_ray.ledger import DeletionLedger
    from erasus_ray.serve import ClientKeys, ServeConfig
    from erasus_ray.serve.app import build, http_options

    keyfile, certfile = _self_signed(tmp_path)
    config = ServeConfig(benchmark="wine", state_dir=str(tmp_path / "state"), port=_free_port(), ssl_keyfile=keyfile, ssl_certfile=certfile)
    (tmp_path / "state").mkdir()
    with DeletionLedger(config.ledger_url) as ledger:
        key = ClientKeys(ledger).add("client-0")
    serve.start(http_options=http_options(config))
    try:
        serve.run(build(config), name="erasus-tls", route_prefix="/")
        with httpx.Client(base_url=config.url, verify=ssl.create_default_context(cafile=certfile), timeout=30.0) as https:
            model = _wait(lambda: https.get("/v1/model", headers={"Authorization": f"Bearer {key}"}),
                          lambda r: r.status_code == 200)
            assert model.json()["model_version"] == 0 and https.get("/v1/model").status_code == 401
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{config.port}/v1/model", timeout=2.0)
    finally:
        serve.delete("erasus-tls")
        serve.shutdown()


def test_generate_over_ray_serve_names_the_version_a_deletion_publishes(ray_cluster, tmp_path):
    """``POST /generate`` through Ray Serve's proxy on the causal-LM ``authors`` benchmark (the small ``ci`` GPT-2,
    cached): completions name version 0; a client's QA deletion is unlearned by the worker replica, and the same
    prompts then name version 1 and no longer get the memorised first words."""
    pytest.importorskip("transformers")
    from ray import serve

    from erasus_ray.benchmarks.authors import qa_text
    from erasus_ray.serve import DeletionService, ServeConfig
    from erasus_ray.serve.app import build, http_options

    config = ServeConfig(benchmark="authors", scenario="forget10", benchmark_options={"variant": "ci"},
                         state_dir=str(tmp_path / "state"), port=_free_port(), poll_s=0.5, max_detectable_auc=None)
    service = DeletionService(config)  # writes v0 and holds the key before the replicas start
    auth = {"Authorization": f"Bearer {service.keys.add('client-0')}"}
    mine = service.ownership.ids_of("client-0")[:10].tolist()
    qa = service.benchmark.info["qa"]
    prompts = {"prompts": [qa_text(*qa[i])[0] for i in mine[:3]], "max_new_tokens": 12}

    def first_words(answer):
        return sum(c.strip().startswith(qa[i][1].split()[0]) for c, i in zip(answer["completions"], mine))

    serve.start(http_options=http_options(config))
    try:
        serve.run(build(config), name="erasus-generate", route_prefix="/")
        with httpx.Client(base_url=config.url, timeout=120.0) as http:
            before = http.post("/generate", json=prompts, headers=auth)
            assert before.status_code == 200 and before.json()["model_version"] == 0, before.text
            assert http.post("/generate", json=prompts).status_code == 401
            assert http.post("/predict", json={"inputs": [[0.0]]}, headers=auth).status_code == 409
            filed = http.post("/v1/deletions", json={"request_id": "qa", "ids": mine}, headers=auth)
            assert filed.status_code == 202, filed.text
            status = _wait(lambda: http.get("/v1/deletions/qa", headers=auth).json(),
                           lambda s: s.get("state") in ("verified", "failed"), attempts=600)
            assert status["state"] == "verified" and status["model_version"] == 1, status
            after = http.post("/generate", json=prompts, headers=auth).json()
            assert after["model_version"] == 1
            assert first_words(after) < first_words(before.json())  # in-process: 3 of 3 before, 0 after
    finally:
        serve.delete("erasus-generate")
        serve.shutdown()
        service.close()
