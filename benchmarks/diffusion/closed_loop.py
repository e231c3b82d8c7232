#!/usr/bin/env python
"""Closed loop vs open loop on ``digits_diffusion``: a generic strategy stopped by the judged erased-class rate.

For each method: the open-loop run of ``run.py`` (the strategy's default budget, no target: nothing stops it) and
the closed-loop run with ``gold=bench.gold`` (target ``generation``: the erased class's judged generation rate at the
gold model's level plus its sampling tolerance, with the retained classes' judged accuracy as a guard). Both on the
whole forget set (``selector=None``). Prints a markdown table; the numbers are the judged metrics of ``run.py``.

Example (the command RESULTS.md records)::

    ERASUS_RAY_CACHE=/work/main/.cache/erasus-ray python benchmarks/diffusion/closed_loop.py --seed 0 \\
        --methods grad_diff,esd
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from erasus_ray import ErasusUnlearner
from erasus_ray.benchmarks import load_benchmark
from erasus_ray.evaluation import run_metrics

METRICS = ("erased_generation_rate", "retained_generation_acc", "retained_frechet")


def unlearn(bench, method: str, closed: bool, budget_seconds: float) -> tuple[dict, float]:
    start = time.perf_counter()
    result = ErasusUnlearner(copy.deepcopy(bench.original), strategy=method, selector=None, fraction=None,
                             task=bench.task, seed=bench.seed, progress=False, budget_seconds=budget_seconds).fit(
        forget_data=bench.forget, retain_data=bench.retain, gold=bench.gold if closed else None)
    seconds = time.perf_counter() - start
    splits = {"forget": bench.forget, "retain": bench.retain, "test": bench.test}
    row = run_metrics(result.model, bench.task, splits, METRICS, seed=bench.seed)
    v = result.verification
    row.update(mode=v.get("mode"), passed=v.get("passed"), steps=result.report.steps, stopped=v.get("stopped", ""))
    return row, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="grad_diff,esd")
    parser.add_argument("--budget-seconds", type=float, default=300.0)
    parser.add_argument("--loops", default="open,closed", help="which runs per method: open (defaults), closed (gold)")
    args = parser.parse_args()
    loops = [{"open": False, "closed": True}[name] for name in args.loops.split(",")]
    torch.set_num_threads(1)
    bench = load_benchmark("digits_diffusion", seed=args.seed)
    print("| seed | method | loop | erased-class rate | other classes judged acc | Frechet | steps | seconds | stopped "
          "| load average |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for method in args.methods.split(","):
        for closed in loops:
            r, s = unlearn(bench, method, closed, args.budget_seconds)
            print(f"| {args.seed} | {method} | {'closed (gold)' if closed else 'open (defaults)'} | "
                  f"{r['erased_generation_rate']:.3f} | {r['retained_generation_acc']:.3f} | {r['retained_frechet']:.2f} | "
                  f"{r['steps']} | {s:.1f} | {r['mode']}, passed={r['passed']}: {r['stopped']} | {_load()} |", flush=True)


def _load() -> str:
    """The 1-minute load average when a row is written: seconds on a shared machine mean little without it."""
    try:
        with open("/proc/loadavg") as fh:
            return fh.read().split()[0]
    except OSError:
        return "-"


if __name__ == "__main__":
    main()
