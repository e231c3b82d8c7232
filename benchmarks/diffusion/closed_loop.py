#!/usr/bin/env python
"""Closed loop vs open loop on ``digits_diffusion``: a generic strategy stopped by the judged erased-class rate.

For each method: the open-loop run of ``run.py`` (the strategy's default budget, no target: nothing stops it) and
the closed-loop run with ``gold=bench.gold`` (target ``generation``: the erased class's judged generation rate at the
gold model's level plus its sampling tolerance, with the retained classes' judged accuracy as a guard). Both on the
whole forget set (``selector=None``). Prints a markdown table; the numbers are the judged metrics of ``run.py``.

Example (the command RESULTS.md records)::

    ERASUS_RAY_CACHE=/work/main/.cache/erasus-ray python benchmarks/diffusion/closed_loop.py --seed 0 \\
        --methods grad_diff,esd

With ``--out`` the rows are appended to a csv (``--references`` adds the original and gold models' rows);
``--table closed_loop.csv`` prints the per-method summary over the seeds of such a csv (:func:`table`).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from erasus_ray import ErasusUnlearner
from erasus_ray.benchmarks import load_benchmark
from erasus_ray.control import ControlConfig
from erasus_ray.evaluation import run_metrics

METRICS = ("erased_generation_rate", "retained_generation_acc", "retained_frechet")


def unlearn(bench, method: str, closed: bool, budget_seconds: float, budget_steps: int = 1000,
            records: str = "", tag: str = "") -> tuple[dict, float]:
    """One run of ``method`` (closed: with ``gold=``); ``budget_seconds`` 0 = no time limit, only ``budget_steps``.
    ``records``: a folder to write the run's verification record and window history to (json, named by ``tag``)."""
    start = time.perf_counter()
    control = ControlConfig(budget_steps=budget_steps, budget_seconds=budget_seconds or None)
    result = ErasusUnlearner(copy.deepcopy(bench.original), strategy=method, selector=None, fraction=None,
                             task=bench.task, seed=bench.seed, progress=False, control=control).fit(
        forget_data=bench.forget, retain_data=bench.retain, gold=bench.gold if closed else None)
    seconds = time.perf_counter() - start
    splits = {"forget": bench.forget, "retain": bench.retain, "test": bench.test}
    row = run_metrics(result.model, bench.task, splits, METRICS, seed=bench.seed)
    v = result.verification
    row.update(mode=v.get("mode"), passed=v.get("passed"), steps=result.report.steps, stopped=v.get("stopped", ""),
               verifications=v.get("verifications", "-"))
    if records:
        out = Path(records) / f"seed{bench.seed}_{tag}{method}_{'closed' if closed else 'open'}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"verification": v, "history": result.report.history, "seconds": seconds}, indent=1, default=str))
    return row, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--forget-class", type=int, default=3, help="the digit to erase (the defaults were chosen on 3)")
    parser.add_argument("--methods", default="grad_diff,esd")
    parser.add_argument("--budget-seconds", type=float, default=300.0, help="wall-clock budget; 0: none (the steps "
                        "alone: a run that does not depend on the machine's load)")
    parser.add_argument("--budget-steps", type=int, default=1000, help="runner-step budget of the closed loop")
    parser.add_argument("--loops", default="open,closed", help="which runs per method: open (defaults), closed (gold)")
    parser.add_argument("--out", default="", help="csv to append the rows to (written as measured)")
    parser.add_argument("--references", action="store_true", help="first measure the original and the gold model")
    parser.add_argument("--records", default="", help="folder for each run's verification record and window history (json)")
    parser.add_argument("--table", default="", help="a csv written by --out: only print its summary table")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    loops = [{"open": False, "closed": True}[name] for name in args.loops.split(",")]
    torch.set_num_threads(1)
    bench = load_benchmark("digits_diffusion", seed=args.seed, forget_class=args.forget_class)
    print("| seed | method | loop | erased-class rate | other classes judged acc | Frechet | steps | seconds | stopped "
          "| load average |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    splits = {"forget": bench.forget, "retain": bench.retain, "test": bench.test}
    for name in ("original", "gold") if args.references else ():
        r = run_metrics(getattr(bench, name), bench.task, splits, METRICS, seed=bench.seed)
        print(f"| {args.seed} | {name} | - | {r['erased_generation_rate']:.3f} | {r['retained_generation_acc']:.3f} | "
              f"{r['retained_frechet']:.2f} | - | - | - | {_load()} |", flush=True)
        if args.out:
            _append(args.out, {"seed": args.seed, "forget_class": args.forget_class, "method": name, "loop": "-", "budget_steps": "", "budget_seconds": "",
                               **r, "passed": "", "steps": "", "verifications": "", "stopped": "", "seconds": "",
                               "load1": _load()})
    for method in args.methods.split(","):
        for closed in loops:
            r, s = unlearn(bench, method, closed, args.budget_seconds, args.budget_steps, args.records, f"class{args.forget_class}_")
            print(f"| {args.seed} | {method} | {'closed (gold)' if closed else 'open (defaults)'} | "
                  f"{r['erased_generation_rate']:.3f} | {r['retained_generation_acc']:.3f} | {r['retained_frechet']:.2f} | "
                  f"{r['steps']} ({r['verifications']} verifications) | {s:.1f} | {r['mode']}, passed={r['passed']}: {r['stopped']} | {_load()} |", flush=True)
            if args.out:
                _append(args.out, {"seed": args.seed, "forget_class": args.forget_class, "method": method, "loop": "closed" if closed else "open",
                                   "budget_steps": args.budget_steps, "budget_seconds": args.budget_seconds,
                                   **{k: r[k] for k in (*METRICS, "passed", "steps", "verifications", "stopped")},
                                   "seconds": round(s, 1), "load1": _load()})


def table(path: str, max_rate: float = 0.25, max_drop: float = 0.15) -> str:
    """Markdown summary of a ``--out`` csv's closed-loop rows, per method over its seeds: how many verified (target
    and guard held), how many are inside the effect tests' bounds (erased-class rate <= ``max_rate``, other classes'
    judged accuracy >= the seed's gold model's - ``max_drop``), mean +- std (ddof 1) of rate / others / Frechet,
    and mean steps, verifications and seconds; then the gold rows it compares with."""
    rows = list(csv.DictReader(open(path)))
    gold = {r["seed"]: r for r in rows if r["method"] == "gold"}
    fmt = lambda xs: f"{np.mean(xs):.3f} +- {np.std(xs, ddof=1) if len(xs) > 1 else 0.0:.3f}"  # noqa: E731
    out = ["| method | seeds | verified | inside both bounds | erased-class rate | other classes judged acc | "
           "Frechet | steps | verifications | seconds |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method in dict.fromkeys(r["method"] for r in rows if r["loop"] == "closed"):
        runs = [r for r in rows if r["method"] == method and r["loop"] == "closed"]
        num = lambda k: [float(r[k]) for r in runs]  # noqa: E731
        inside = sum(float(r["erased_generation_rate"]) <= max_rate and r["seed"] in gold and float(
            r["retained_generation_acc"]) >= float(gold[r["seed"]]["retained_generation_acc"]) - max_drop for r in runs)
        out.append(f"| {method} | {','.join(r['seed'] for r in runs)} | {sum(r['passed'] == 'True' for r in runs)}/"
                   f"{len(runs)} | {inside}/{len(runs)} | {fmt(num('erased_generation_rate'))} | "
                   f"{fmt(num('retained_generation_acc'))} | {np.mean(num('retained_frechet')):.2f} | "
                   f"{np.mean(num('steps')):.0f} | {np.mean(num('verifications')):.1f} | {np.mean(num('seconds')):.0f} |")
    for name in ("original", "gold"):
        ref = [r for r in rows if r["method"] == name]
        if ref:
            out.append(f"| {name} | {','.join(r['seed'] for r in ref)} | - | - | "
                       f"{fmt([float(r['erased_generation_rate']) for r in ref])} | "
                       f"{fmt([float(r['retained_generation_acc']) for r in ref])} | "
                       f"{np.mean([float(r['retained_frechet']) for r in ref]):.2f} | - | - | - |")
    return "\n".join(out)


def _append(path: str, row: dict) -> None:
    new = not Path(path).exists()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _load() -> str:
    """The 1-minute load average when a row is written: seconds on a shared machine mean little without it."""
    try:
        with open("/proc/loadavg") as fh:
            return fh.read().split()[0]
    except OSError:
        return "-"


if __name__ == "__main__":
    main()
