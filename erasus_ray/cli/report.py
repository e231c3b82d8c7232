"""Tables and plots of result rows (used by the demo, ``unlearn`` and the benchmark scripts)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from erasus_ray.utils.atomic import atomic_open, atomic_savefig, atomic_write_text


#: metrics that are not rates: tables show them as they are (not x100), plots leave them out of the points axis
UNSCALED_SUFFIXES = ("_loss", "_frechet")


def _fmt(value: Any, key: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key.endswith(UNSCALED_SUFFIXES):
        return f"{value:.3f}"
    return f"{100 * value:.1f}"


def print_table(rows: Sequence[dict[str, Any]], keys: Sequence[str], title: str) -> None:
    """A rich table: metrics in points (x100, losses and Frechet distances as is), Avg.Gap in points, seconds per phase."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("run")
    for k in keys:
        table.add_column(k)
    table.add_column("Avg.Gap")
    table.add_column("verified")
    table.add_column("coreset")
    table.add_column("select s")
    table.add_column("unlearn s")
    table.add_column("total s")
    for row in rows:
        m, t = row["metrics"], row.get("timings", {})
        table.add_row(
            row["label"],
            *[_fmt(m.get(k), k) for k in keys],
            _fmt(m.get("avg_gap"), "avg_gap"),
            {True: "yes", False: "no", None: "n/a"}.get(row.get("verified"), "-") if "verified" in row else "-",
            str(row.get("coreset_size") or "-"),
            f"{t['select']:.2f}" if "select" in t else "-",
            f"{t['unlearn']:.2f}" if "unlearn" in t else "-",
            f"{t.get('total', float('nan')):.2f}",
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)


def save_json(rows: Sequence[dict[str, Any]], path: Path, extra: dict[str, Any] | None = None) -> None:
    clean = [{k: v for k, v in r.items() if k != "result"} for r in rows]
    atomic_write_text(path, json.dumps({**(extra or {}), "rows": clean}, indent=2, default=str))


def plot_rows(rows: Sequence[dict[str, Any]], keys: Sequence[str], path: Path, title: str) -> None:
    """Grouped bars of the metrics per run, and a bar of seconds per run (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metric_keys = [k for k in keys if not k.endswith(UNSCALED_SUFFIXES)]
    labels = [r["label"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1.3]})
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(metric_keys))
    for i, row in enumerate(rows):
        vals = [100 * float(row["metrics"].get(k, float("nan"))) for k in metric_keys]
        ax1.bar(x + i * width - 0.4 + width / 2, vals, width, label=f"{row['label']} (gap {100 * row['metrics'].get('avg_gap', float('nan')):.1f})")
    ax1.set_xticks(x, metric_keys, rotation=15)
    ax1.set_ylabel("points")
    ax1.set_title(title)
    ax1.legend(fontsize=8)
    secs = [max(float(r.get("timings", {}).get("total", float("nan"))), 1e-3) for r in rows]
    ax2.bar(range(len(rows)), secs, color="grey")
    ax2.set_yscale("log")
    ax2.set_xticks(range(len(rows)), labels, rotation=25, ha="right", fontsize=8)
    ax2.set_ylabel("seconds (log)")
    ax2.set_title("end-to-end cost")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Rows (dicts) to CSV: the union of their keys in first-seen order, floats with 6 significant digits."""
    import csv

    fields: list[str] = []
    for r in rows:
        fields.extend(k for k in r if k not in fields)
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
