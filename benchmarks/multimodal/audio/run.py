#!/usr/bin/env python
"""Audio leaderboard: forgetting one speaker from the tiny Wav2Vec2 word recogniser (benchmark ``audio``, synthetic
formant speech), against the model retrained without that speaker.

Per seed: the original and retrain (gold) rows; then

1. every listed generic strategy with its documented defaults on the full forget set, *open loop* (``target:
   auto``: a speaker is not a whole class and no held-out set is given, so each runs its fixed default budget);
2. the demo default *closed loop* (``DEMO_DEFAULTS["audio"]``: grad_diff, target gold with the test split as held-out
   data) on the full forget set, on a 10% el2n coreset and on a 10% random coreset.

Every run goes through :func:`erasus_ray.experiment.run_job` (the code path of ``erasus-ray demo`` / ``unlearn``).
The table is the strategy leaderboard's (``benchmarks/strategy_leaderboard/run.py``: mean +- std over seeds, sorted
by Avg.Gap). Writes ``results.csv``, ``leaderboard.md`` and ``RESULTS.md`` into ``--out``. Example::

    python benchmarks/multimodal/audio/run.py --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
GENERIC = "grad_diff,gradient_ascent,npo,simnpo,scrub,saliency_unlearning,fine_tune,random_label,l1_sparse,neggrad_plus,ssd"


def _leaderboard_module() -> Any:
    """The strategy leaderboard script, for its table (one table format for every leaderboard)."""
    path = ROOT / "benchmarks" / "strategy_leaderboard" / "run.py"
    spec = importlib.util.spec_from_file_location("strategy_leaderboard_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(base: dict[str, Any], name: str, job: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    m = job["metrics"]
    return {**base, "strategy": name, "status": "ok", "seconds": job["timings"]["total"],
            "steps": job["report"].get("steps"), "avg_gap_pts": 100 * m["avg_gap"], **{k: m.get(k) for k in keys},
            "forget_loss": m.get("forget_loss"), "verified": job.get("verified"), "coreset": job["coreset_size"]}


def run_seed(seed: int, names: list[str]) -> list[dict[str, Any]]:
    from erasus_ray.benchmarks import load_benchmark
    from erasus_ray.evaluation import evaluate
    from erasus_ray.experiment import DEMO_DEFAULTS, JobConfig, display_keys, reference_rows, run_job

    bench = load_benchmark("audio", "speaker", seed)
    keys = display_keys(bench)
    gold = evaluate(bench.gold, forget=bench.forget, retain=bench.retain, test=bench.test, task=bench.task, seed=seed)
    base = {"task": "audio", "scenario": "speaker", "seed": seed}
    rows = [{**base, "strategy": ref["label"], "status": "reference", "seconds": ref["timings"]["total"],
             "avg_gap_pts": 100 * ref["metrics"]["avg_gap"], **{k: ref["metrics"].get(k) for k in keys},
             "forget_loss": ref["metrics"].get("forget_loss")} for ref in reference_rows(bench, gold, seed)]
    default = DEMO_DEFAULTS["audio"]["strategy"]
    jobs = [(name, {"strategy": name, "selector": None, "target": "auto"}, 1.0) for name in names]
    jobs += [(f"{default} closed-loop (target gold) full", {"strategy": default, "selector": None}, 1.0),
             (f"{default} closed-loop (target gold) 10% el2n", {"strategy": default, "selector": "el2n"}, 0.1),
             (f"{default} closed-loop (target gold) 10% random", {"strategy": default, "selector": "random"}, 0.1)]
    for label, cfg, fraction in jobs:
        t0 = time.perf_counter()
        try:
            job = run_job(JobConfig.from_dict({"benchmark": "audio", "scenario": "speaker", "seed": seed, **cfg,
                                               "fraction": fraction}), bench=bench, gold_metrics=gold, progress=False,
                          fraction=fraction)
        except Exception as err:  # recorded, not hidden: a leaderboard row says what failed
            rows.append({**base, "strategy": label, "status": f"error: {type(err).__name__}: {err}"[:300],
                         "seconds": time.perf_counter() - t0})
            traceback.print_exc()
            continue
        rows.append(_row(base, label, job, keys))
        print(f"[audio seed={seed}] {label:45s} {rows[-1]['seconds']:7.2f}s  Avg.Gap {rows[-1]['avg_gap_pts']:6.2f}", flush=True)
    return rows


def _read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of an earlier run's results.csv with numbers and booleans restored, empty cells dropped."""
    import csv

    def value(key: str, text: str) -> Any:
        if text == "" or key in ("task", "scenario", "strategy", "status"):
            return text if key in ("task", "scenario", "strategy", "status") else None
        return text == "True" if text in ("True", "False") else int(text) if key == "seed" else float(text)

    with path.open() as fh:
        rows = [{k: value(k, v) for k, v in row.items()} for row in csv.DictReader(fh)]
    return [{k: v for k, v in row.items() if v is not None} for row in rows]  # as run: a row has only its own keys


def closed_loop_table(rows: list[dict[str, Any]]) -> str:
    """Per closed-loop configuration: how many seeds verified, steps and coreset size (mean over seeds)."""
    lines = ["| closed-loop run | verified | steps (mean) | coreset (mean) | forget loss (mean) |", "| --- | --- | --- | --- | --- |"]
    for label in dict.fromkeys(r["strategy"] for r in rows if "closed-loop" in r["strategy"]):
        ok = [r for r in rows if r["strategy"] == label and r["status"] == "ok"]
        if ok:
            mean = lambda key: sum(float(r[key]) for r in ok) / len(ok)  # noqa: E731
            lines.append(f"| {label} | {sum(bool(r['verified']) for r in ok)} of {len(ok)} | {mean('steps'):.0f} | "
                         f"{mean('coreset'):.0f} | {mean('forget_loss'):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--strategies", default=GENERIC)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "multimodal" / "audio"))
    p.add_argument("--from-csv", default="", help="comma-separated results.csv files of earlier runs (e.g. one per seed, "
                   "run in parallel): merge them into one leaderboard instead of running")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from erasus_ray.cli.report import write_csv
    from erasus_ray.experiment import warm_up
    from erasus_ray.utils.atomic import atomic_write_text

    warm_up()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load0, wall0 = os.getloadavg()[0], time.perf_counter()
    rows: list[dict[str, Any]] = [row for path in filter(None, args.from_csv.split(",")) for row in _read_csv(Path(path))]
    for seed in () if rows else (int(s) for s in args.seeds.split(",")):
        rows += run_seed(seed, [s.strip() for s in args.strategies.split(",") if s.strip()])
        write_csv(rows, out / "results.csv")  # after every seed: a long run leaves what it measured
    write_csv(rows, out / "results.csv")
    board = _leaderboard_module().leaderboard(rows) + "\n" + closed_loop_table(rows)
    atomic_write_text(out / "leaderboard.md", board)
    command = "python benchmarks/multimodal/audio/run.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    text = ["# Audio leaderboard: forget one speaker (synthetic formant speech, tiny Wav2Vec2)", "",
            f"Command: `{command}`", "",
            f"{os.cpu_count()} CPUs shared with other jobs, one torch thread; 1-min load average {load0:.1f} at start, "
            f"{os.getloadavg()[0]:.1f} at end; {(time.perf_counter() - wall0) / 60:.1f} min wall-clock. Metrics in "
            "points, mean +- std over seeds; Avg.Gap = mean |metric - retrained model's| over forget/retain/test acc "
            "and SVC MIA efficacy (lower is better). Open-loop rows: the strategy's defaults on the full forget set; "
            "closed-loop rows: the demo default until the gold target holds.", "", board]
    atomic_write_text(out / "RESULTS.md", "\n".join(text) + "\n")
    print(f"wrote {out}/results.csv, leaderboard.md, RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
