"""Leaderboard over seeds from the per-seed outputs of ``smollm.py`` (or any protocol run that writes ``report.json``).

Reads ``<dir>/report.json`` (one protocol report per model / strategy) and, where present, ``<dir>/timings.json``
(``smollm.py``'s rows: the unlearning CPU seconds) of each directory given, in seed order,
and prints a Markdown table: the verdict per seed, then mean +- std over seeds of the chosen metrics.

    python benchmarks/protocols/seeds_table.py benchmarks/protocols/tofu-smollm-rw-seed{0,1,2}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

METRICS = ("forget_quality", "model_utility", "forget_rougeL", "retain_rougeL")


def _unlearning_cpu(timings: dict) -> dict[str, float]:
    """Strategy -> unlearning CPU seconds, from ``smollm.py``'s rows (column 10 of its timings table)."""
    out = {}
    for row in timings.get("rows", []):
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        try:
            out[cells[0]] = float(cells[9])
        except (IndexError, ValueError):
            continue
    return out


def load(dirs: list[Path]) -> tuple[list[str], dict[str, list[dict | None]], dict[str, list[float | None]]]:
    """``(labels, reports[label][seed], cpu[label][seed])``; None where a seed lacks the label."""
    reports, cpus = [], []
    for d in dirs:
        reports.append(json.loads((d / "report.json").read_text()))
        t = json.loads((d / "timings.json").read_text()) if (d / "timings.json").exists() else {}
        cpus.append(_unlearning_cpu(t))
    labels = list(dict.fromkeys(label for r in reports for label in r))
    return (labels, {label: [r.get(label) for r in reports] for label in labels},
            {label: [c.get(label) for c in cpus] for label in labels})


def _mean_std(values: list[float | None]) -> str:
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    return "-" if not len(v) else f"{v.mean():.3f} +- {v.std():.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def table(dirs: list[Path], metrics: tuple[str, ...] = METRICS) -> str:
    labels, reports, cpus = load(dirs)
    head = ["strategy", f"verdicts (seeds {' / '.join(str(i) for i in range(len(dirs)))})", *metrics, "unlearning CPU s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label in labels:
        rs = reports[label]
        verdicts = " / ".join(r["verdict"] if r else "-" for r in rs)
        cells = [_mean_std([r["metrics"].get(m) if r else None for r in rs]) for m in metrics]
        cpu = [c for c in cpus[label] if c is not None]
        cpu_cell = f"{np.mean(cpu):.0f} +- {np.std(cpu):.0f}" if cpu else "-"
        lines.append("| " + " | ".join([label, verdicts, *cells, cpu_cell]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="+", type=Path, help="one output directory per seed, in seed order")
    p.add_argument("--metrics", default=",".join(METRICS), help="comma-separated report metrics")
    args = p.parse_args(argv)
    print(table(args.dirs, tuple(args.metrics.split(","))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
