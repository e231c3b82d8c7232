#!/usr/bin/env python
"""Deletion service under load: prediction latency idle vs while unlearning runs, deletion-accept rate on SQLite, and a
deletion's request-to-verified time on the running service vs a cold process doing the same work.

Command: ``python benchmarks/serve/run.py [--benchmark digits] [--seconds 30] [--ray]`` (writes ``results.json`` next to
this file; ``RESULTS.md`` is written by hand from it). The service runs in its own process on 127.0.0.1 (``erasus-ray
serve --standalone``: uvicorn + the worker thread; ``--ray``: ``erasus-ray serve`` on a local Ray Serve), the load
comes from this process over HTTP with one client thread (sequential requests: latency, not peak throughput).

Phases:

1. **idle**: ``POST /predict`` (8 rows) for ``--seconds``; the worker has nothing to do.
2. **unlearning**: ``--requests`` sample deletions (``--ids`` own ids each) and, every 8th, an operator's class
   deletion (``--classes``; the ``class`` target moves real weights) are filed first (``batch_size: 1``: one
   closed-loop round each), then ``/predict`` runs for ``--seconds`` while the worker works through them. Each call
   is matched against the rounds' spans in the audit trail (``scheduled`` to ``verified``): latency **during** a round
   vs **between** rounds, and the fraction of the window a round was running. Rounds on digits are short (~0.3 s:
   a sample deletion passes the ``heldout`` target with 0 steps, the original already looking held-out on those
   ids; a class takes ~10-15 steps), so the window holds both.
3. **warm request-to-verified**: on the drained service, a class deletion (the next label) and a 30-id sample deletion,
   each polled until ``verified``/``failed``.
4. **cold**: a fresh Python process imports erasus-ray, loads the benchmark and runs the same ``ErasusUnlearner.fit``
   on another class (what an ``erasus-ray unlearn`` job pays before and around its fit; no Ray start).
5. **accept**: ``POST /v1/deletions`` (distinct request ids, 2 own ids each) for ``--accept-seconds`` on a second start
   with the worker asleep (``poll_s`` 1 h) and no rate limit: the ledger's accept rate on SQLite (``synchronous=FULL``).

Not a test: timings depend on the machine's load (the project's machines: 2 shared cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
PORT = 8347


def start_server(config: dict, folder: Path, ray: bool) -> subprocess.Popen:
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    code = "import sys; from erasus_ray.cli import main; sys.exit(main(sys.argv[1:]))"
    args = [sys.executable, "-c", code, "serve", "--config", str(path)] + ([] if ray else ["--standalone"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(args, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "w"))


def wait_ready(base: str, attempts: int = 600) -> None:
    for _ in range(attempts):
        try:
            if httpx.get(f"{base}/v1/model", timeout=2.0).status_code == 401:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not come up (see server.log)")


def keys(config: dict) -> dict[str, str]:
    from erasus_ray.ledger import DeletionLedger
    from erasus_ray.serve import ClientKeys, ServeConfig

    cfg = ServeConfig.from_mapping(config)
    Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
    with DeletionLedger(cfg.ledger_url) as ledger:
        k = ClientKeys(ledger)
        return {c: k.add(c) for c in [f"client-{i}" for i in range(cfg.clients)]} | {"operator": k.add("operator", "operator")}


def latencies(http: httpx.Client, key: str, inputs: list, seconds: float, stamps: list | None = None) -> list[float]:
    """Sequential ``/predict`` calls for ``seconds``; ``stamps`` gets each call's wall-clock start (to match rounds)."""
    out, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t, wall = time.perf_counter(), time.time()
        r = http.post("/predict", json={"inputs": inputs}, headers={"Authorization": f"Bearer {key}"})
        out.append(time.perf_counter() - t)
        if stamps is not None:
            stamps.append(wall)
        assert r.status_code == 200, r.text
    return out


def round_intervals(audit: list[dict]) -> list[tuple[float, float]]:
    """Wall-clock spans during which an unlearning round ran: per request, its ``scheduled`` transition to its last."""
    from datetime import datetime

    spans = []
    for r in audit:
        at = [datetime.fromisoformat(t["at"]).timestamp() for t in r["transitions"] if t["to"] in ("scheduled", "verified", "failed")]
        if len(at) >= 2:
            spans.append((min(at), max(at)))
    return spans


def split_by_rounds(lat: list[float], stamps: list[float], spans: list[tuple[float, float]]) -> tuple[list, list]:
    during = [l for l, s in zip(lat, stamps) if any(a <= s <= b for a, b in spans)]
    between = [l for l, s in zip(lat, stamps) if not any(a <= s <= b for a, b in spans)]
    return during, between


def summary(lat: list[float], seconds: float) -> dict:
    ms = np.asarray(lat) * 1000
    return {"n": len(lat), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "per_s": len(lat) / seconds}


def own_ids(owner_ids: dict[str, list[int]], client: str, k: int, used: set[int]) -> list[int]:
    free = [i for i in owner_ids[client] if i not in used][:k]
    used.update(free)
    return free


def file(http, key, rid, ids, label=None):
    body = {"request_id": rid, "ids": ids} if label is None else {"request_id": rid, "level": "class", "label": label}
    r = http.post("/v1/deletions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 202, r.text
    return r.json()["request_id"]


def cold_fit(benchmark: str, ids: list[int]) -> float:
    code = f"""
import time; t = time.perf_counter()
from erasus_ray import ErasusUnlearner
from erasus_ray.benchmarks import load_benchmark
b = load_benchmark({benchmark!r}, scenario="class", seed=0)
ids = {ids!r}
retain = [int(i) for i in b.train.ids if int(i) not in set(ids)]
r = ErasusUnlearner(b.original, progress=False).fit(forget_data=b.train.subset(ids), retain_data=b.train.subset(retain),
                                                   heldout_data=b.test)
print(time.perf_counter() - t, r.verified)
"""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--benchmark", default="digits")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--accept-seconds", type=float, default=15.0)
    ap.add_argument("--requests", type=int, default=40, help="background sample deletions (--ids own ids each)")
    ap.add_argument("--classes", type=int, default=5, help="background class deletions among them (labels 0..classes-1)")
    ap.add_argument("--ids", type=int, default=8, help="ids per sample deletion")
    ap.add_argument("--ray", action="store_true")
    args = ap.parse_args()
    from erasus_ray.benchmarks import load_benchmark
    from erasus_ray.serve.service import round_robin_owners

    bench = load_benchmark(args.benchmark, scenario="class", seed=0)
    inputs = np.asarray(bench.test.base.x[:8]).reshape(8, -1).tolist()
    owners = round_robin_owners(np.asarray(bench.train.ids), 4)
    base = f"http://127.0.0.1:{PORT}"
    results: dict = {"benchmark": args.benchmark, "mode": "ray_serve" if args.ray else "standalone", "seconds": args.seconds,
                     "machine": f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = {"benchmark": args.benchmark, "state_dir": str(folder / "state"), "port": PORT, "batch_size": 1,
                  "poll_s": 0.2, "max_requests_per_minute": None, "max_detectable_auc": None}
        key = keys(config)
        server = start_server(config, folder, args.ray)
        try:
            t = time.perf_counter()
            wait_ready(base)
            results["start_s"] = time.perf_counter() - t
            with httpx.Client(base_url=base, timeout=60.0) as http:
                latencies(http, key["client-0"], inputs, 2.0)  # warm-up: first load of the served model
                results["idle"] = summary(latencies(http, key["client-0"], inputs, args.seconds), args.seconds)
                used: set[int] = set()
                for n in range(args.requests):  # sample deletions, with a class deletion (real steps) every 8th
                    client = f"client-{n % 4}"
                    file(http, key[client], f"bg-{n}", own_ids(owners, client, args.ids, used))
                    if n % 8 == 7 and n // 8 < args.classes:
                        file(http, key["operator"], f"bg-class-{n // 8}", None, label=n // 8)
                op = {"Authorization": f"Bearer {key['operator']}"}
                v0 = http.get("/v1/model", headers=op).json()["model_version"]
                stamps: list[float] = []
                lat = latencies(http, key["client-0"], inputs, args.seconds, stamps)
                listing = http.get("/v1/deletions", headers=op).json()["requests"]
                pending = sum(r["state"] in ("validated", "scheduled", "unlearned") for r in listing)
                v1 = http.get("/v1/model", headers=op).json()["model_version"]
                audit = [json.loads(line) for line in http.get("/v1/audit/export", headers=op).text.splitlines()]
                spans = round_intervals(audit)
                during, between = split_by_rounds(lat, stamps, spans)
                busy = sum(min(b, stamps[-1]) - max(a, stamps[0]) for a, b in spans if b > stamps[0] and a < stamps[-1])
                results["unlearning"] = {**summary(lat, args.seconds), "versions_published": v1 - v0, "pending_at_end": pending,
                                         "busy_fraction": busy / args.seconds,
                                         # each sub-window's calls/s over its own seconds (rounds running / not)
                                         "during_rounds": summary(during, busy) if during else None,
                                         "between_rounds": summary(between, args.seconds - busy) if between else None}
                for _ in range(3600):  # drain
                    listing = http.get("/v1/deletions", headers=op).json()["requests"]
                    if not any(r["state"] in ("validated", "scheduled", "unlearned") for r in listing):
                        break
                    time.sleep(1.0)
                audit = [json.loads(line) for line in http.get("/v1/audit/export", headers=op).text.splitlines()]
                steps = [(r["metrics"] or {}).get("verification", {}).get("steps") for r in audit]
                results["unlearning"]["round_s_mean"] = float(np.mean([b - a for a, b in round_intervals(audit)]))
                results["unlearning"]["rounds"] = {
                    "states": {st: sum(r["state"] == st for r in audit) for st in {r["state"] for r in audit}},
                    "steps_mean": float(np.mean([x for x in steps if x is not None])),
                    "zero_step": sum(x == 0 for x in steps)}
                for name, body in (("class", {"request_id": "warm-class", "level": "class", "label": args.classes}),
                                   ("sample", {"request_id": "warm-sample", "ids": own_ids(owners, "client-1", args.ids, used)})):
                    t = time.perf_counter()
                    rid = http.post("/v1/deletions", json=body, headers=op).json()["request_id"]
                    while (got := http.get(f"/v1/deletions/{rid}", headers=op).json())["state"] not in ("verified", "failed"):
                        time.sleep(0.05)
                    results[f"warm_{name}_request_to_verified_s"] = time.perf_counter() - t
                    results[f"warm_{name}"] = {"state": got["state"], "steps": got["metrics"]["verification"].get("steps"),
                                               "power": (got["metrics"]["verification"].get("power") or {}).get("statement")}
        finally:
            server.terminate()
            server.wait(60)
        labels = np.asarray(bench.train.base.y)[np.asarray(bench.train.positions)]
        cold_ids = [int(i) for i, y in zip(bench.train.ids, labels) if int(y) == args.classes + 1]
        results["cold_class_process_s"] = cold_fit(args.benchmark, cold_ids)
        config = {**config, "state_dir": str(folder / "state2"), "poll_s": 3600.0}
        key = keys(config)
        server = start_server(config, folder, args.ray)
        try:
            wait_ready(base)
            with httpx.Client(base_url=base, timeout=60.0) as http:
                used, n, end = set(), 0, time.perf_counter() + args.accept_seconds
                while time.perf_counter() < end:
                    client = f"client-{n % 4}"
                    ids = own_ids(owners, client, 2, used)
                    if not ids:
                        break
                    file(http, key[client], f"acc-{n}", ids)
                    n += 1
                spent = args.accept_seconds - max(0.0, end - time.perf_counter())
                results["accept"] = {"requests": n, "per_s": n / spent}
        finally:
            server.terminate()
            server.wait(60)
    out = HERE / f"results{'_ray' if args.ray else ''}.json"
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
