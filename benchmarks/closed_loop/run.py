#!/usr/bin/env python
"""Closed loop vs the old fixed defaults, for every strategy, on tasks the defaults were and were not tuned on.

For each task/scenario and strategy (full forget set):

* ``fixed``: the strategy's own ``default_epochs x default_lr`` (the open-loop defaults before the closed loop),
  then verified once against the same target;
* ``closed``: ``ErasusUnlearner`` defaults: the closed loop runs until the target holds on the whole forget set.

Then the coreset claim under the controller (``--coreset-strategies``): the adaptive EL2N coreset (``fraction="auto"``)
vs the full forget set, both closed-loop at the same verified target: end-to-end seconds (selection included) and
the final coreset fraction - the measured redundancy of the forget set.

Honest evaluation: the test split is cut in two halves with the seed; the controller's held-out reference
(``heldout_data``) is half A, every reported metric (forget/retain/test accuracy, MIA, Avg.Gap to the model retrained
without the forget set) uses half B, which the controller never saw. The target is ``auto``: ``class`` for a class
scenario, ``heldout`` otherwise.

Writes ``results.csv`` and ``RESULTS.md`` (per task: verified yes/no, Avg.Gap in points, seconds). Example (the
command RESULTS.md records)::

    ERASUS_RAY_CACHE=/tmp/erasus-bench-cache python benchmarks/closed_loop/run.py --out benchmarks/closed_loop
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from erasus_ray.tasks import missing
from erasus_ray.utils.atomic import atomic_write_text

DEFAULT_TASKS = ("digits:class,digits:random10,wine:class,wine:random10,iris:class,breast_cancer:random10,"
                 "mnist5k:class,mnist5k:random10,authors:forget05,authors:forget10")
#: on the slower tasks (a CNN, a GPT-2) every strategy twice would take hours on 2 cores: these, named in RESULTS.md
SUBSET = {
    "mnist5k": "grad_diff,npo,neggrad_plus,scrub,gradient_ascent,random_label,saliency_unlearning,l1_sparse",
    "authors": "npo,simnpo,grad_diff,gradient_ascent,neggrad_plus,idk_dpo,rmu,undial",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategies", default="all", help="comma-separated names, or 'all' (every strategy the task supports)")
    p.add_argument("--coreset-strategies", default="grad_diff,npo,neggrad_plus,scrub")
    p.add_argument("--authors-variant", default="ci", choices=["ci", "full"])
    p.add_argument("--out", default="benchmarks/closed_loop")
    return p.parse_args(argv)


def strategies_for(task: str, bench: Any, requested: str) -> list[str]:
    from erasus_ray.strategies import STRATEGIES

    if requested != "all":
        return requested.split(",")
    if task in SUBSET:
        return SUBSET[task].split(",")
    return [n for n in STRATEGIES.names()
            if n != "retrain" and not STRATEGIES.get(n).contract_exempt_reason
            and not missing(bench.task, STRATEGIES.get(n).requires)]


def split_test(bench: Any, seed: int) -> tuple[Any, Any]:
    """Half A (the controller's held-out reference) and half B (evaluation only) of the test split."""
    ids = np.random.default_rng(seed + 7).permutation(bench.test.ids)
    half = len(ids) // 2
    return bench.test.subset(np.sort(ids[:half])), bench.test.subset(np.sort(ids[half:]))


def one_run(bench: Any, name: str, mode: str, heldout: Any, test_b: Any, gold: dict[str, float], seed: int) -> dict[str, Any]:
    from erasus_ray import ErasusUnlearner
    from erasus_ray.evaluation import evaluate
    from erasus_ray.strategies import STRATEGIES

    kw: dict[str, Any] = {"strategy": name, "seed": seed, "progress": False}
    if mode == "fixed":
        kw.update(selector=None, epochs=STRATEGIES.get(name).default_epochs)
    elif mode == "closed":
        kw.update(selector=None)
    else:  # closed + adaptive EL2N coreset
        kw.update(selector="el2n")
    start = time.perf_counter()
    result = ErasusUnlearner(bench.original, **kw).fit(forget_data=bench.forget, retain_data=bench.retain, heldout_data=heldout)
    seconds = time.perf_counter() - start
    m = evaluate(result.model, forget=bench.forget, retain=bench.retain, test=test_b, task=bench.task, gold_metrics=gold, seed=seed)
    v = result.verification
    return {"strategy": name, "mode": mode, "verified": v.get("passed"), "target": v.get("target"), "avg_gap": m["avg_gap"],
            "seconds": seconds, "select_s": result.timings.get("select", 0.0), "steps": result.report.steps,
            "final_fraction": v.get("final_fraction", len(result.coreset.ids) / len(bench.forget)),
            "lr": v.get("lr"), "stopped": result.report.stopped,
            **{k: m.get(k) for k in ("forget_acc", "retain_acc", "test_acc", "mia_svc_efficacy", "mia_loss_auc",
                                     "forget_loss", "retain_loss", "test_loss", "forget_rougeL", "retain_rougeL")}}


def run_task(spec: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from erasus_ray.benchmarks import load_benchmark
    from erasus_ray.evaluation import evaluate

    task, scenario = spec.split(":")
    options = {"variant": args.authors_variant} if task == "authors" else {}
    bench = load_benchmark(task, scenario=scenario, seed=args.seed, **options)
    heldout, test_b = split_test(bench, args.seed)
    gold = evaluate(bench.gold, forget=bench.forget, retain=bench.retain, test=test_b, task=bench.task, seed=args.seed)
    orig = evaluate(bench.original, forget=bench.forget, retain=bench.retain, test=test_b, task=bench.task, gold_metrics=gold, seed=args.seed)
    rows = [{"task": spec, "strategy": "original", "mode": "-", "avg_gap": orig["avg_gap"], **{k: orig.get(k) for k in ("forget_acc", "test_acc")}}]
    names = strategies_for(task, bench, args.strategies)
    plan = [(n, mode) for n in names for mode in ("fixed", "closed")]
    plan += [(n, "coreset") for n in args.coreset_strategies.split(",") if n in names]
    for i, (name, mode) in enumerate(plan):
        try:
            row = one_run(bench, name, mode, heldout, test_b, gold, args.seed)
        except Exception as err:  # recorded, never dropped
            row = {"strategy": name, "mode": mode, "error": f"{type(err).__name__}: {err}"}
            traceback.print_exc()
        rows.append({"task": spec, **row})
        print(f"[{spec}] {i + 1}/{len(plan)} {name} {mode}: verified={row.get('verified')} gap={_pts(row.get('avg_gap'))} "
              f"{row.get('seconds', float('nan')):.2f}s", flush=True)
    return rows


def _pts(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _secs(r: dict[str, Any]) -> str:
    return f"{r['seconds']:.2f}"


def _yes(v: Any) -> str:
    return {True: "yes", False: "no", None: "n/a"}[v]


def task_table(rows: list[dict[str, Any]]) -> str:
    by = {(r["strategy"], r["mode"]): r for r in rows}
    lines = ["| strategy | fixed: verified | fixed: Avg.Gap | fixed: s | closed: verified | closed: Avg.Gap | closed: s | closed: steps |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in dict.fromkeys(r["strategy"] for r in rows if r["mode"] in ("fixed", "closed")):
        f, c = by.get((name, "fixed"), {}), by.get((name, "closed"), {})
        cell = lambda r, k: (r.get("error", "")[:40] + "...") if "error" in r else k(r)  # noqa: E731
        lines.append(f"| {name} | {cell(f, lambda r: _yes(r['verified']))} | {cell(f, lambda r: _pts(r['avg_gap']))} | "
                     f"{cell(f, _secs)} | {cell(c, lambda r: _yes(r['verified']))} | "
                     f"{cell(c, lambda r: _pts(r['avg_gap']))} | {cell(c, _secs)} | "
                     f"{cell(c, lambda r: str(r['steps']))} |")
    return "\n".join(lines)


def coreset_table(rows: list[dict[str, Any]]) -> str:
    by = {(r["task"], r["strategy"], r["mode"]): r for r in rows}
    lines = ["| task | strategy | full: verified | full: s | coreset: verified | coreset: s (select s) | final fraction | full s / coreset s | Avg.Gap full / coreset |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (task, name, mode), r in by.items():
        if mode != "coreset" or "error" in r:
            continue
        f = by.get((task, name, "closed"), {})
        if "error" in f or not f:
            continue
        lines.append(f"| {task} | {name} | {_yes(f['verified'])} | {f['seconds']:.2f} | {_yes(r['verified'])} | "
                     f"{r['seconds']:.2f} ({r['select_s']:.2f}) | {r['final_fraction']:.2f} | {f['seconds'] / max(r['seconds'], 1e-9):.2f}x | "
                     f"{_pts(f['avg_gap'])} / {_pts(r['avg_gap'])} |")
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> str:
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == task and "error" not in r]
        for mode in ("fixed", "closed"):
            got = [r for r in rs if r["mode"] == mode]
            if got:
                ver = sum(r["verified"] is True for r in got)
                better = sum(r["avg_gap"] < next(o["avg_gap"] for o in rs if o["strategy"] == "original") for r in got)
                out.append(f"| {task} | {mode} | {ver}/{len(got)} | {better}/{len(got)} | {np.median([r['seconds'] for r in got]):.2f} |")
    return "| task | mode | verified | Avg.Gap below original | median s |\n| --- | --- | --- | --- | --- |\n" + "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    import torch

    torch.set_num_threads(1)
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    load0 = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    for spec in args.tasks.split(","):
        rows += run_task(spec, args)
        _write(out, rows, args, argv, start, load0)
    return 0


def _write(out: Path, rows: list[dict[str, Any]], args: argparse.Namespace, argv: list[str] | None, start: float, load0: float) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", buf.getvalue())
    command = "python benchmarks/closed_loop/run.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    parts = [f"# Closed loop vs fixed defaults\n\nCommand: `{command}`\n",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, one torch thread, seed {args.seed}; "
             f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at the last write; {(time.perf_counter() - start) / 60:.1f} min. "
             "Metrics on the half of the test split the controller never saw; Avg.Gap to the model retrained without "
             "the forget set, in points.\n", "## Summary\n", summary(rows), "\n## Coreset under the controller\n", coreset_table(rows)]
    for task in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == task]
        orig = next(r for r in rs if r["strategy"] == "original")
        parts += [f"\n## {task}\n", f"original: Avg.Gap {_pts(orig['avg_gap'])}, forget acc {_pts(orig['forget_acc'])}\n", task_table(rs)]
    atomic_write_text(out / "RESULTS.md", "\n".join(parts) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
