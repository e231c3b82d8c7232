"""What a sweep's trials and its leaderboard share: the sweep folder's meta file, the per-process benchmark cache and
the flat result row a trial reports.

Here rather than in :mod:`~erasus_ray.tuning.sweep` so that the leaderboard (whose top-k re-runs are trials too) and
the sweep (which builds the leaderboard at its end) both import it downward, without a circle between them.
"""

from __future__ import annotations

import json
import os
from typing import Any

#: Written by the driver into the sweep directory; the leaderboard reads it.
META_FILE = "sweep.json"

_BENCHMARKS: dict[tuple, Any] = {}


def load_cached_benchmark(job: Any) -> Any:
    """The job's benchmark, built once per process (trials reusing a worker skip the data build)."""
    from erasus_ray.benchmarks import load_benchmark

    key = (job.benchmark, job.scenario, job.seed, json.dumps(job.benchmark_options, sort_keys=True), os.environ.get("ERASUS_RAY_CACHE"))
    if key not in _BENCHMARKS:
        _BENCHMARKS.clear()  # one benchmark at a time: a worker never needs two
        _BENCHMARKS[key] = load_benchmark(job.benchmark, job.scenario, job.seed, **job.benchmark_options)
    return _BENCHMARKS[key]


def flat_result(row: dict[str, Any]) -> dict[str, Any]:
    """What a trial reports: the objectives, the cost breakdown, the resolved runner settings, every metric."""
    runner = (row["config"].get("runner") or {})
    metrics = {k: float(v) for k, v in row["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {
        "avg_gap": float(row["metrics"]["avg_gap"]),
        "seconds": float(row["timings"]["total"]),
        "select_s": float(row["timings"].get("select", 0.0)),
        "unlearn_s": float(row["timings"].get("unlearn", 0.0)),
        "coreset_size": int(row["coreset_size"]),
        "n_forget": int(row["n_forget"]),
        "steps": int(row["report"].get("steps", 0)),
        "stopped": str(row["report"].get("stopped", "")),
        "seed": int(row["seed"]),
        # the verification on the whole forget set, and what the closed loop cost (steps above, final coreset)
        "verified": row.get("verified"),
        "mode": str((row.get("verification") or {}).get("mode", "")),
        "final_fraction": (row.get("verification") or {}).get("final_fraction", int(row["coreset_size"]) / max(1, int(row["n_forget"]))),
        "lr": runner.get("lr"),
        "epochs": runner.get("epochs"),
        "metrics": metrics,
    }
