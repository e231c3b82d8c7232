#!/usr/bin/env python
"""Vision-language leaderboards: the ``clip`` and ``llava`` benchmarks (concept 3 forgotten), 3 seeds, vs gold.

Part 1, per family: the original and retrained (gold) rows, then each strategy of the family's list run through
:func:`erasus_ray.experiment.run_job` on the full forget set with its documented defaults and the benchmark's default
target (``clip``: ``auto``; ``llava``: ``gold``, so a run stops when the gold model's metrics are met or the loop
stalls). It is the strategy leaderboard's own loop (``benchmarks/strategy_leaderboard/run.py``, imported, not
copied). Part 2: the benchmark's default strategy (``DEMO_DEFAULTS``) closed-loop on the full forget set vs on a
10% el2n coreset, same seeds.

Writes ``<out>/<family>/results.csv`` (one row per seed and strategy, every metric), ``coreset.csv`` and
``RESULTS.md`` (mean +- std over seeds, sorted by Avg.Gap; the exact command and the load average). Example (the
command the committed RESULTS.md files record)::

    nice -n 10 python benchmarks/multimodal/vlm.py --family clip --seeds 0,1,2
    nice -n 10 python benchmarks/multimodal/vlm.py --family llava --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from erasus_ray.utils.atomic import atomic_write_text

HERE = Path(__file__).resolve().parent

#: the strategies of each family's leaderboard (retrain is the gold row itself)
STRATEGIES = {
    "clip": ["contrastive_unlearning", "modality_decoupling", "vision_text_split", "vlm_attention", "grad_diff",
             "gradient_ascent", "npo", "scrub", "saliency_unlearning", "fine_tune"],
    "llava": ["grad_diff", "npo", "simnpo", "gradient_ascent", "idk_dpo", "dpo", "fine_tune"],
}
#: leaderboard columns left to the CSV: mia_epsilon is not a fraction (the table shows points), Min-K%++ repeats Min-K%
CSV_ONLY = ("mia_epsilon", "mia_minkpp_auc")
CORESET_FRACTION = 0.1
CORESET_SELECTOR = "el2n"


def _leaderboard_module() -> Any:
    path = HERE.parent / "strategy_leaderboard" / "run.py"
    spec = importlib.util.spec_from_file_location("strategy_leaderboard_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", required=True, choices=sorted(STRATEGIES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--strategies", default=None, help="comma-separated names (default: the family's list)")
    p.add_argument("--no-coreset", action="store_true", help="skip part 2")
    p.add_argument("--out", default=str(HERE))
    p.add_argument("--note", action="append", default=[], help="a line for RESULTS.md's notes (repeatable)")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="write the report from earlier runs' --out folders (e.g. one per seed) instead of running")
    return p.parse_args(argv)


def coreset_rows(family: str, seeds: list[int]) -> list[dict[str, Any]]:
    """The default strategy closed-loop on the full forget set and on a 10% el2n coreset, per seed."""
    from erasus_ray.benchmarks import load_benchmark
    from erasus_ray.evaluation import evaluate
    from erasus_ray.experiment import JobConfig, display_keys, run_job

    rows = []
    for seed in seeds:
        bench = load_benchmark(family, "class", seed)
        gold = evaluate(bench.gold, forget=bench.forget, retain=bench.retain, test=bench.test, task=bench.task, seed=seed)
        cfg = JobConfig.from_dict({"benchmark": family, "scenario": "class", "seed": seed, "selector": CORESET_SELECTOR,
                                   "fraction": CORESET_FRACTION})
        for label, frac in (("full forget set", 1.0), (f"{CORESET_SELECTOR} {CORESET_FRACTION:.0%} coreset", CORESET_FRACTION)):
            job = run_job(cfg, bench=bench, gold_metrics=gold, progress=False, fraction=frac, label=label)
            m, v = job["metrics"], job["verification"]
            rows.append({"seed": seed, "run": label, "strategy": cfg.strategy, "target": v.get("target"),
                         "coreset_size": job["coreset_size"], "n_forget": job["n_forget"], "verified": v.get("passed"),
                         "stopped": v.get("stopped"), "steps": job["report"].get("steps"), "seconds": job["timings"]["total"],
                         "avg_gap_pts": 100 * m["avg_gap"], **{k: m.get(k) for k in display_keys(bench) if k not in CSV_ONLY}})
            print(f"[{family} seed={seed}] {label}: Avg.Gap {rows[-1]['avg_gap_pts']:.2f} verified={v.get('passed')} "
                  f"{job['timings']['total']:.1f}s", flush=True)
    return rows


def coreset_table(rows: list[dict[str, Any]]) -> str:
    """Mean +- std per run over seeds: coreset size, verified count, steps, seconds, Avg.Gap and the acc-like metrics."""
    keys = [k for k in rows[0] if k.endswith(("_acc", "_exact", "_recall5"))]
    lines = ["| run | forget samples used | verified | steps | seconds | Avg.Gap (pts) | " + " | ".join(keys) + " |",
             "|" + " --- |" * (6 + len(keys))]
    for run in dict.fromkeys(r["run"] for r in rows):
        g = [r for r in rows if r["run"] == run]
        cells = [run, _pm([r["coreset_size"] for r in g], 0), f"{sum(bool(r['verified']) for r in g)}/{len(g)}",
                 _pm([r["steps"] or 0 for r in g], 0), _pm([r["seconds"] for r in g], 1), _pm([r["avg_gap_pts"] for r in g], 2)]
        cells += [_pm([100 * float(r[k]) for r in g], 1) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(values: list[float], digits: int) -> str:
    a = np.asarray(values, dtype=float)
    return f"{a.mean():.{digits}f} +- {(a.std(ddof=1) if len(a) > 1 else 0.0):.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out) / args.family
    out.mkdir(parents=True, exist_ok=True)
    command = "nice -n 10 python benchmarks/multimodal/vlm.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    rows, core, runs = merged(args.merge, args.family) if args.merge else run(args, out, command)
    from erasus_ray.cli.report import write_csv

    write_csv(rows, out / "results.csv")
    if core:
        write_csv(core, out / "coreset.csv")
    board = _leaderboard_module().leaderboard([{k: v for k, v in r.items() if k not in CSV_ONLY} for r in rows])
    seeds = sorted({int(r["seed"]) for r in rows})
    text = [f"# {args.family}: strategy leaderboard (concept 3 forgotten, seeds {seeds})", "",
            "Runs (with `ERASUS_RAY_CACHE` set; models trained once and cached):", ""]
    text += [f"- `{r['command']}`: load average (1/5/15 min) {r['load_start']} at start, {r['load_end']} at end; "
             f"{r['minutes']:.1f} min wall-clock" for r in runs]
    text += ["", f"Report merged by `{command}`."] if args.merge else []
    text += ["", "Notes:", ""] + [f"- {note}" for note in args.note] if args.note else []
    text += ["", f"{os.cpu_count()} shared CPUs, one torch thread per run. Seconds were measured under that load (other "
             "engineers' jobs), so compare them within a table only.", "",
             "Each strategy with its documented defaults on the full forget set, through `run_job` with the benchmark's "
             "default target. Avg.Gap: mean absolute gap to the retrained (gold) model over the task's gap metrics, in "
             "points (lower is better). Metrics in points (losses as is), mean +- std over seeds. Full rows with every "
             "metric: `results.csv`.", "", board]
    if core:
        text += [f"## {CORESET_FRACTION:.0%} coreset vs the full forget set", "",
                 f"The benchmark's default strategy (`{core[0]['strategy']}`, target `{core[0]['target']}`) closed-loop "
                 f"on the whole forget set and on a {CORESET_FRACTION:.0%} `{CORESET_SELECTOR}` coreset; 'verified' "
                 "counts the seeds whose run met every criterion of the target on the whole forget set. Rows: "
                 "`coreset.csv`.", "", coreset_table(core), ""]
    atomic_write_text(out / "RESULTS.md", "\n".join(text) + "\n")
    print(f"wrote {out}/results.csv, RESULTS.md" + (", coreset.csv" if core else ""))
    return 0


def run(args: argparse.Namespace, out: Path, command: str) -> tuple[list[dict], list[dict], list[dict]]:
    """Part 1 and part 2 in this process; ``run_meta.json`` records the command and the load around it."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from erasus_ray.experiment import warm_up

    warm_up()
    names = args.strategies.split(",") if args.strategies else STRATEGIES[args.family]
    seeds = [int(s) for s in args.seeds.split(",")]
    load0, wall0 = _load(os.getloadavg()), time.perf_counter()
    rows = _leaderboard_module().run_task(args.family, "class", seeds, names, {})
    core = [] if args.no_coreset else coreset_rows(args.family, seeds)
    meta = {"command": command, "load_start": load0, "load_end": _load(os.getloadavg()),
            "minutes": (time.perf_counter() - wall0) / 60}
    atomic_write_text(out / "run_meta.json", json.dumps([meta], indent=1))
    return rows, core, [meta]


def merged(folders: list[str], family: str) -> tuple[list[dict], list[dict], list[dict]]:
    """The rows and run records of earlier runs (e.g. one per seed, run side by side), read back from their folders."""
    rows, core, runs = [], [], []
    for folder in folders:
        base = Path(folder) / family
        rows += _read_csv(base / "results.csv")
        core += _read_csv(base / "coreset.csv") if (base / "coreset.csv").exists() else []
        runs += json.loads((base / "run_meta.json").read_text())
    return rows, core, runs


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        rows = [{k: _value(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return [{**r, "seed": int(r["seed"])} for r in rows]


def _value(text: str) -> Any:
    if text in ("", "None"):
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        return float(text)
    except ValueError:
        return text


def _load(avg: tuple[float, float, float]) -> str:
    return "/".join(f"{a:.1f}" for a in avg)


if __name__ == "__main__":
    raise SystemExit(main())
