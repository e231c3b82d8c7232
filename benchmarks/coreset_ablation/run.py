#!/usr/bin/env python
"""Coreset ablation: fraction x selector x strategy, end-to-end cost and Avg.Gap to the retrained (gold) model.

For each task/scenario and seed this script loads the benchmark (original + gold models, cached), re-measures
retraining in this process (strategy ``retrain`` through :func:`erasus_ray.experiment.run_job`), then for every
strategy runs the full forget set (fraction 1.0) and every fraction < 1 x selector, same seed. Every row records
end-to-end seconds (selection + unlearning; evaluation untimed), their ratio to the same strategy's full-forget-set
run and to the re-measured retrain, forward+backward sample passes relative to full (load-independent cost),
Avg.Gap to gold in points and the task's metrics. It writes ``results.csv``, ``summary.csv`` (mean/std over
seeds), ``refs.csv``, ``ablation.png`` (Avg.Gap, seconds / full, seconds / retrain per task) and ``RESULTS.md``
(a verdict on the claim per task, and findings, computed from the numbers) into ``--out``; ``run_meta.json``
records every run that produced the files.

The row logic (``flat_row``), CSV and summary code are those of ``benchmarks/coreset_vs_full/run.py``.

Quick check (one task, one seed, 3 fractions, 2 selectors, 1 strategy; ~20 s)::

    python benchmarks/coreset_ablation/run.py --quick --out /tmp/coreset_ablation_quick

The whole grid in one command (every task, 5 selectors, grad_diff and npo, 3 seeds; hours on a 2-core machine)::

    ERASUS_RAY_CACHE=/tmp/erasus-bench-cache python benchmarks/coreset_ablation/run.py \\
        --tasks digits:class,digits:random10,mnist5k:class,authors:forget10 --strategies grad_diff,npo --seeds 0,1,2

or in parts: ``--merge`` runs only the tasks named and replaces their rows in ``--out``'s existing CSVs (other
tasks' rows are kept), and appends the command to ``run_meta.json``; ``RESULTS.md`` lists every recorded command in
order, which together reproduce the files.
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

from erasus_ray.utils.atomic import atomic_savefig, atomic_write_text

HERE = Path(__file__).resolve().parent
FRACTIONS = "0.01,0.02,0.05,0.1,0.2,0.5,1.0"
SELECTORS = "random,el2n,gradient_norm,k_center,craig"
STRATEGIES = {"classification": "grad_diff,neggrad_plus,npo,scrub", "causal_lm": "npo,grad_diff,simnpo"}
GAP_TOLERANCE_PTS = 1.0  # "matches the full forget set": mean Avg.Gap within this many points of full's
#: The seed's claim, checked per task: "5-10% coresets match full-forget-set unlearning at 10-20x less compute".
CLAIM = "5-10% coresets match full-forget-set unlearning at 10-20x less compute"
CLAIM_FRACTIONS = (0.05, 0.1)
CLAIM_SPEEDUP = 10.0  # the low end of "10-20x"
FAR_FROM_RETRAIN_PTS = 5.0  # a full-forget-set run this far from retrain is itself a poor unlearning result


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
    p.add_argument("--merge", action="store_true",
                   help="keep --out's existing rows of other tasks: the tasks run now replace theirs; the command is appended to "
                        "run_meta.json (default: --out's files are overwritten with this run only)")
    p.add_argument("--merge-strategies", action="store_true",
                   help="with --merge: replace only the (task, strategy) rows run now and keep the task's other strategies, "
                        "its retrain rows and refs (the new rows' ratios are to this run's own full and retrain timings)")
    p.add_argument("--report-only", action="store_true", help="rebuild summary, plot and RESULTS.md from --out's CSVs")
    args = p.parse_args(argv)
    if args.merge_strategies and not args.merge:
        p.error("--merge-strategies goes with --merge")
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
        refs.append({"task": task, "scenario": scenario, "seed": seed, "options": json.dumps(options, sort_keys=True),
                     "n_forget": len(bench.forget_ids),
                     "n_retain": len(bench.retain_ids), "load_s": time.perf_counter() - t0,
                     "retrain_s_cached": bench.seconds["retrain"], "train_original_s_cached": bench.seconds["train_original"],
                     "original_avg_gap_pts": 100 * original_row["metrics"]["avg_gap"],
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
    """Per task: Avg.Gap, seconds / full forget set and seconds / retrain vs fraction; colour = selector, line
    style = strategy. The claim's band (5-10%) is shaded, its 10x and 20x savings drawn as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((s["task"], s["scenario"]) for s in summary))
    fig, axes = plt.subplots(len(panels), 3, figsize=(17, 4.2 * len(panels)), squeeze=False)
    styles = ["-", "--", ":", "-."]
    columns = (("avg_gap_pts", "Avg.Gap to retrain (points)", "Avg.Gap"),
               ("ratio_to_full", "end-to-end seconds / full forget set (log)", "cost vs full forget set"),
               ("ratio_to_retrain", "end-to-end seconds / retrain (log)", "cost vs retrain"))
    for (task, scen), row_axes in zip(panels, axes):
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
                for ax, (key, _, _) in zip(row_axes, columns):
                    ax.errorbar(xs, [s[f"{key}_mean"] for s in pts], yerr=[s[f"{key}_std"] for s in pts], color=colour[sel],
                                ls=styles[si % len(styles)], marker="o", ms=3, capsize=2, label=f"{strategy} / {sel}")
        for ax, (key, ylabel, title) in zip(row_axes, columns):
            ax.set_xscale("log")
            ax.set_xlabel("coreset fraction of the forget set (log; 1 = full)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{task}/{scen}: {title}")
            ax.axvspan(CLAIM_FRACTIONS[0], CLAIM_FRACTIONS[-1], color="grey", alpha=0.12, lw=0)
            if key != "avg_gap_pts":
                ax.set_yscale("log")
            if key == "ratio_to_full":
                for y, lab in ((1 / CLAIM_SPEEDUP, "10x less"), (1 / (2 * CLAIM_SPEEDUP), "20x less")):
                    ax.axhline(y, color="black", ls=":", lw=0.8)
                    ax.annotate(lab, (0.011, y), fontsize=7, va="bottom")
        row_axes[1].legend(fontsize=6, ncol=2)
    fig.suptitle(f"claim under test: {CLAIM} (grey band: 5-10%)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (4.2 * len(panels))))
    atomic_savefig(fig, path, dpi=90)
    plt.close(fig)


def claim_verdicts(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task: does a 5-10% coreset come within ``GAP_TOLERANCE_PTS`` of the full forget set's mean Avg.Gap at
    >= ``CLAIM_SPEEDUP``x fewer end-to-end seconds, for each strategy?

    ``holds``: yes for every strategy; ``partly``: for some strategy; ``does not hold``: for none. ``fails_on`` says
    which half of the claim failed (``accuracy``: no 5-10% coreset within tolerance of full; ``savings``: within
    tolerance but under 10x). Per strategy it records how many (fraction, selector) cells match full, the best saving
    among them, the cheapest 5-10% cell, and full's own Avg.Gap."""
    out = []
    for task, scen in dict.fromkeys((s["task"], s["scenario"]) for s in summary):
        ss = [s for s in summary if s["task"] == task and s["scenario"] == scen and s["config"] != "retrain"]
        per_strategy = []
        for strategy in dict.fromkeys(s["strategy"] for s in ss):
            mine = [s for s in ss if s["strategy"] == strategy]
            full = next((s for s in mine if s["selector"] == "full"), None)
            cells = [s for s in mine if s["selector"] != "full" and any(abs(s["fraction"] - f) < 1e-9 for f in CLAIM_FRACTIONS)]
            if full is None or not cells:
                continue
            matched = [s for s in cells if s["gap_minus_full_pts_mean"] <= GAP_TOLERANCE_PTS]
            best_match = max(matched, key=lambda s: 1 / s["ratio_to_full_mean"], default=None)
            fastest = max(cells, key=lambda s: 1 / s["ratio_to_full_mean"])
            holds = [s for s in matched if 1 / s["ratio_to_full_mean"] >= CLAIM_SPEEDUP]
            per_strategy.append({
                "strategy": strategy, "n_cells": len(cells), "n_matched": len(matched), "n_holds": len(holds),
                "best_match": best_match, "fastest": fastest, "full": full,
            })
        if not per_strategy:
            continue
        verdict = ("holds" if all(p["n_holds"] for p in per_strategy) else
                   "partly" if any(p["n_holds"] for p in per_strategy) else "does not hold")
        for p in per_strategy:
            p["fails_on"] = "" if p["n_holds"] else ("savings" if p["n_matched"] else "accuracy")
        out.append({"task": task, "scenario": scen, "verdict": verdict, "strategies": per_strategy})
    return out


def _verdict_text(v: dict[str, Any]) -> str:
    parts = []
    for p in v["strategies"]:
        full = p["full"]
        head = (f"{p['strategy']}: {p['n_matched']}/{p['n_cells']} of the 5-10% coresets within {GAP_TOLERANCE_PTS:g} pt of full "
                f"(full: {full['avg_gap_pts_mean']:.2f} pts from retrain, {full['total_s_mean']:.2f} s)")
        if p["best_match"] is not None:
            b = p["best_match"]
            head += (f", best saving among them {1 / b['ratio_to_full_mean']:.1f}x ({b['selector']}@{b['fraction']:g}: "
                     f"{b['avg_gap_pts_mean']:.2f} pts, {b['ratio_to_full_mean']:.3f}x full's seconds, "
                     f"{b['passes_ratio_to_full_mean']:.3f}x its sample passes)")
        else:
            f_ = p["fastest"]
            head += (f"; the cheapest 5-10% coreset ({f_['selector']}@{f_['fraction']:g}) saves {1 / f_['ratio_to_full_mean']:.1f}x "
                     f"but is {f_['gap_minus_full_pts_mean']:.2f} pts worse than full")
        if p["fails_on"]:
            head += f" - fails on {p['fails_on']}"
        if full["avg_gap_pts_mean"] > FAR_FROM_RETRAIN_PTS:
            head += " (full itself is far from retrain, so matching it is a weak bar)"
        parts.append(head)
    return "; ".join(parts)


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


def write_markdown(path: Path, runs: list[dict[str, Any]], summary: list[dict[str, Any]], refs: list[dict[str, Any]]) -> None:
    verdicts = claim_verdicts(summary)
    wall = sum(r.get("wall_s") or 0.0 for r in runs)
    L = ["# Coreset ablation: fraction x selector x strategy\n",
         f"Produced by {'these commands, in order' if len(runs) > 1 else 'this command'} ({wall / 60:.1f} min wall in all; "
         "a `--merge` run replaces the rows of the tasks it names and keeps the others; with `--merge-strategies`, only "
         "the rows of the strategies it runs on those tasks):\n"]
    for i, r in enumerate(runs, 1):
        note = f" {r['note']}" if r.get("note") else ""
        wall_txt = f"{r['wall_s'] / 60:.1f} min" if r.get("wall_s") else "wall time not recorded"
        L.append(f"{i}. `{r['command']}` - {', '.join(r.get('tasks', []))} ({wall_txt}).{note}")
    L.append("\nRebuild this report from the CSVs: `python benchmarks/coreset_ablation/run.py --report-only`. Seconds are "
             "end-to-end (selection + unlearning) on this machine, one torch thread; ratios are per seed, then averaged; "
             "mean ± std over seeds.\n")
    L.append("## Scope\n")
    L.append("What each task was run with (selectors x strategies x fractions x seeds):\n")
    for task, scen in dict.fromkeys((s["task"], s["scenario"]) for s in summary):
        ss = [s for s in summary if s["task"] == task and s["scenario"] == scen and s.get("selector") not in (None, "", "full", "-")]
        sels = sorted({s["selector"] for s in ss})
        strats = list(dict.fromkeys(s["strategy"] for s in summary if s["task"] == task and s["scenario"] == scen
                                    and s.get("strategy") not in (None, "", "retrain")))
        fracs = sorted({float(s["fraction"]) for s in summary if s["task"] == task and s["scenario"] == scen
                        and s.get("fraction") not in (None, "")})
        seeds = max((int(s.get("n_seeds") or 0) for s in summary if s["task"] == task and s["scenario"] == scen), default=0)
        L.append(f"- {task}/{scen}: selectors {', '.join(sels)}; strategies {', '.join(strats)}; fractions "
                 f"{', '.join(f'{f:g}' for f in fracs)}; {seeds} seeds.")
    L.append("\nThe selectors span the families (random baseline; loss-based `el2n`; gradient-based `gradient_norm`; "
             "geometric `k_center`; gradient-matching `craig`). Every registered selector is measured at 5/10/20% against "
             "random in [selector_quality](../selector_quality/RESULTS.md) and every registered strategy on the full forget "
             "set against retraining in [strategy_leaderboard](../strategy_leaderboard/); this study crosses the fraction "
             "axis with those, at a cost that grows with every added selector or strategy (each run's wall time is "
             "listed above).\n")
    L.append(f"## Verdict on the claim: \"{CLAIM}\"\n")
    L.append(f"Per task: a 5% or 10% coreset (any of the selectors) must come within {GAP_TOLERANCE_PTS:g} pt of the full "
             f"forget set's mean Avg.Gap to retrain at >= {CLAIM_SPEEDUP:g}x fewer end-to-end seconds (mean over seeds). "
             "**holds**: for every strategy; **partly**: for some strategy; **does not hold**: for none. \"fails on "
             "accuracy\": no 5-10% coreset gets within tolerance; \"fails on savings\": some do, but save less than "
             f"{CLAIM_SPEEDUP:g}x.\n")
    L.append("| task | verdict | detail |")
    L.append("|---|---|---|")
    for v in verdicts:
        L.append(f"| {v['task']}/{v['scenario']} | **{v['verdict']}** | {_verdict_text(v)} |")
    L += ["", "## Findings (computed from the numbers below)\n", *findings(summary), "", "## Tables\n"]
    for task, scen in dict.fromkeys((s["task"], s["scenario"]) for s in summary):
        ss = [s for s in summary if s["task"] == task and s["scenario"] == scen]
        r = [x for x in refs if x["task"] == task and x["scenario"] == scen]
        options = r[0].get("options") or ""
        train_s = [x.get("train_original_s_cached") for x in r if x.get("train_original_s_cached") is not None]
        L.append(f"### {task} / {scen}\n")
        L.append(f"seeds {ss[0]['seeds']}; forget {r[0]['n_forget']} / retain {r[0]['n_retain']}"
                 + (f"; options {options}" if options and options != "{}" else "")
                 + f"; original Avg.Gap {np.mean([x['original_avg_gap_pts'] for x in r]):.2f} pts"
                 + (f"; original model's training (cached) {np.mean(train_s):.1f} s, gold's {np.mean([x['retrain_s_cached'] for x in r]):.1f} s"
                    if train_s else "") + ".\n")
        L.append("| config | k | passes/full | total s | ratio/full | ratio/retrain | Avg.Gap pts |")
        L.append("|---|---|---|---|---|---|---|")
        for s in ss:
            L.append(f"| {s['config']} | {s['coreset_size_mean']:.0f} | {base.pm(s, 'passes_ratio_to_full', '.3f')} | "
                     f"{base.pm(s, 'total_s')} | {base.pm(s, 'ratio_to_full', '.3f')} | {base.pm(s, 'ratio_to_retrain', '.3f')} | "
                     f"{base.pm(s, 'avg_gap_pts')} |")
        L.append("")
    L.append("Files: `results.csv` (one row per task/seed/config), `summary.csv`, `refs.csv`, `ablation.png` (per task: "
             "Avg.Gap, seconds / full, seconds / retrain vs fraction), `run_meta.json` (every run's command and arguments).")
    atomic_write_text(path, "\n".join(L) + "\n")


def load_runs(out: Path) -> list[dict[str, Any]]:
    """The runs recorded in ``run_meta.json`` (``{"runs": [...]}``; a file from before ``--merge``, one run, is read too)."""
    path = out / "run_meta.json"
    if not path.exists():
        return []
    meta = json.loads(path.read_text())
    if "runs" in meta:
        return list(meta["runs"])
    return [{"command": meta["command"], "wall_s": meta.get("wall_s"), "args": meta.get("args"), "tasks": []}]


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]], by_strategy: bool = False) -> list[dict[str, Any]]:
    """``old`` with the (task, scenario) groups present in ``new`` replaced by ``new``'s rows, in ``old``'s task order
    (new tasks at the end). ``by_strategy``: the groups are (task, scenario, strategy) instead, and ``new``'s retrain
    rows (and refs, which have no strategy) replace nothing where ``old`` has that task already."""
    if by_strategy:
        have = {(str(r["task"]), str(r["scenario"])) for r in old}
        new = [r for r in new if r.get("strategy") not in (None, "retrain") and (str(r["task"]), str(r["scenario"])) in have
               or (str(r["task"]), str(r["scenario"])) not in have]
        key = lambda r: (str(r["task"]), str(r["scenario"]), str(r.get("strategy")))  # noqa: E731
    else:
        key = lambda r: (str(r["task"]), str(r["scenario"]))  # noqa: E731
    new_keys = list(dict.fromkeys(key(r) for r in new))
    order = list(dict.fromkeys([key(r) for r in old] + new_keys))
    out: list[dict[str, Any]] = []
    for k in order:
        out.extend(r for r in (new if k in new_keys else old) if key(r) == k)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        rows, refs = base.read_csv(out / "results.csv"), base.read_csv(out / "refs.csv")
        summary = base.summarise(rows)
        base.write_csv(summary, out / "summary.csv")
        plot(summary, out / "ablation.png")
        write_markdown(out / "RESULTS.md", load_runs(out), summary, refs)
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
    old_rows, old_refs, runs = [], [], []
    if args.merge and (out / "results.csv").exists():
        old_rows, old_refs, runs = base.read_csv(out / "results.csv"), base.read_csv(out / "refs.csv"), load_runs(out)
    log_file = (out / "run.log").open("w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    log(f"$ {command}")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    done: list[str] = []
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
        done.append(spec + (f" ({args.authors_variant} variant)" if name == "authors" else ""))
        base.write_csv(merge_rows(old_rows, rows, args.merge_strategies), out / "results.csv")  # as we go: a partial run leaves usable files
        base.write_csv(merge_rows(old_refs, refs, args.merge_strategies), out / "refs.csv")
    wall = time.perf_counter() - start
    rows, refs = merge_rows(old_rows, rows, args.merge_strategies), merge_rows(old_refs, refs, args.merge_strategies)
    runs.append({"command": command, "wall_s": wall, "tasks": done, "args": vars(args)})
    summary = base.summarise(rows)
    base.write_csv(summary, out / "summary.csv")
    plot(summary, out / "ablation.png")
    write_markdown(out / "RESULTS.md", runs, summary, refs)
    atomic_write_text(out / "run_meta.json", json.dumps({"runs": runs}, indent=2))
    log(f"wrote {out}/results.csv, summary.csv, refs.csv, ablation.png, RESULTS.md in {wall / 60:.1f} min")
    log_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
