#!/usr/bin/env python
"""Every registered strategy with its documented defaults, on the full forget set, against the retrained model.

For each task/scenario and seed: the original and retrain (gold) rows, then every strategy in the registry run
through :func:`erasus_ray.experiment.run_job` (the code path of ``ErasusUnlearner`` / ``erasus-ray unlearn``) with
``selector=None`` (the whole forget set) and the strategy's own defaults. Two strategies cannot unlearn the plain
original model, so the benchmark builds what they need and says so in a ``start: ...`` reference row before theirs:
``sisa`` unlearns a SISA ensemble trained here by :class:`~erasus_ray.SISATrainer` (the benchmark's model and
recipe, 3 shards x 2 slices), ``certified_removal`` the original model with its linear head refitted to the exact
optimum of the perturbed convex objective over the frozen features (:func:`train_certified_head`, lam 1e-3, sigma
1). Their unlearning seconds exclude that preparation (the start row's seconds). Strategies that do not support the
task are listed as skipped; a strategy that raises is recorded with its error, never silently dropped.

Part 2 (``--ray-train``): the authors GPT-2 with the task's default strategy, local runner vs Ray Train with 1 and
2 CPU workers (gloo): seconds and the overhead over local.

Writes ``results.csv``, ``leaderboard.md`` (mean +- std over seeds, sorted by Avg.Gap) and ``RESULTS.md``.
Example (the command RESULTS.md records)::

    ERASUS_RAY_CACHE=/tmp/erasus-bench-cache python benchmarks/strategy_leaderboard/run.py \\
        --tasks digits:class,digits:random10,authors:forget10 --seeds 0,1,2 --ray-train
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from erasus_ray.benchmarks.prepared import prepare_model  # sisa's SISA ensemble, certified_removal's certified head
from erasus_ray.tasks import missing
from erasus_ray.utils.atomic import atomic_write_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="digits:class,digits:random10,authors:forget10")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--strategies", default="all", help="comma-separated names, or 'all' (the registry)")
    p.add_argument("--authors-variant", default="ci", choices=["ci", "full"])
    p.add_argument("--ray-train", action="store_true", help="also time local vs Ray Train 1/2 workers on authors")
    p.add_argument("--out", default="benchmarks/strategy_leaderboard")
    return p.parse_args(argv)


def run_task(task: str, scenario: str, seeds: list[int], names: list[str], options: dict[str, Any]) -> list[dict[str, Any]]:
    from erasus_ray.benchmarks import load_benchmark
    from erasus_ray.evaluation import evaluate
    from erasus_ray.experiment import JobConfig, display_keys, reference_rows, run_job
    from erasus_ray.strategies import STRATEGIES

    rows: list[dict[str, Any]] = []
    for seed in seeds:
        bench = load_benchmark(task, scenario, seed, **options)
        keys = display_keys(bench)
        gold = evaluate(bench.gold, forget=bench.forget, retain=bench.retain, test=bench.test, task=bench.task, seed=seed)
        base = {"task": task, "scenario": scenario, "seed": seed}
        for ref in reference_rows(bench, gold, seed):
            rows.append({**base, "strategy": ref["label"], "status": "reference", "seconds": ref["timings"]["total"],
                         "avg_gap_pts": 100 * ref["metrics"]["avg_gap"], **{k: ref["metrics"].get(k) for k in keys}})
        for name in names:
            cls = STRATEGIES.get(name)
            row: dict[str, Any] = {**base, "strategy": name}
            lacking = missing(bench.task, cls.requires)
            if lacking:
                rows.append({**row, "status": f"skipped: needs {', '.join(map(str, lacking))}"})
                continue
            run_bench = bench
            prepared = prepare_model(name, bench, seed) if cls.contract_exempt_reason else None
            if cls.contract_exempt_reason and prepared is None:
                rows.append({**row, "status": f"skipped: {cls.contract_exempt_reason}"})
                continue
            if prepared is not None:
                model, label, prep_s = prepared
                start = evaluate(model, forget=bench.forget, retain=bench.retain, test=bench.test, task=bench.task,
                                 gold_metrics=gold, seed=seed)
                rows.append({**base, "strategy": label, "status": "reference", "seconds": prep_s,
                             "avg_gap_pts": 100 * start["avg_gap"], **{k: start.get(k) for k in keys}})
                run_bench = dataclasses.replace(bench, original=model)
            cfg = JobConfig.from_dict({"benchmark": task, "scenario": scenario, "seed": seed, "strategy": name,
                                       "selector": None, "fraction": 1.0, "benchmark_options": options})
            t0 = time.perf_counter()
            try:
                job = run_job(cfg, bench=run_bench, gold_metrics=gold, progress=False, fraction=1.0)
            except Exception as err:  # recorded, not hidden: a leaderboard row says what failed
                rows.append({**row, "status": f"error: {type(err).__name__}: {err}"[:300], "seconds": time.perf_counter() - t0})
                traceback.print_exc()
                continue
            m = job["metrics"]
            rows.append({**row, "status": "ok", "seconds": job["timings"]["total"], "steps": job["report"].get("steps"),
                         "avg_gap_pts": 100 * m["avg_gap"], **{k: m.get(k) for k in keys},
                         **{k: m[k] for k in m if k.startswith("mia")}})
            print(f"[{task}:{scenario} seed={seed}] {name:24s} {job['timings']['total']:7.2f}s  Avg.Gap {100 * m['avg_gap']:6.2f}", flush=True)
    return rows


def ray_train_timing(options: dict[str, Any]) -> list[dict[str, Any]]:
    from erasus_ray.experiment import JobConfig, run_job

    out = []
    base = {"benchmark": "authors", "scenario": "forget10", "seed": 0, "selector": None, "fraction": 1.0, "benchmark_options": options}
    for label, execution in [("local", {}), ("ray_train x1", {"backend": "ray_train", "num_workers": 1}),
                             ("ray_train x2", {"backend": "ray_train", "num_workers": 2})]:
        job = run_job(JobConfig.from_dict({**base, "execution": execution}), progress=False, fraction=1.0)
        out.append({"runner": label, "seconds": job["timings"]["total"], "unlearn_s": job["timings"].get("unlearn"),
                    "avg_gap_pts": 100 * job["metrics"]["avg_gap"], "steps": job["report"].get("steps")})
        print(json.dumps(out[-1]), flush=True)
    local = out[0]["seconds"]
    for r in out:
        r["overhead_vs_local"] = r["seconds"] / local
    return out


def fmt(mean: float, std: float, digits: int = 1) -> str:
    return "-" if math.isnan(mean) else f"{mean:.{digits}f} +- {std:.{digits}f}"


def leaderboard(rows: list[dict[str, Any]]) -> str:
    lines = []
    for task, scenario in dict.fromkeys((r["task"], r["scenario"]) for r in rows):
        rs = [r for r in rows if r["task"] == task and r["scenario"] == scenario]
        metric_keys = [k for k in rs[0] if k not in ("task", "scenario", "seed", "strategy", "status", "seconds", "avg_gap_pts", "steps")]
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rs:
            groups.setdefault(r["strategy"], []).append(r)
        table = []
        for name, g in groups.items():
            ok = [r for r in g if r["status"] in ("ok", "reference")]
            if not ok:
                table.append((math.inf, f"| {name} | {g[0]['status']} |"))
                continue

            def ms(key: str, scale: float = 1.0) -> str:
                vals = np.array([float(r[key]) * scale for r in ok if r.get(key) is not None], dtype=float)
                if not len(vals):
                    return "-"
                return fmt(float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, 2 if key == "seconds" else 1)

            gap = float(np.mean([r["avg_gap_pts"] for r in ok]))
            cells = [name, ms("avg_gap_pts"), ms("seconds")] + [ms(k, 1.0 if k.endswith("loss") else 100.0) for k in metric_keys]
            note = "" if len(ok) == len(g) else f" ({len(g) - len(ok)} seed(s) failed)"
            key = -1.0 if name.startswith(("original", "retrain")) else gap
            if name.startswith("start:"):  # just above the strategy it starts
                key = float(np.mean([r["avg_gap_pts"] for r in rs if r["strategy"] == name.split()[1] and r["status"] == "ok"] or [gap])) - 1e-9
            table.append((key, "| " + " | ".join(cells) + note + " |"))
        header = "| strategy | Avg.Gap (pts) | seconds | " + " | ".join(metric_keys) + " |"
        lines += [f"### {task} / {scenario} (seeds {sorted({r['seed'] for r in rs})})", "", header,
                  "|" + " --- |" * (3 + len(metric_keys))]
        lines += [t[1] for t in sorted(table, key=lambda t: t[0])]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from erasus_ray.experiment import warm_up
    from erasus_ray.strategies import STRATEGIES

    warm_up()
    names = STRATEGIES.names() if args.strategies == "all" else [s.strip() for s in args.strategies.split(",")]
    names = [n for n in names if n != "retrain"]  # the gold row is the retrain
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    load0 = os.getloadavg()[0]
    wall0 = time.perf_counter()
    for pair in args.tasks.split(","):
        task, scenario = pair.split(":")
        options = {"variant": args.authors_variant} if task == "authors" else {}
        rows += run_task(task, scenario, seeds, names, options)
    from erasus_ray.cli.report import write_csv

    write_csv(rows, out / "results.csv")
    board = leaderboard(rows)
    atomic_write_text(out / "leaderboard.md", board)
    rt = ray_train_timing({"variant": args.authors_variant}) if args.ray_train else []
    command = "python benchmarks/strategy_leaderboard/run.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    text = ["# Strategy leaderboard", "", f"Command: `{command}`", "",
            f"{os.cpu_count()} CPUs, one torch thread; 1-min load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
            f"{(time.perf_counter() - wall0) / 60:.1f} min wall-clock. "
            "Each strategy with its documented defaults on the full forget set; Avg.Gap is the mean absolute gap to the "
            "retrained model over the task's metrics, in points (lower is better); metrics in points, mean +- std over seeds.", "",
            board]
    if rt:
        text += ["## Local vs Ray Train on the authors GPT-2", "", "| runner | seconds | x local | Avg.Gap (pts) | steps |",
                 "| --- | --- | --- | --- | --- |"]
        text += [f"| {r['runner']} | {r['seconds']:.1f} | {r['overhead_vs_local']:.2f} | {r['avg_gap_pts']:.2f} | {r['steps']} |" for r in rt]
        atomic_write_text(out / "ray_train.json", json.dumps(rt, indent=2))
    atomic_write_text(out / "RESULTS.md", "\n".join(text) + "\n")
    print(f"wrote {out}/results.csv, leaderboard.md, RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
