"""Durability of the deletion service under Ray (issue 18): killing a Serve replica, or the whole ``erasus-ray serve``
process tree, loses no accepted request and duplicates none; after the restart unfinished requests resume and the last
published version is served. Local Ray on 127.0.0.1, bounded polling loops, wine (tiny, cached). Slow: Serve start-up
(and, for the whole-service trial, two cold ``erasus-ray serve`` starts of their own Ray cluster)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
sys.path.insert(0, str(Path(__file__).parent))
from test_serve_durability import _check_exactly_once  # noqa: E402
from test_serve_ray import _free_port, _wait  # noqa: E402

pytestmark = pytest.mark.slow

FINAL = ("verified", "failed")


def _config(tmp_path, **extra):
    from erasus_ray.serve import ServeConfig

    # batch_size 1: one round per request, so a kill finds some requests done and others still owed
    return ServeConfig(benchmark="wine", state_dir=str(tmp_path / "state"), port=_free_port(), poll_s=0.2,
                       batch_size=1, max_detectable_auc=None, max_requests_per_minute=None, **extra)


def _bodies(service, n, start=0):
    """``n`` deletion bodies of 3 own ids each, from clients in turn, with their keys (ids never reused)."""
    keys = {f"client-{k}": service.keys.add(f"client-{k}") for k in range(service.config.clients)}
    out = []
    for j in range(start, start + n):
        client = f"client-{j % service.config.clients}"
        ids = service.ownership.ids_of(client)[3 * (j // service.config.clients):][:3].tolist()
        out.append(({"request_id": f"r{j}", "ids": [int(i) for i in ids]}, {"Authorization": f"Bearer {keys[client]}"}))
    return out


def _file(http, bodies):
    for body, auth in bodies:
        r = _wait(lambda: http.post("/v1/deletions", json=body, headers=auth), lambda r: r.status_code < 500)
        assert r.status_code == 202 and r.json()["request_id"] == body["request_id"], r.text
    return [body["request_id"] for body, _ in bodies]


def _states(service):
    return {e.request_id: e.state for e in service.ledger.entries()}


def _all_final(service, accepted):
    return lambda _: all(_states(service).get(rid) in FINAL for rid in accepted)


def _first_verified(service):
    """Wait (polling the ledger every 20 ms) until the worker verified its first request: the moment to kill it, with
    the rest of the queue owed (a round takes ~0.3 s on wine; a 0.5 s poll once saw all 4 requests done)."""
    _wait(lambda: _states(service), lambda s: "verified" in s.values(), attempts=6000, pause=0.02)


def _replica(ray, deployment):
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"]]
    return names[0] if len(names) == 1 else None


def _served_version_is_the_last(http, service, auth, x):
    last = max(int(v) for v in service.versions.index()["versions"])
    assert service.versions.current == last >= 1
    answer = _wait(lambda: http.post("/predict", json={"inputs": x}, headers=auth), lambda r: r.status_code == 200)
    assert answer.json()["model_version"] == last


def test_killed_replicas_are_restarted_and_every_request_completes_once(ray_cluster, tmp_path):
    """SIGKILL-like ``ray.kill`` of the worker replica while requests are owed, then of the ingress replica: Serve
    starts new ones, the new worker resumes what the dead one left, and a client retrying its POSTs gets the same
    requests back (no second ledger row)."""
    from ray import serve

    from erasus_ray.serve import DeletionService
    from erasus_ray.serve.app import build, http_options

    ray = ray_cluster
    config = _config(tmp_path)
    service = DeletionService(config)  # the test's own view of the ledger and versions (v0 written before Serve starts)
    bodies = _bodies(service, 12)
    serve.start(http_options=http_options(config))
    try:
        serve.run(build(config), name="erasus-kill", route_prefix="/")
        with httpx.Client(base_url=config.url, timeout=30.0) as http:
            accepted = _file(http, bodies[:8])
            _first_verified(service)  # the worker is mid-queue
            worker = _replica(ray, "unlearning_worker")
            ray.kill(ray.get_actor(worker, namespace="serve"), no_restart=True)
            owed_at_kill = [rid for rid, s in _states(service).items() if s not in FINAL]
            accepted += _file(http, bodies[8:])  # accepted while no worker runs
            ingress = _replica(ray, "deletions")
            ray.kill(ray.get_actor(ingress, namespace="serve"), no_restart=True)
            assert _file(http, bodies) == accepted  # a client's retries: the same requests, nothing filed twice
            assert sorted(_states(service)) == sorted(accepted)
            _wait(lambda: True, _all_final(service, accepted), attempts=600)
            assert _replica(ray, "unlearning_worker") not in (None, worker)  # Serve replaced the killed replicas
            assert _replica(ray, "deletions") not in (None, ingress)
        assert owed_at_kill, "the kill found nothing owed: the trial did not exercise a resume"
        _check_exactly_once(service, accepted)
        with httpx.Client(base_url=config.url, timeout=30.0) as http:
            _served_version_is_the_last(http, service, bodies[0][1], service.benchmark.test.base.x[:2].tolist())
    finally:
        serve.delete("erasus-kill")
        serve.shutdown()
        service.close()


def _start_cli(config_path: Path, log: Path) -> subprocess.Popen:
    """``erasus-ray serve --config`` in a session of its own (its Ray cluster's processes share its process group)."""
    env = {**os.environ, "RAY_ADDRESS": "local"}
    return subprocess.Popen([sys.executable, "-c", "import sys; from erasus_ray.cli import main; sys.exit(main())", "serve", "--config",
                             str(config_path)], stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, cwd=config_path.parent)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process group this test started (the CLI, the Ray cluster it started and its replicas)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(60)


def test_a_killed_service_restarts_on_its_ledger_and_serves_the_last_version(tmp_path):
    """SIGKILL of the whole ``erasus-ray serve`` process group (driver, its Ray cluster, proxy, replicas) after
    requests were accepted and some were served; a second ``erasus-ray serve`` on the same state resumes the owed
    ones, publishes nothing twice and serves the last published version."""
    import yaml

    from erasus_ray.serve import DeletionService

    config = _config(tmp_path)
    service = DeletionService(config)
    bodies = _bodies(service, 8)
    config_path = tmp_path / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict()))
    log = tmp_path / "serve.log"
    auth = bodies[0][1]
    proc = _start_cli(config_path, log)
    try:
        with httpx.Client(base_url=config.url, timeout=30.0) as http:
            _wait(lambda: http.get("/v1/model", headers=auth), lambda r: r.status_code == 200, attempts=600)
            accepted = _file(http, bodies)
            _first_verified(service)
            _kill_tree(proc)
            owed_at_kill = [rid for rid, s in _states(service).items() if s not in FINAL]
            served_at_kill = service.versions.current
            proc = _start_cli(config_path, log)
            _wait(lambda: http.get("/v1/model", headers=auth), lambda r: r.status_code == 200, attempts=600)
            assert _file(http, bodies) == accepted and sorted(_states(service)) == sorted(accepted)
            _wait(lambda: True, _all_final(service, accepted), attempts=600)
            assert owed_at_kill, "the kill found nothing owed: the trial did not exercise a resume"
            assert service.versions.current >= served_at_kill >= 1
            _check_exactly_once(service, accepted)
            _served_version_is_the_last(http, service, auth, service.benchmark.test.base.x[:2].tolist())
    finally:
        _kill_tree(proc)
        service.close()
