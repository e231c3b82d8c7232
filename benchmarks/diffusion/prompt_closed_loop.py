#!/usr/bin/env python
"""Closed loop on ``digits_prompt_diffusion``: the cross-attention methods stopped by the judged erased-class rate.

Each method runs on the whole forget set (``selector=None``) with ``gold=bench.gold`` (target ``generation``: the
erased class's judged generation rate at the gold model's level plus its sampling tolerance, the retained classes'
judged accuracy as a guard). Gradient methods (ESD-x, concept_ablation) are stopped by the controller; a closed-form
one that declares ``Strategy.strength`` (UCE: ``erase_scale``) gets the strength search. The open-loop rows to compare
with are the 3-seed prompt leaderboard's (``prompt_leaderboard.csv``, same models and judge settings).

Prints a markdown table and appends the rows to ``--out``; the metrics are run.py's (32 judged images per class).

Example (the command RESULTS.md records)::

    ERASUS_RAY_CACHE=/work/main/.cache/erasus-ray nice -n 10 python benchmarks/diffusion/prompt_closed_loop.py \\
        --seeds 0,1,2 --methods esd:variant=x,uce,concept_ablation --out prompt_closed_loop.csv
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import time
from pathlib import Path

import torch

from erasus_ray import ErasusUnlearner
from erasus_ray.benchmarks import load_benchmark
from erasus_ray.control import ControlConfig
from erasus_ray.evaluation import run_metrics

METRICS = ("erased_generation_rate", "retained_generation_acc", "retained_frechet")
FIELDS = ("seed", "forget_class", "method", "mode", "passed", "steps", "strength", "erased_generation_rate", "retained_generation_acc",
          "retained_frechet", "seconds", "load1", "stopped", "guard")


def parse_method(spec: str) -> tuple[str, dict]:
    """``"esd:variant=x"`` -> ``("esd", {"variant": "x"})``."""
    name, _, rest = spec.partition(":")
    params = dict(item.split("=", 1) for item in rest.split(";") if item)
    return name, params


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def closed_loop(bench, method: str, params: dict, budget_seconds: float, dump: str = "", budget_steps: int = 1000) -> dict:
    """One closed-loop fit and its judged metrics; seconds are the fit's wall clock (not the metrics'). ``dump``: a
    folder to write the fit's verification record and per-window history to (``seed<S>-<method>.json``), to read
    why a run did not verify (each window's violation, guard, step size). ``budget_seconds`` 0: no time limit, only
    ``budget_steps`` (a run that does not depend on the machine's load)."""
    start = time.perf_counter()
    result = ErasusUnlearner(copy.deepcopy(bench.original), strategy=method, selector=None, fraction=None,
                             distributed="none", task=bench.task, seed=bench.seed, progress=False,
                             control=ControlConfig(budget_steps=budget_steps, budget_seconds=budget_seconds or None),
                             **params).fit(
        forget_data=bench.forget, retain_data=bench.retain, gold=bench.gold)
    seconds = time.perf_counter() - start
    splits = {"forget": bench.forget, "retain": bench.retain, "test": bench.test}
    row = run_metrics(result.model, bench.task, splits, METRICS, seed=bench.seed)
    v = result.verification
    if dump:
        Path(dump).mkdir(parents=True, exist_ok=True)
        record = {"verification": v, "history": result.report.history, "seconds": seconds}
        name = f"seed{bench.seed}-{method}{'-' + '-'.join(f'{k}={x}' for k, x in params.items()) if params else ''}.json"
        Path(dump, name).write_text(json.dumps(record, indent=1, default=str))
    strength = v.get("strength")
    return {**row, "mode": v.get("mode"), "passed": v.get("passed"), "steps": result.report.steps,
            "strength": json.dumps(strength["attempts"]) if strength else "", "seconds": round(seconds, 1),
            "load1": load1(), "stopped": v.get("stopped", "") or result.report.stopped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="esd:variant=x,uce,concept_ablation",
                        help="comma-separated name[:key=value;key=value]")
    parser.add_argument("--budget-seconds", type=float, default=600.0, help="wall-clock budget; 0: none")
    parser.add_argument("--budget-steps", type=int, default=1000, help="runner-step budget of the closed loop")
    parser.add_argument("--judge-samples", type=int, default=32)
    parser.add_argument("--forget-class", type=int, default=3, help="the digit to erase (the defaults were chosen on 3)")
    parser.add_argument("--out", default="")
    parser.add_argument("--dump", default="", help="folder for each fit's verification record and window history")
    parser.add_argument("--note", default="", help="written to the csv's last column (named guard for its first use): "
                        "the library version the rows were measured with, e.g. its commit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| seed | method | mode | passed | steps / strength tried | rate | other classes | Frechet | seconds | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for seed in (int(s) for s in args.seeds.split(",")):
        bench = load_benchmark("digits_prompt_diffusion", seed=seed, judge_samples=args.judge_samples,
                               forget_class=args.forget_class)
        for spec in args.methods.split(","):
            method, params = parse_method(spec)
            r = {"seed": seed, "forget_class": args.forget_class, "method": spec, **closed_loop(bench, method, params, args.budget_seconds, args.dump, args.budget_steps),
                 "guard": args.note}
            print(f"| {seed} | {spec} | {r['mode']} | {r['passed']} | {r['steps']} {r['strength']} | "
                  f"{r['erased_generation_rate']:.3f} | {r['retained_generation_acc']:.3f} | "
                  f"{r['retained_frechet']:.2f} | {r['seconds']} | {r['load1']} |", flush=True)
            if args.out:
                new = not Path(args.out).exists()
                with open(args.out, "a", newline="") as fh:
                    writer = csv.DictWriter(fh, FIELDS, extrasaction="ignore")
                    if new:
                        writer.writeheader()
                    writer.writerow(r)


if __name__ == "__main__":
    main()
