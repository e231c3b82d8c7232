#!/usr/bin/env python
"""Coreset ablation: fraction x selector x strategy, end-to-end cost and Avg.Gap to the retrained (gold) model.

For each task/scenario and seed this script loads the benchmark (original + gold models, cached), re-measures
retraining in this process (strategy ``retrain`` through :func:`erasus_ray.experiment.run_job`), then for every
strategy runs the full forget set (fraction 1.0) and every fraction < 1 x selector, same seed. Every row records
end-to-end seconds (selection + unlearning; evaluation untimed), their ratio to the same strategy's full-forget-set
run and to the re-measured retrain, forward+backward sample passes relative to full (load-independent cost),
Avg.Gap to gold in points and the task's metrics. It writes ``results.csv``, ``summary.csv`` (mean/std over
seeds), ``refs.csv``, ``ablation.png`` and ``RESULTS.md`` (with findings computed from the numbers) into ``--out``.

The row logic (``flat_row``), CSV and summary code are those of ``benchmarks/coreset_vs_full/run.py``.

Quick check (one task, one seed, 3 fractions, 2 selectors, 1 strategy; ~1 min)::

    python benchmarks/coreset_ablation/run.py --quick --out /tmp/coreset_ablation_quick

Full grid (the command RESULTS.md records; hours on a 2-core machine)::

    ERASUS_RAY_CACHE=/tmp/erasus-bench-cache python benchmarks/coreset_ablation/run.py \\
        --tasks digits:class,digits:random10,mnist5k:class,authors:forget10 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
FRACTIONS = "0.01,0.02,0.05,0.1,0.2,0.5,1.0"
SELECTORS = "random,el2n,gradient_norm,k_center,craig"
STRATEGIES = {"classification": "grad_diff,neggrad_plus,npo,scrub", "causal_lm": "npo,grad_diff,simnpo"}
GAP_TOLERANCE_PTS = 1.0  # "matches the full forget set": mean Avg.Gap within this many points of full's


def _load_base() -> Any:
    """``benchmarks/coreset_vs_full/run.py`` as a module (benchmarks/ is not a package)."""
    path = HERE.parent / "coreset_vs_full" / "run.py"
    spec = importlib.util.spec_from_file_location("coreset_vs_full_run", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


base = _load_base()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="digits:class,digits:random10,mnist5k:class,authors:forget10")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--fractions", default=FRACTIONS, help="coreset fractions; 1.0 = the full forget set (one run per strategy)")
    p.add_argument("--selectors", default=SELECTORS)
    p.add_argument("--strategies", default=None,
                   help=f"comma-separated strategies (default per task type: {STRATEGIES})")
    p.add_argument("--authors-variant", default="full", choices=["full", "ci"])
    p.add_argument("--out", default=str(HERE))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true",
                   help="digits:class, seed 0, fractions 0.05,0.2,1.0, selectors random,el2n, strategy grad_diff (a smoke run)")
    p.add_argument("--report-only", action="store_true", help="rebuild summary, plot and RESULTS.md from --out's CSVs")
    args = p.parse_args(argv)
    if args.quick:
        args.tasks, args.seeds, args.fractions, args.selectors = "digits:class", "0", "0.05,0.2,1.0", "random,el2n"
        args.strategies = "grad_diff"
    return args


def run_task(task: str, scenario: str, seeds: list[int], fractions: list[float], selectors: list[str],
             strategies: list[str] | None, options: dict[str, Any], log: Any) -> tuple[list, list, tuple]:
    from erasus_ray.benchmarks import load_benchmark
    from erasus_ray.evaluation import evaluate
    from erasus_ray.experiment import DEMO_DEFAULTS, JobConfig, display_keys, reference_rows, run_job

    rows: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    keys: tuple[str, ...] = ()
    for seed in seeds:
        t0 = time.perf_counter()
        bench = load_benchmark(task, scenario, seed, **options)
        keys = display_keys(bench)
        forget_key = base.FORGET_KEY[bench.task.name]
        names = strategies or STRATEGIES[bench.task.name].split(",")
        gold = evaluate(bench.gold, forget=bench.forget, retain=bench.retain, test=bench.test, task=bench.task, seed=seed)
        original_row, _ = reference_rows(bench, gold, seed)
        refs.append({"task": task, "scenario": scenario, "seed": seed, "n_forget": len(bench.forget_ids),
                     "n_retain": len(bench.retain_ids), "load_s": time.perf_counter() - t0,
                     "retrain_s_cached": bench.seconds["retrain"], "original_avg_gap_pts": 100 * original_row["metrics"]["avg_gap"],
                     "loadavg_1min_at_start": os.getloadavg()[0]})
        job_base = {"benchmark": task, "scenario": scenario, "seed": seed, "benchmark_options": options,
                    "runner": dict(DEMO_DEFAULTS.get(task, {}).get("runner", {}))}
        common = dict(bench=bench, gold_metrics=gold, progress=False)
        kw = dict(task=task, scenario=scenario, seed=seed, keys=keys, bench=bench, forget_key=forget_key,
                  original_forget=original_row["metrics"])
        seed_rows = []
        job = run_job(JobConfig.from_dict({**job_base, "strategy": "retrain", "selector": None, "fraction": 1.0}), fraction=1.0, **common)
        seed_rows.append(base.flat_row(job, config="retrain", selector="-", fraction=1.0, **kw))
        retrain_s = job["timings"]["total"]
        log(f"[{task}:{scenario} seed={seed}] retrain (measured) {retrain_s:.2f}s; original Avg.Gap "
            f"{100 * original_row['metrics']['avg_gap']:.1f} pts")
        for strategy in names:
            strat_rows = []
            for frac in sorted(fractions, reverse=True):
                for sel in (["-"] if frac >= 1.0 else selectors):
                    cfg = JobConfig.from_dict({**job_base, "strategy": strategy, "selector": None if sel == "-" else sel,
                                               "fraction": frac})
                    job = run_job(cfg, **common)
                    label = f"{strategy}:full@1" if frac >= 1.0 else f"{strategy}:{sel}@{frac:g}"
                    r = base.flat_row(job, config=label, selector=sel if frac < 1.0 else "full", fraction=frac, **kw)
                    strat_rows.append(r)
                    log(f"  {label:>28} {r['total_s']:7.2f}s  Avg.Gap {r['avg_gap_pts']:6.2f}  k={r['coreset_size']}")
            full = next((r for r in strat_rows if r["fraction"] >= 1.0), None)
            for r in strat_rows:
                r["ratio_to_full"] = r["total_s"] / full["total_s"] if full else math.nan
                r["passes_ratio_to_full"] = r["samples_processed"] / full["samples_processed"] if full else math.nan
                r["gap_minus_full_pts"] = r["avg_gap_pts"] - full["avg_gap_pts"] if full else math.nan
            seed_rows.extend(strat_rows)
        for r in seed_rows:
            r["ratio_to_retrain"] = r["total_s"] / retrain_s
        seed_rows[0].update(ratio_to_full=math.nan, passes_ratio_to_full=math.nan, gap_minus_full_pts=math.nan)
        rows.extend(seed_rows)
    return rows, refs, keys


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Per task: Avg.Gap vs fraction and seconds / full vs fraction; colour = selector, line style = strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((s["task"], s["scenario"]) for s in summary))
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 4.2 * len(panels)), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for (task, scen), (ax_gap, ax_cost) in zip(panels, axes):
        ss = [s for s in summary if s["task"] == task and s["scenario"] == scen and s["config"] != "retrain"]
        strategies = list(dict.fromkeys(s["strategy"] for s in ss))
        selectors = sorted({s["selector"] for s in ss if s["selector"] != "full"})
        colour = {sel: f"C{i}" for i, sel in enumerate(selectors)}
        for si, strategy in enumerate(strategies):
            full = next((s for s in ss if s["strategy"] == strategy and s["selector"] == "full"), None)
            for sel in selectors:
                pts = sorted((s for s in ss if s["strategy"] == strategy and s["selector"] == sel), key=lambda s: s["fraction"])
                if full:
                    pts = pts + [full]
                xs = [s["fraction"] for s in pts]
                for ax, key in ((ax_gap, "avg_gap_pts"), (ax_cost, "ratio_to_full")):
                    ax.errorbar(xs, [s[f"{key}_mean"] for s in pts], yerr=[s[f"{key}_std"] for s in pts], color=colour[sel],
                                ls=styles[si % len(styles)], marker="o", ms=3, capsize=2, label=f"{strategy} / {sel}")
        for ax in (ax_gap, ax_cost):
            ax.set_xscale("log")
            ax.set_xlabel("coreset fraction of the forget set (log; 1 = full)")
        ax_cost.set_yscale("log")
        ax_gap.set_ylabel("Avg.Gap to retrain (points)")
        ax_cost.set_ylabel("end-to-end seconds / full forget set (log)")
        ax_gap.set_title(f"{task}/{scen}: Avg.Gap")
        ax_cost.set_title(f"{task}/{scen}: cost")
        ax_cost.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def findings(summary: list[dict[str, Any]]) -> list[str]:
    """Per task and strategy: the smallest fraction per selector whose mean Avg.Gap is within GAP_TOLERANCE_PTS of
    the full forget set's, its cost ratio, and whether any selector beats random by more than a std."""
    out = []
    for task, scen in dict.fromkeys((s["task"], s["scenario"]) for s in summary):
        ss = [s for s in summary if s["task"] == task and s["scenario"] == scen and s["config"] != "retrain"]
        for strategy in dict.fromkeys(s["strategy"] for s in ss):
            mine = [s for s in ss if s["strategy"] == strategy]
            full = next((s for s in mine if s["selector"] == "full"), None)
            if full is None:
                continue
            parts = []
            for sel in sorted({s["selector"] for s in mine if s["selector"] != "full"}):
                ok = sorted((s for s in mine if s["selector"] == sel and s["gap_minus_full_pts_mean"] <= GAP_TOLERANCE_PTS),
                            key=lambda s: s["fraction"])
                parts.append(f"{sel}: {ok[0]['fraction']:g} ({ok[0]['ratio_to_full_mean']:.2f}x full's seconds, "
                             f"{ok[0]['ratio_to_retrain_mean']:.3f}x retrain)" if ok else f"{sel}: none")
            beats = []
            for s in mine:
                if s["selector"] in ("full", "random"):
                    continue
                rnd = next((r for r in mine if r["selector"] == "random" and r["fraction"] == s["fraction"]), None)
                # needs >= 2 seeds: with one seed the std is 0 and any difference would "count"
                if rnd and s["n_seeds"] >= 2 and s["avg_gap_pts_mean"] + max(s["avg_gap_pts_std"], rnd["avg_gap_pts_std"]) < rnd["avg_gap_pts_mean"]:
                    beats.append(f"{s['selector']}@{s['fraction']:g}")
            out.append(f"- **{task}/{scen}, {strategy}** (full: Avg.Gap {full['avg_gap_pts_mean']:.2f} pts, "
                       f"{full['total_s_mean']:.2f} s = {full['ratio_to_retrain_mean']:.2f}x retrain). Smallest fraction "
                       f"within {GAP_TOLERANCE_PTS:g} pt of full: " + "; ".join(parts) + ". Selectors beating random by more "
                       f"than a std: {', '.join(beats) if beats else 'none'}"
                       + (" (one seed: not assessed)." if full["n_seeds"] < 2 else "."))
    return out


def write_markdown(path: Path, command: str, summary: list[dict[str, Any]], refs: list[dict[str, Any]], wall_s: float) -> None:
    L = ["# Coreset ablation: fraction x selector x strategy\n",
         f"Command: `{command}` ({wall_s / 60:.1f} min wall). Seconds are end-to-end (selection + unlearning) on this "
         "machine, one torch thread; ratios are per seed, then averaged; mean ± std over seeds.\n",
         "## Findings (computed from the numbers below)\n", *findings(summary), "",
         "## Tables\n"]
    for task, scen in dict.fromkeys((s["task"], s["scenario"]) for s in summary):
        ss = [s for s in summary if s["task"] == task and s["scenario"] == scen]
        r = [x for x in refs if x["task"] == task and x["scenario"] == scen]
        L.append(f"### {task} / {scen}\n")
        L.append(f"seeds {ss[0]['seeds']}; forget {r[0]['n_forget']} / retain {r[0]['n_retain']}; original Avg.Gap "
                 f"{np.mean([x['original_avg_gap_pts'] for x in r]):.2f} pts.\n")
        L.append("| config | k | passes/full | total s | ratio/full | ratio/retrain | Avg.Gap pts |")
        L.append("|---|---|---|---|---|---|---|")
        for s in ss:
            L.append(f"| {s['config']} | {s['coreset_size_mean']:.0f} | {base.pm(s, 'passes_ratio_to_full', '.3f')} | "
                     f"{base.pm(s, 'total_s')} | {base.pm(s, 'ratio_to_full', '.3f')} | {base.pm(s, 'ratio_to_retrain', '.3f')} | "
                     f"{base.pm(s, 'avg_gap_pts')} |")
        L.append("")
    L.append("Files: `results.csv` (one row per task/seed/config), `summary.csv`, `refs.csv`, `ablation.png`.")
    path.write_text("\n".join(L) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        rows, refs = base.read_csv(out / "results.csv"), base.read_csv(out / "refs.csv")
        meta = json.loads((out / "run_meta.json").read_text())
        summary = base.summarise(rows)
        base.write_csv(summary, out / "summary.csv")
        plot(summary, out / "ablation.png")
        write_markdown(out / "RESULTS.md", meta["command"], summary, refs, meta["wall_s"])
        return 0
    os.environ.setdefault("ERASUS_RAY_CACHE", "/tmp/erasus-bench-cache")
    import torch

    torch.set_num_threads(args.threads)
    os.environ["ERASUS_RAY_THREADS"] = str(args.threads)
    from erasus_ray.experiment import warm_up

    warm_up()
    out.mkdir(parents=True, exist_ok=True)
    command = "ERASUS_RAY_CACHE=" + os.environ["ERASUS_RAY_CACHE"] + " python benchmarks/coreset_ablation/run.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    log_file = (out / "run.log").open("w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    log(f"$ {command}")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    strategies = base.split_list(args.strategies) if args.strategies else None
    for spec in base.split_list(args.tasks):
        name, scenario = spec.split(":", 1) if ":" in spec else (spec, None)
        options = {"variant": args.authors_variant} if name == "authors" else {}
        try:
            task_rows, task_refs, _ = run_task(name, scenario, base.split_list(args.seeds, int), base.split_list(args.fractions, float),
                                               base.split_list(args.selectors), strategies, options, log)
        except ImportError as err:
            log(f"{spec} skipped: {type(err).__name__}: {err}")
            continue
        rows.extend(task_rows)
        refs.extend(task_refs)
        base.write_csv(rows, out / "results.csv")  # as we go: a partial run leaves usable files
        base.write_csv(refs, out / "refs.csv")
    wall = time.perf_counter() - start
    summary = base.summarise(rows)
    base.write_csv(summary, out / "summary.csv")
    plot(summary, out / "ablation.png")
    write_markdown(out / "RESULTS.md", command, summary, refs, wall)
    (out / "run_meta.json").write_text(json.dumps({"command": command, "wall_s": wall, "args": vars(args)}, indent=2))
    log(f"wrote {out}/results.csv, summary.csv, refs.csv, ablation.png, RESULTS.md in {wall / 60:.1f} min")
    log_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
