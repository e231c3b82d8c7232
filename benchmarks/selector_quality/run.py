#!/usr/bin/env python
"""Selector quality: every registered selector at 5/10/20% of the forget set vs ``random``, same strategy, same seeds.

Issue #3's benchmark: "for each selector at 5/10/20%, the Avg.Gap to retrain after the same strategy, vs random.
If a selector does not beat random, say so." For each task/scenario and seed it runs (through
``benchmarks/coreset_ablation/run.py``'s ``run_task``, i.e. :func:`erasus_ray.experiment.run_job`, the code path of
``ErasusUnlearner``) the retrain reference, the strategy on the full forget set, and the strategy on every selector's
coreset at every fraction. A selector **beats random** at a fraction when its Avg.Gap is below random's on every
seed (paired by seed: same trained model, same strategy, same retain stream) and the mean paired difference is at
least ``--margin`` points; it is **worse than random** in the mirrored case; otherwise "no clear difference".

Writes ``results.csv`` (one row per run), ``summary.csv`` (per selector x fraction: mean/std Avg.Gap, paired
difference to random, verdict), ``quality.png`` (Avg.Gap per selector and fraction, random's mean as a line) and
``RESULTS.md`` into ``--out``. Example (the command RESULTS.md records)::

    ERASUS_RAY_CACHE=/tmp/erasus-bench-cache python benchmarks/selector_quality/run.py \\
        --tasks digits:class,digits:random10,mnist5k:class --seeds 0,1,2

``--report-only`` rebuilds summary, plot and RESULTS.md from ``--out``'s results.csv.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from erasus_ray.tasks import missing
from erasus_ray.utils.atomic import atomic_savefig, atomic_write_text

HERE = Path(__file__).resolve().parent
FRACTIONS = (0.05, 0.1, 0.2)


def _module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


ablation = _module(HERE.parent / "coreset_ablation" / "run.py", "coreset_ablation_run")
base = ablation.base  # benchmarks/coreset_vs_full/run.py: read_csv, write_csv, split_list


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="digits:class,digits:random10,mnist5k:class")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    p.add_argument("--selectors", default="all", help="comma list, or 'all' (every registered selector the task supports)")
    p.add_argument("--strategy", default="grad_diff")
    p.add_argument("--margin", type=float, default=0.5, help="points the mean paired difference must exceed")
    p.add_argument("--out", default=str(HERE))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def selectors_for(task: Any, requested: str) -> list[str]:
    """Every registered selector whose requirements ``task`` declares (``random`` first; ``full`` is the 100% row)."""
    from erasus_ray.selectors import SELECTORS

    if requested != "all":
        names = [s for s in requested.split(",") if s]
    else:
        names = [n for n in SELECTORS.names()
                 if not missing(task, SELECTORS.get(n).requires)]
    names = [n for n in names if n != "full"]
    return ["random"] + [n for n in names if n != "random"]


def summarise(rows: list[dict[str, Any]], margin: float) -> list[dict[str, Any]]:
    """Per task x selector x fraction: Avg.Gap mean/std, seconds, and the paired (by seed) difference to random."""
    coreset = [r for r in rows if r["selector"] not in ("-", "full")]
    by_key: dict[tuple, dict[int, dict[str, Any]]] = {}
    for r in coreset:
        by_key.setdefault((r["task"], r["scenario"], r["selector"], float(r["fraction"])), {})[int(r["seed"])] = r
    full = {(r["task"], r["scenario"], int(r["seed"])): r for r in rows if r["selector"] == "full"}
    out = []
    for (task, scenario, sel, frac), seeds in by_key.items():
        rand = by_key.get((task, scenario, "random", frac), {})
        common = sorted(set(seeds) & set(rand))
        gaps = np.array([float(seeds[s]["avg_gap_pts"]) for s in sorted(seeds)])
        diff = np.array([float(seeds[s]["avg_gap_pts"]) - float(rand[s]["avg_gap_pts"]) for s in common])
        full_gap = np.array([float(full[(task, scenario, s)]["avg_gap_pts"]) for s in sorted(seeds) if (task, scenario, s) in full])
        if sel == "random" or not len(diff):
            verdict = "-"
        elif (diff < 0).all() and -diff.mean() >= margin:
            verdict = "beats random"
        elif (diff > 0).all() and diff.mean() >= margin:
            verdict = "worse than random"
        else:
            verdict = "no clear difference"
        out.append({
            "task": task, "scenario": scenario, "selector": sel, "fraction": frac, "n_seeds": len(seeds),
            "coreset_size": int(np.median([int(r["coreset_size"]) for r in seeds.values()])),
            "avg_gap_pts_mean": float(gaps.mean()), "avg_gap_pts_std": float(gaps.std(ddof=1)) if len(gaps) > 1 else 0.0,
            "diff_vs_random_pts_mean": float(diff.mean()) if len(diff) else math.nan,
            "diff_vs_random_pts_min": float(diff.min()) if len(diff) else math.nan,
            "diff_vs_random_pts_max": float(diff.max()) if len(diff) else math.nan,
            "full_avg_gap_pts_mean": float(full_gap.mean()) if len(full_gap) else math.nan,
            "select_s_mean": float(np.mean([float(r["select_s"]) for r in seeds.values()])),
            "total_s_mean": float(np.mean([float(r["total_s"]) for r in seeds.values()])),
            "verdict": verdict,
        })
    order = {ts: i for i, ts in enumerate(dict.fromkeys((r["task"], r["scenario"]) for r in rows))}
    out.sort(key=lambda s: (order[(s["task"], s["scenario"])], s["selector"] != "random", s["selector"], s["fraction"]))
    return out


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((s["task"], s["scenario"]) for s in summary))
    fracs = sorted({s["fraction"] for s in summary})
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 3.6 * len(panels)), squeeze=False)
    for ax, (task, scenario) in zip(axes[:, 0], panels):
        rows = [s for s in summary if (s["task"], s["scenario"]) == (task, scenario)]
        sels = list(dict.fromkeys(s["selector"] for s in rows))
        width = 0.8 / len(fracs)
        for j, f in enumerate(fracs):
            vals = {s["selector"]: s for s in rows if s["fraction"] == f}
            xs = np.arange(len(sels)) + (j - (len(fracs) - 1) / 2) * width
            ys = [vals[n]["avg_gap_pts_mean"] if n in vals else np.nan for n in sels]
            es = [vals[n]["avg_gap_pts_std"] if n in vals else np.nan for n in sels]
            bars = ax.bar(xs, ys, width, yerr=es, capsize=2, label=f"{f:.0%}", alpha=0.85)
            if "random" in vals:
                ax.axhline(vals["random"]["avg_gap_pts_mean"], color=bars.patches[0].get_facecolor(), ls="--", lw=0.8)
        full = [s["full_avg_gap_pts_mean"] for s in rows if np.isfinite(s["full_avg_gap_pts_mean"])]
        if full:
            ax.axhline(full[0], color="k", lw=1.0, label="full forget set")
        ax.set_xticks(np.arange(len(sels)), sels, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("Avg.Gap to retrain (pts)")
        ax.set_title(f"{task}:{scenario} (dashed: random at that fraction; mean +- std over seeds)")
        ax.legend(fontsize=8, ncol=len(fracs) + 1)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def write_markdown(path: Path, meta: dict[str, Any], summary: list[dict[str, Any]], refs: list[dict[str, Any]]) -> None:
    lines = [
        "# Selector quality: every selector vs random at 5/10/20%",
        "",
        "Generated by `benchmarks/selector_quality/run.py` (re-run the command; do not edit by hand).",
        "",
        "## Command",
        "",
        f"```\n{meta['command']}\n```",
        "",
        f"Machine: {meta['machine']}; one torch thread; 1-min load average {meta['load_start']:.1f} at start, "
        f"{meta['load_end']:.1f} at the end; wall time {meta['wall_min']:.1f} min. Strategy `{meta['strategy']}` with "
        "its demo defaults (the same for every selector and fraction), evaluated against the cached retrained (gold) "
        "model. Seeds: " + ", ".join(str(s) for s in meta["seeds"]) + ".",
        "",
        f"A selector **beats random** at a fraction when its Avg.Gap is below random's on every seed (paired: same "
        f"seed = same trained model and run) and by at least {meta['margin']} pts on average; **worse than random** "
        "mirrored; otherwise **no clear difference**. Lower Avg.Gap is better (0 = as the retrained model).",
        "",
    ]
    panels = list(dict.fromkeys((s["task"], s["scenario"]) for s in summary))
    fracs = sorted({s["fraction"] for s in summary})
    tally = []
    for task, scenario in panels:
        rows = [s for s in summary if (s["task"], s["scenario"]) == (task, scenario)]
        ref = [r for r in refs if (r["task"], r["scenario"]) == (task, scenario)]
        orig = np.mean([float(r["original_avg_gap_pts"]) for r in ref]) if ref else math.nan
        n_forget = ref[0]["n_forget"] if ref else "?"
        full = next((s["full_avg_gap_pts_mean"] for s in rows if np.isfinite(s["full_avg_gap_pts_mean"])), math.nan)
        lines += [f"## {task}:{scenario} (forget set {n_forget}; original model Avg.Gap {orig:.1f} pts; "
                  f"full forget set {full:.2f} pts)", "",
                  "| selector | " + " | ".join(f"{f:.0%}: Avg.Gap (pts) / vs random" for f in fracs) + " | select s (mean) |",
                  "| --- | " + " | ".join("---" for _ in fracs) + " | --- |"]
        for sel in dict.fromkeys(s["selector"] for s in rows):
            cells = []
            for f in fracs:
                s = next((x for x in rows if x["selector"] == sel and x["fraction"] == f), None)
                if s is None:
                    cells.append("-")
                    continue
                cell = f"{s['avg_gap_pts_mean']:.2f} ± {s['avg_gap_pts_std']:.2f}"
                if sel != "random":
                    cell += f" / {s['diff_vs_random_pts_mean']:+.2f} ({s['verdict']})"
                cells.append(cell)
            sel_s = np.mean([x["select_s_mean"] for x in rows if x["selector"] == sel])
            lines.append(f"| {sel} | " + " | ".join(cells) + f" | {sel_s:.2f} |")
        beats = sorted({s["selector"] for s in rows if s["verdict"] == "beats random"})
        worse = sorted({s["selector"] for s in rows if s["verdict"] == "worse than random"})
        never = sorted({s["selector"] for s in rows if s["selector"] != "random"} - set(beats))
        tally.append((task, scenario, beats, worse, never))
        lines += ["", f"- Beat random at some fraction: {', '.join(beats) or 'none'}.",
                  f"- Worse than random at some fraction: {', '.join(worse) or 'none'}.",
                  f"- Never beat random: {', '.join(never) or 'none'}.", ""]
    lines += ["## Findings", ""]
    for task, scenario, beats, worse, never in tally:
        lines.append(f"- {task}:{scenario}: {len(beats)} selector(s) beat random at some fraction "
                     f"({', '.join(beats) or 'none'}); {len(never)} never did.")
    lines += [""] + [f"- {n}" for n in meta.get("notes", [])]
    lines += ["", "Raw rows: `results.csv`; per selector x fraction: `summary.csv`; plot: `quality.png`.", ""]
    atomic_write_text(path, "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "run_meta.json"
    if args.report_only:
        rows, refs = base.read_csv(out / "results.csv"), base.read_csv(out / "refs.csv")
        meta = json.loads(meta_path.read_text())
    else:
        os.environ.setdefault("ERASUS_RAY_THREADS", str(args.threads))
        import torch

        torch.set_num_threads(args.threads)
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        rows, refs = [], []
        fractions = [float(f) for f in args.fractions.split(",")]
        for spec in args.tasks.split(","):
            task, scenario = spec.split(":")
            from erasus_ray.benchmarks import load_benchmark

            sels = selectors_for(load_benchmark(task, scenario, 0).task, args.selectors)
            r, f, _ = ablation.run_task(task, scenario, [int(s) for s in args.seeds.split(",")], fractions + [1.0], sels,
                                        [args.strategy], {}, lambda m: print(m, flush=True))
            rows += r
            refs += f
            base.write_csv(rows, out / "results.csv")  # as we go: a partial run leaves usable rows
        meta = {"command": "python benchmarks/selector_quality/run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
                "load_start": load0, "load_end": os.getloadavg()[0], "wall_min": (time.perf_counter() - t0) / 60,
                "strategy": args.strategy, "seeds": [int(s) for s in args.seeds.split(",")], "margin": args.margin,
                "notes": []}
        base.write_csv(rows, out / "results.csv")
        base.write_csv(refs, out / "refs.csv")
        atomic_write_text(meta_path, json.dumps(meta, indent=2))
    summary = summarise(rows, meta["margin"])
    base.write_csv(summary, out / "summary.csv")
    plot(summary, out / "quality.png")
    write_markdown(out / "RESULTS.md", meta, summary, refs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
