#!/usr/bin/env python
"""Scoring throughput, peak memory and Ray actor scaling of the coreset selectors (issue #3's benchmarks).

1. ``throughput``: samples/s of ``el2n``, ``gradient_norm`` (factored norms from layer factors, and ``torch.func``
   per-sample gradients) and ``influence`` (self-influence with its IHVP set-up included) against plain batched
   training (forward + backward + Adam step, same model, same batch size) on the digits MLP, the MNIST-5k CNN and
   the authors GPT-2. Goals: per-sample gradient scoring >= 0.5x training throughput; influence <= 3x one
   training epoch over the forget set.
2. ``memory``: peak RSS growth while scoring ``gradient_norm`` on n = 500 .. 4000 MNIST-5k samples, each in a
   fresh subprocess (should be flat in n: batches are streamed).
3. ``actors``: the Ray scoring pool with 1 vs 2 actors on MNIST-5k (goal >= 1.6x with 2 actors) and in-process vs
   2 actors over forget-set sizes (where Ray starts to pay off, pool start-up included).
4. ``crossover``: a cold pool (``ray.init`` + start-up + one request) vs in-process scoring on MNIST-5k tiled to
   8k-64k samples: the size from which ``distributed="auto"`` should use the pool when Ray is not running.
5. ``ihvp``: influence's approximate inverse-Hessian back-ends on the digits MLP (issue #24): EK-FAC over every
   layer (``fisher="expected"`` with the one-GEMM eigenvalue correction vs the per-sample-gradient correction it
   replaced, and ``fisher="mc"``), and LiSSA at small damping (``--ihvp-damping``) on the classifier head against
   the exact closed form (the fixed 500-step depth it had vs the default ``lissa_depth="auto"``).

Writes ``results.json`` and ``RESULTS.md`` into ``--out``. Example (the command RESULTS.md records)::

    ERASUS_RAY_CACHE=/tmp/erasus-bench-cache python benchmarks/selector_scoring/run.py --parts throughput,memory,actors
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erasus_ray.utils.atomic import atomic_write_text

TASKS = {"digits": ("digits", "class", {}), "mnist5k": ("mnist5k", "class", {}), "authors": ("authors", "forget10", {"variant": "ci"})}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="throughput,memory,actors")
    p.add_argument("--tasks", default="digits,mnist5k,authors")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--sizes", default="500,1000,2000,4000", help="memory part: scored set sizes")
    p.add_argument("--memory-selectors", default=",".join(MEMORY_SELECTORS),
                   help=f"memory part: selectors to measure (of {', '.join(MEMORY_SELECTORS)})")
    p.add_argument("--actor-sizes", default="250,1000,4000", help="actors part: forget-set sizes")
    p.add_argument("--crossover-sizes", default="8000,16000,32000,64000",
                   help="crossover part: tiled MNIST-5k forget-set sizes for cold pool vs in process")
    p.add_argument("--ihvp-damping", type=float, default=1e-3, help="ihvp part: LiSSA's damping")
    p.add_argument("--out", default="benchmarks/selector_scoring")
    p.add_argument("--note", action="append", default=[], help="a finding to append to RESULTS.md (repeatable)")
    p.add_argument("--report-only", action="store_true", help="rebuild RESULTS.md from --out's results.json (and --note)")
    p.add_argument("--merge", action="store_true",
                   help="keep --out's results.json and replace only the parts (and throughput tasks) run now")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _calls_per_sample(fn: Any, min_sample_s: float) -> int:
    """Warm ``fn`` up (first-call costs, allocator) and return how many back-to-back calls fill ``min_sample_s``."""
    t0 = time.perf_counter()
    fn()
    return max(1, int(np.ceil(min_sample_s / max(time.perf_counter() - t0, 1e-6))))


def _sample(fn: Any, inner: int) -> float:
    """One timing sample: the mean time of ``inner`` back-to-back calls of ``fn``."""
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def median_time(fn: Any, repeats: int, min_sample_s: float = 0.05) -> float:
    """Median over ``repeats`` samples of ``fn``'s time; a sample times as many back-to-back calls as take
    ``min_sample_s`` (calibrated on the warm-up) and divides, so millisecond operations are not read off the
    timer's and the scheduler's noise."""
    inner = _calls_per_sample(fn, min_sample_s)
    return float(np.median([_sample(fn, inner) for _ in range(repeats)]))


def paired_times(fa: Any, fb: Any, repeats: int, min_sample_s: float = 0.05) -> dict[str, float]:
    """Time ``fa`` and ``fb`` in alternating samples (each as in :func:`median_time`), so both see the same
    machine state, and return their medians and the quartiles of the per-pair ratio ``fa / fb``."""
    inner_a, inner_b = _calls_per_sample(fa, min_sample_s), _calls_per_sample(fb, min_sample_s)
    pairs = [(_sample(fa, inner_a), _sample(fb, inner_b)) for _ in range(repeats)]
    ta, tb = np.array(pairs).T
    q1, q2, q3 = np.quantile(ta / tb, [0.25, 0.5, 0.75])
    return {"a": float(np.median(ta)), "b": float(np.median(tb)), "ratio_q1": float(q1), "ratio": float(q2), "ratio_q3": float(q3)}


def load(name: str) -> Any:
    from erasus_ray.benchmarks import load_benchmark

    bench, scenario, options = TASKS[name]
    return load_benchmark(bench, scenario, 0, **options)


def batch_size_for(bench: Any) -> int:
    return 16 if bench.task.name == "causal_lm" else 128


def train_epoch(bench: Any, data: Any, batch_size: int) -> None:
    import copy

    from erasus_ray.data import make_loader

    model = copy.deepcopy(bench.original).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for batch in make_loader(data, bench.task.collate, batch_size=batch_size):
        opt.zero_grad()
        bench.task.forward(model, batch.data).sample_loss().mean().backward()
        opt.step()


def throughput(names: list[str], repeats: int) -> list[dict[str, Any]]:
    from erasus_ray.selectors import get_selector

    rows = []
    for name in names:
        bench = load(name)
        bs = batch_size_for(bench)
        # score the whole training set (forget + retain) so every method sees the same, reasonably large input
        data = bench.train.sorted()
        n = len(data)
        model = bench.original.eval()
        forget = bench.train.subset(bench.forget_ids)
        t_train = median_time(lambda: train_epoch(bench, data, bs), repeats)
        # influence and the forget-set epoch it is compared with are timed in alternating samples (a ratio of two
        # few-millisecond timings taken minutes apart moved by +-40% with the machine's state)
        influence = get_selector("influence")
        retain = bench.train.subset(bench.retain_ids)
        pairs = max(repeats, 15)
        pair = paired_times(lambda: influence.score(model, forget, bench.task, 0, retain=retain),
                            lambda: train_epoch(bench, forget, bs), pairs)
        t_train_forget = pair["b"]
        row: dict[str, Any] = {"task": name, "n_scored": n, "n_forget": len(forget), "batch_size": bs,
                               "train_samples_per_s": n / t_train, "train_epoch_forget_s": t_train_forget}
        methods = {
            "el2n": (get_selector("el2n", batch_size=bs), data),
            "gradient_norm[auto]": (get_selector("gradient_norm", batch_size=bs, method="auto"), data),
            "gradient_norm[func]": (get_selector("gradient_norm", batch_size=bs, method="func"), data),
        }
        for label, (selector, scored) in methods.items():
            t = median_time(lambda s=selector, d=scored: s.score(model, d, bench.task, 0), repeats)
            row[f"{label}_samples_per_s"] = len(scored) / t
            row[f"{label}_vs_train"] = (len(scored) / t) / row["train_samples_per_s"]
        row["influence_forget_s"] = pair["a"]
        row["influence_vs_train_epoch_forget"] = pair["ratio"]
        row["influence_vs_train_epoch_forget_iqr"] = [pair["ratio_q1"], pair["ratio_q3"]]
        row["influence_pairs"] = pairs
        row["gradient_norm_auto_path"] = "factored" if _factored(model, get_selector("gradient_norm")) else "func (fallback)"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _factored(model: Any, selector: Any) -> bool:
    from erasus_ray.selectors import trainable_params
    from erasus_ray.selectors._factored import factored_supported

    return factored_supported(model, set(trainable_params(model, selector.scope)), norms_only=True)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


#: the memory part's selectors: gradient norms from torch.func per-sample gradients; influence with its default
#: (exact Woodbury head solver, scored from head factors) and with a JL projection (streamed torch.func per-sample
#: gradients of the last layers, projected, then a dense solve in the projected space)
MEMORY_SELECTORS: dict[str, tuple[str, dict[str, Any]]] = {
    "gradient_norm[func]": ("gradient_norm", {"batch_size": 128, "method": "func"}),
    "influence": ("influence", {}),
    "influence[proj_dim=512]": ("influence", {"proj_dim": 512}),
}


def memory_child(n: int, label: str = "gradient_norm[func]") -> None:
    """Runs in a fresh process: resident memory sampled every 2 ms while scoring n samples with the selector
    ``label`` (:data:`MEMORY_SELECTORS`), against the resident memory just before (after loading and a 64-sample
    warm-up). ``ru_maxrss`` cannot be used: building the benchmark's data peaks far above scoring, so the
    process-lifetime peak says nothing about scoring."""
    import gc
    import threading

    from erasus_ray.selectors import get_selector

    torch.set_num_threads(1)
    bench = load("mnist5k")
    data = bench.train.sorted()
    data = data.subset(data.ids[:n])
    name, options = MEMORY_SELECTORS[label]
    selector = get_selector(name, **options)
    context = {"retain": bench.train.subset(bench.retain_ids)} if name == "influence" else {}
    selector.score(bench.original.eval(), data.subset(data.ids[:64]), bench.task, 0, **context)
    gc.collect()
    before = _rss_mb()
    peak = [before]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    selector.score(bench.original.eval(), data, bench.task, 0, **context)
    done.set()
    thread.join()
    print(json.dumps({"selector": label, "n": n, "rss_mb_before": before, "peak_rss_mb_during": peak[0], "growth_mb": peak[0] - before}))


def memory(sizes: list[int], labels: list[str]) -> list[dict[str, Any]]:
    rows = []
    for label, n in [(label, n) for label in labels for n in sizes]:
        out = subprocess.run([sys.executable, __file__, "--memory-child", f"{n}:{label}"], capture_output=True, text=True,
                             check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def actors(sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    """Per forget-set size: in-process scoring vs the pool with 1 and 2 actors. The pool is started once per actor
    count (``start_s``: actor processes + first request) and reused, so ``actors_k_s`` is a request on a running pool
    (what a service or a continual-unlearning loop pays); ``cold_2_actors_s`` = start-up + one request (what a single
    ``ErasusUnlearner(distributed="ray").fit`` pays)."""
    import ray

    from erasus_ray.distributed import PoolSpec, ScoringPool
    from erasus_ray.selectors import get_selector

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024**2)
    bench = load("mnist5k")
    data = bench.train.sorted()
    rows = []
    pools = {k: ScoringPool(PoolSpec(num_actors=k, num_cpus=1)) for k in (1, 2)}
    try:
        start_s = {}
        for k, pool in pools.items():
            t0 = time.perf_counter()
            pool.start(bench.task)
            start_s[k] = time.perf_counter() - t0
            pool.close()  # 2 CPUs: one pool's actors at a time
        # torch.func per-sample gradients (the expensive path) and the default factored norms (one backward pass)
        for method, n in [(m, n) for m in ("func", "auto") for n in sizes]:
            selector = get_selector("gradient_norm", method=method)
            part = data.subset(data.ids[:n])
            t_local = median_time(lambda: selector.select(bench.original, part, task=bench.task, fraction=0.1, seed=0), repeats)
            row: dict[str, Any] = {"method": method, "n": n, "in_process_s": t_local}
            for k, pool in pools.items():
                pool.start(bench.task)
                row[f"actors_{k}_s"] = median_time(
                    lambda p=pool: p.select(selector, bench.original, part, task=bench.task, fraction=0.1, seed=0), repeats
                )
                row[f"start_{k}_actors_s"] = start_s[k]
                pool.close()
            row["speedup_2_vs_1_actor"] = row["actors_1_s"] / row["actors_2_s"]
            row["speedup_2_actors_vs_in_process"] = t_local / row["actors_2_s"]
            row["cold_2_actors_s"] = start_s[2] + row["actors_2_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for pool in pools.values():
            pool.close()
        ray.shutdown()
    return rows


def coreset_mismatch(remote: Any, local: Any, scale_rtol: float = 1e-4) -> str | None:
    """Why the pool's coreset is not the in-process one, or ``None``. A shard is batched differently from the whole
    set, and optimised float32 kernels may round a row differently with another batch composition (issue #22), so
    the scores agree to ``scale_rtol * max|score|``, not bitwise; and the tiled set's copies of a sample tie, so
    rounding may swap which copy is chosen: ids may differ only among samples within that tolerance of the last
    chosen score. Cost: one pass over the scores."""
    if set(remote.scores) != set(local.scores):
        return "different scored ids"
    ids = np.array(list(local.scores))
    ref = np.array([local.scores[i] for i in ids])
    tol = scale_rtol * float(np.abs(ref).max())
    worst = float(np.abs(np.array([remote.scores[i] for i in ids]) - ref).max())
    if worst > tol:
        return f"scores differ by {worst:.3g} > {tol:.3g}"
    chosen = [local.scores[int(i)] for i in local.ids]
    last = min(chosen) if local.info.get("order", "high") == "high" else max(chosen)
    far = [int(i) for i in set(remote.ids.tolist()) ^ set(local.ids.tolist()) if abs(local.scores[int(i)] - last) > 2 * tol]
    return f"ids {far[:10]} chosen by one only, not near the last chosen score" if far else None


def crossover(sizes: list[int]) -> dict[str, Any]:
    """Where ``distributed="auto"`` should switch to the pool when Ray is not running yet: one cold
    ``ErasusUnlearner(distributed="ray")`` selection (``ray.init`` + pool start-up + one request + shutdown) against
    in-process scoring, on MNIST-5k's training set tiled to ``sizes`` samples (distinct ids; the CNN's cost per sample
    does not depend on which image it is), ``gradient_norm`` on its default (factored) path, one run per size."""
    import ray

    from erasus_ray.data import IdDataset
    from erasus_ray.distributed import PoolSpec, ScoringPool
    from erasus_ray.selectors import get_selector

    bench = load("mnist5k")
    data = bench.train.sorted()
    selector = get_selector("gradient_norm")
    rows = []
    for n in sizes:
        reps = -(-n // len(data))
        tiled = IdDataset(data.base, np.tile(data.positions, reps)[:n], np.arange(n))
        t0 = time.perf_counter()
        local = selector.select(bench.original, tiled, task=bench.task, fraction=0.1, seed=0)
        t_local = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=512 * 1024**2)
        t_init = time.perf_counter() - t0
        pool = ScoringPool(PoolSpec(num_actors=2, num_cpus=1))
        try:
            t1 = time.perf_counter()
            pool.start(bench.task)
            t_start = time.perf_counter() - t1
            t1 = time.perf_counter()
            remote = pool.select(selector, bench.original, tiled, task=bench.task, fraction=0.1, seed=0)
            t_request = time.perf_counter() - t1
        finally:
            pool.close()
            ray.shutdown()
        t_cold = time.perf_counter() - t0
        mismatch = coreset_mismatch(remote, local)
        assert mismatch is None, f"pool and in-process coresets differ: {mismatch}"
        row = {"n": n, "in_process_s": t_local, "ray_init_s": t_init, "pool_start_s": t_start, "request_s": t_request,
               "cold_total_s": t_cold, "cold_vs_in_process": t_local / t_cold}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"rows": rows, "loadavg_at_end": os.getloadavg()[0]}


def ihvp(repeats: int, damping: float) -> dict[str, Any]:
    """EK-FAC set-up + self-influence scoring over every layer of the digits MLP (forget set, Hessian on retain), by
    Fisher labels and eigenvalue-correction form; LiSSA on the head at ``damping`` against the exact scores."""
    from scipy.stats import spearmanr

    from erasus_ray.selectors import _ihvp, get_selector

    bench = load("digits")
    model = bench.original.eval()
    forget, retain = bench.train.subset(bench.forget_ids), bench.train.subset(bench.retain_ids)

    def scores(**kwargs: Any) -> np.ndarray:
        return np.asarray(get_selector("influence", **kwargs).score(model, forget, bench.task, 0, retain=retain))

    kfac: list[dict[str, Any]] = []
    fast = scores(scope="all", ihvp="kfac", fisher="expected")
    for label, kwargs, correction in [
        ("expected, one-GEMM correction", {"fisher": "expected"}, _ihvp.eigenbasis_second_moment),
        ("expected, per-sample correction (before)", {"fisher": "expected"}, _ihvp._eigenbasis_second_moment_per_sample),
        ("mc (1 draw)", {"fisher": "mc"}, _ihvp.eigenbasis_second_moment),
    ]:
        original = _ihvp.eigenbasis_second_moment
        _ihvp.eigenbasis_second_moment = correction
        try:
            t = median_time(lambda kw=kwargs: scores(scope="all", ihvp="kfac", **kw), repeats)
            got = scores(scope="all", ihvp="kfac", **kwargs)
        finally:
            _ihvp.eigenbasis_second_moment = original
        kfac.append({"label": label, "seconds": t, "max_rel_diff_vs_gemm": float(np.max(np.abs(got - fast) / np.abs(fast)))})
        print(json.dumps(kfac[-1]), flush=True)
    exact = scores(scope="last", ihvp="exact", damping=damping)
    lissa: list[dict[str, Any]] = []
    for label, depth in [("fixed depth 500 (before)", 500), ("auto depth", "auto")]:
        selector = get_selector("influence", scope="last", ihvp="lissa", damping=damping, lissa_depth=depth)
        t0 = time.perf_counter()
        state = selector.shared_state(model, forget, bench.task, 0, retain=retain)
        got = np.asarray(selector.score(model, forget, bench.task, 0, shared=state))
        seconds = time.perf_counter() - t0  # one run: seconds to minutes
        ratio = got / exact
        lissa.append({"label": label, "seconds": seconds, "median_ratio": float(np.median(ratio)),
                      "ratio_p5_p95": [float(np.percentile(ratio, 5)), float(np.percentile(ratio, 95))],
                      "spearman": float(spearmanr(got, exact).statistic), **{k: v for k, v in state.info.items() if k.startswith("lissa")}})
        print(json.dumps(lissa[-1]), flush=True)
    return {"kfac": kfac, "lissa": lissa, "damping": damping, "n_forget": len(forget), "n_retain": len(retain), "repeats": repeats}


def write_report(out: Path, results: dict[str, Any], command: str) -> None:
    lines = ["# Selector scoring: throughput, memory, Ray actors", "", f"Command: `{command}`", "",
             f"Machine: {results['machine']}. One torch thread per process. Medians of {results['repeats']} samples after a warm-up (a sample of an operation under 50 ms averages back-to-back calls that fill 50 ms).", ""]
    if results.get("throughput"):
        lines += ["## Throughput (samples/s; ratio to batched training on the same model and batch size)", "",
                  "| task | n | train | el2n | gradient_norm auto (path) | gradient_norm func | influence / 1 train epoch on forget |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in results["throughput"]:
            lines.append(
                f"| {r['task']} | {r['n_scored']} | {r['train_samples_per_s']:.0f} | {r['el2n_samples_per_s']:.0f} ({r['el2n_vs_train']:.2f}x) | "
                f"{r['gradient_norm[auto]_samples_per_s']:.0f} ({r['gradient_norm[auto]_vs_train']:.2f}x, {r['gradient_norm_auto_path']}) | "
                f"{r['gradient_norm[func]_samples_per_s']:.0f} ({r['gradient_norm[func]_vs_train']:.2f}x) | "
                f"{r['influence_forget_s'] * 1000:.1f} ms / {r['train_epoch_forget_s'] * 1000:.1f} ms = {_ratio(r)} |"
            )
        lines.append("")
    if results.get("memory"):
        lines += ["## Peak memory vs scored-set size (MNIST-5k CNN, fresh process each)", "",
                  "| selector | n | resident before scoring (MB) | peak while scoring (MB) | growth (MB) |",
                  "| --- | --- | --- | --- | --- |"]
        for r in results["memory"]:
            lines.append(f"| {r.get('selector', 'gradient_norm[func]')} | {r['n']} | {r['rss_mb_before']:.0f} | "
                         f"{r['peak_rss_mb_during']:.0f} | {r['growth_mb']:.1f} |")
        lines.append("")
    if results.get("actors"):
        a = results["actors"]
        lines += ["## Ray scoring pool (MNIST-5k CNN, gradient_norm, 10% coreset)", "",
                  f"Pool start-up (actor processes up, before any request): 1 actor {a[0]['start_1_actors_s']:.2f} s, "
                  f"2 actors {a[0]['start_2_actors_s']:.2f} s. Request columns are on a running pool (a service or a "
                  "continual-unlearning loop); \"cold\" = start-up + one request (one `ErasusUnlearner(distributed='ray').fit`).", "",
                  "| path | n | in process (s) | 1 actor (s) | 2 actors (s) | 2 vs 1 actor | 2 actors vs in process | cold 2 actors (s) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in a:
            path = "torch.func" if r["method"] == "func" else "factored"
            lines.append(f"| {path} | {r['n']} | {r['in_process_s']:.2f} | {r['actors_1_s']:.2f} | {r['actors_2_s']:.2f} | "
                         f"{r['speedup_2_vs_1_actor']:.2f}x | {r['speedup_2_actors_vs_in_process']:.2f}x | {r['cold_2_actors_s']:.2f} |")
        lines.append("")
    if results.get("crossover"):
        lines += ["## Cold start vs in process at large forget sets (MNIST-5k CNN tiled, gradient_norm factored, 10% coreset)", "",
                  "One `ErasusUnlearner(distributed='ray')` selection with Ray not yet running: `ray.init` + 2-actor pool "
                  "start-up + one request + shutdown, against in-process scoring. One run per size.", "",
                  "| n | in process (s) | ray.init (s) | pool start (s) | request (s) | cold total (s) | in process / cold |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in results["crossover"]["rows"]:
            lines.append(f"| {r['n']} | {r['in_process_s']:.1f} | {r['ray_init_s']:.1f} | {r['pool_start_s']:.1f} | "
                         f"{r['request_s']:.1f} | {r['cold_total_s']:.1f} | {r['cold_vs_in_process']:.2f}x |")
        lines.append("")
    if results.get("ihvp"):
        h = results["ihvp"]
        lines += ["## Influence back-ends on the digits MLP (EK-FAC over every layer; LiSSA on the head)", "",
                  f"Self-influence of the {h['n_forget']} forget samples, Hessian / Fisher on the retain sample; EK-FAC: set-up + "
                  f"scoring, median of {h['repeats']} samples; max relative score difference against the one-GEMM correction.", "",
                  "| EK-FAC Fisher labels, correction | seconds | max rel. diff |", "| --- | --- | --- |"]
        lines += [f"| {r['label']} | {r['seconds']:.3f} | {r['max_rel_diff_vs_gemm']:.1e} |" for r in h["kfac"]]
        lines += ["", f"LiSSA at damping {h['damping']:g} (classifier head, exact closed form as reference; one run each):", "",
                  "| LiSSA depth | steps | seconds | median score / exact | 5th-95th pct | Spearman |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['label']} ({r['lissa_depth']}) | {r.get('lissa_steps', r['lissa_depth'])} | {r['seconds']:.1f} | "
                  f"{r['median_ratio']:.3f} | {r['ratio_p5_p95'][0]:.3f}-{r['ratio_p5_p95'][1]:.3f} | {r['spearman']:.4f} |"
                  for r in h["lissa"]]
        lines.append("")
    lines += ["## Findings (computed from the numbers above)", ""] + findings(results) + [f"- {n}" for n in results.get("notes", [])] + [""]
    atomic_write_text(out / "RESULTS.md", "\n".join(lines))


def _ratio(r: dict[str, Any]) -> str:
    """The influence / epoch ratio, with its interquartile range over the paired samples when measured so."""
    iqr = r.get("influence_vs_train_epoch_forget_iqr")
    text = f"{r['influence_vs_train_epoch_forget']:.2f}x"
    return text + (f" (IQR {iqr[0]:.2f}-{iqr[1]:.2f}x over {r.get('influence_pairs', '?')} pairs)" if iqr else "")


def findings(results: dict[str, Any]) -> list[str]:
    """Each goal of issue #3, met or not, with the measured number."""
    out = []
    for r in results.get("throughput", []):
        g = r["gradient_norm[auto]_vs_train"]
        i = r["influence_vs_train_epoch_forget"]
        out.append(f"- {r['task']}: per-sample gradient norms ({r['gradient_norm_auto_path']}) at {g:.2f}x training "
                   f"throughput (goal >= 0.5x: {'met' if g >= 0.5 else 'NOT met'}); torch.func path "
                   f"{r['gradient_norm[func]_vs_train']:.2f}x; influence incl. its Hessian {_ratio(r)} one training epoch over "
                   f"the {r['n_forget']} forget samples (goal <= 3x: {'met' if i <= 3 else 'NOT met'}; "
                   f"{r['influence_forget_s'] * 1000:.1f} ms vs {r['train_epoch_forget_s'] * 1000:.1f} ms).")
    mem = results.get("memory", [])
    for label in dict.fromkeys(m.get("selector", "gradient_norm[func]") for m in mem):
        rows = [m for m in mem if m.get("selector", "gradient_norm[func]") == label]
        growth = [m["growth_mb"] for m in rows]
        # flat: the growth at the largest n is within 25% + 16 MB (resident-set sampling noise, seen as 18-75 MB
        # swings between runs of the same size) of the growth at the smallest n
        flat = growth[-1] <= 1.25 * growth[0] + 16.0
        out.append(f"- {label}: memory while scoring grows {min(growth):.0f}-{max(growth):.0f} MB for n = {rows[0]['n']}..{rows[-1]['n']} "
                   f"({rows[-1]['growth_mb']:.0f} MB at the largest n vs {rows[0]['growth_mb']:.0f} MB at the smallest: "
                   f"{'flat in n' if flat else 'NOT flat in n'}).")
    act = results.get("actors", [])
    for method in dict.fromkeys(r.get("method", "func") for r in act):
        rows = [r for r in act if r.get("method", "func") == method]
        path = "torch.func" if method == "func" else "factored"
        best = max(rows, key=lambda r: r["n"])
        # the smallest n from which every larger measured n pays off too
        by_n = sorted(rows, key=lambda r: r["n"])
        pays = [r["n"] for i, r in enumerate(by_n) if all(x["speedup_2_actors_vs_in_process"] > 1 for x in by_n[i:])]
        cold = [r["n"] for i, r in enumerate(by_n) if all(x["in_process_s"] > x["cold_2_actors_s"] for x in by_n[i:])]
        out.append(f"- {path}: 2 vs 1 actors on a running pool {best['speedup_2_vs_1_actor']:.2f}x at n = {best['n']} (goal >= 1.6x: "
                   f"{'met' if best['speedup_2_vs_1_actor'] >= 1.6 else 'NOT met'}); 2 actors vs in process "
                   f"{best['speedup_2_actors_vs_in_process']:.2f}x. Ray pays off on a running pool from n = "
                   f"{min(pays) if pays else 'none of the measured sizes'}; including the pool's start-up, from n = "
                   f"{min(cold) if cold else 'none of the measured sizes'}.")
    cross = results.get("crossover", {}).get("rows", [])
    if cross:
        from erasus_ray.distributed import AUTO_THRESHOLD

        by_n = sorted(cross, key=lambda r: r["n"])
        pays = [r["n"] for i, r in enumerate(by_n) if all(x["cold_vs_in_process"] > 1 for x in by_n[i:])]
        out.append(f"- Cold start (ray.init + pool + request) beats in-process scoring from n = "
                   f"{min(pays) if pays else 'none of the measured sizes'} (measured {by_n[0]['n']}..{by_n[-1]['n']}); "
                   f"distributed='auto' switches at {AUTO_THRESHOLD} forget samples when Ray is not running.")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        n, _, label = args.memory_child.partition(":")
        memory_child(int(n), label or "gradient_norm[func]")
        return 0
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from erasus_ray.utils.malloc import hold_freed_memory_from_env

    malloc_held = hold_freed_memory_from_env()  # as every erasus-ray command, actor, worker and trial process does
    from erasus_ray.experiment import warm_up

    warm_up()
    if args.report_only:
        out = Path(args.out)
        results = json.loads((out / "results.json").read_text())
        results["notes"] = args.note or results.get("notes", [])
        atomic_write_text(out / "results.json", json.dumps(results, indent=2))
        write_report(out, results, results.get("command", "(see results.json)"))
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, loadavg at start {os.getloadavg()[0]:.2f}"
    machine += f"; glibc malloc thresholds {'held (ERASUS_RAY_MALLOC_MMAP_MB, as erasus-ray processes run)' if malloc_held else 'at their defaults'}"
    results: dict[str, Any] = {"machine": machine, "repeats": args.repeats}
    previous: dict[str, Any] = {}
    if args.merge and (out / "results.json").exists():
        previous = json.loads((out / "results.json").read_text())
        # the crossover part times one run per size: keep the repeats of the timed parts it did not re-run
        timed = any(p in parts for p in ("throughput", "actors"))
        results = {**previous, "repeats": args.repeats if timed else previous.get("repeats", args.repeats)}
        results["machine"] = f"{previous.get('machine', '?')}; merged run ({', '.join(parts)}): {machine}"
    if "throughput" in parts:
        rows = throughput([t for t in args.tasks.split(",") if t], args.repeats)
        kept = [r for r in previous.get("throughput", []) if r["task"] not in {x["task"] for x in rows}]
        order = list(TASKS)
        results["throughput"] = sorted(kept + rows, key=lambda r: order.index(r["task"]) if r["task"] in order else len(order))
    if "memory" in parts:
        results["memory"] = memory([int(s) for s in args.sizes.split(",")], args.memory_selectors.split(","))
    if "actors" in parts:
        results["actors"] = actors([int(s) for s in args.actor_sizes.split(",")], args.repeats)
    if "crossover" in parts:
        results["crossover"] = crossover([int(s) for s in args.crossover_sizes.split(",")])
    if "ihvp" in parts:
        results["ihvp"] = ihvp(args.repeats, args.ihvp_damping)
    results["loadavg_at_end"] = os.getloadavg()[0]
    results["notes"] = (previous.get("notes", []) if args.merge else []) + args.note
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    command = "python benchmarks/selector_scoring/run.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--note") and a not in args.note)
    if args.merge and previous.get("command"):
        command = f"{previous['command']}` then `{command}"
    results["command"] = command
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    write_report(out, results, command)
    print(f"wrote {out / 'results.json'} and {out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
