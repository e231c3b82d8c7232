"""Leaderboards of a sweep: ``leaderboard.csv``, ``leaderboard.md`` and ``pareto.png``, from the sweep directory.

The trials are read from Tune's files (``<trial>/params.json`` and the last line of ``<trial>/result.json``), so a
leaderboard is rebuilt without Ray from a finished, interrupted or copied sweep directory; a ``ResultGrid`` works
too (its ``experiment_path``). ``sweep.json`` (written by :func:`~erasus_ray.tuning.sweep.run_sweep`) adds the
original and retrain (gold) rows and the config.

Rows are ranked by the sweep's primary metric (Avg.Gap to retrain for multi-objective sweeps), ties by the other;
``pareto`` marks the trials no other trial beats on both Avg.Gap and seconds. The top ``top_k`` configurations
(the Pareto front first, by gap, for multi-objective sweeps) are re-run in this process under each of
``rerun_seeds`` (a seed changes the benchmark's models too, as in every job config) and shown as mean +- std;
re-runs are cached in ``reruns.json``, so rebuilding does not repeat them. Cost: nothing for the tables and plot;
one job per (configuration, seed) for the re-runs, plus training that seed's original and gold models once.

Example::

    build_leaderboard("results/sweeps/ci_digits-20260101-120000")          # or: erasus-ray leaderboard <dir>
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from erasus_ray.errors import InvalidDataError
from erasus_ray.tuning.config import SweepConfig
from erasus_ray.tuning.search_space import job_config, trial_params
from erasus_ray.tuning.trials import META_FILE, flat_result, load_cached_benchmark
from erasus_ray.cli.report import write_csv
from erasus_ray.utils.atomic import atomic_savefig, atomic_write_text

CSV_FILE, MD_FILE, PNG_FILE, RERUN_FILE = "leaderboard.csv", "leaderboard.md", "pareto.png", "reruns.json"


# ----------------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------------
def _last_json_line(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    last = None
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                last = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interruption
                continue
    return last


def load_trials(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per trial: ``trial_id``, ``status`` (ok | error), ``params`` and the reported values."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for params_path in sorted(sweep_dir.glob("*/params.json")):
        trial_dir = params_path.parent
        params = json.loads(params_path.read_text())
        result = _last_json_line(trial_dir / "result.json") or {}
        ok = isinstance(result.get("avg_gap"), (int, float)) and math.isfinite(result["avg_gap"])
        row = {
            "trial_id": result.get("trial_id") or trial_dir.name,
            "trial_dir": trial_dir.name,
            # ASHA stops a trial after one of its per-epoch reports ("running (epoch k)"): not a finished run
            "status": ("early_stopped" if str(result.get("stopped", "")).startswith("running") else "ok") if ok else "error",
            "params": trial_params(params),
        }
        for key in ("avg_gap", "seconds", "select_s", "unlearn_s", "coreset_size", "n_forget", "steps", "stopped", "seed", "lr", "epochs",
                    "verified", "mode", "final_fraction"):
            row[key] = result.get(key)
        row["metrics"] = result.get("metrics") or {}
        rows.append(row)
    return rows


def load_meta(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / META_FILE
    return json.loads(path.read_text()) if path.exists() else {}


# ----------------------------------------------------------------------------------------------------------------------
# ranking
# ----------------------------------------------------------------------------------------------------------------------
def pareto_mask(gap: Sequence[float], seconds: Sequence[float]) -> np.ndarray:
    """True where no other point is <= on both objectives and < on one (both minimised)."""
    g, s = np.asarray(gap, float), np.asarray(seconds, float)
    mask = np.ones(len(g), bool)
    for i in range(len(g)):
        dominated = (g <= g[i]) & (s <= s[i]) & ((g < g[i]) | (s < s[i]))
        mask[i] = not dominated.any()
    return mask


def rank_trials(rows: list[dict[str, Any]], primary: str = "avg_gap") -> list[dict[str, Any]]:
    """Sort finished trials: verified ones first (the target held on the whole forget set), then by ``primary`` and
    the other objective; flag the Pareto front; errored trials last."""
    other = "seconds" if primary == "avg_gap" else "avg_gap"
    ok = [r for r in rows if r["status"] == "ok"]
    bad = [r for r in rows if r["status"] != "ok"]
    mask = pareto_mask([r["avg_gap"] for r in ok], [r["seconds"] for r in ok]) if ok else np.zeros(0, bool)
    for r, m in zip(ok, mask):
        r["pareto"] = bool(m)
    ok.sort(key=lambda r: (r.get("verified") is not True, r[primary], r[other], r["trial_id"]))
    for i, r in enumerate(ok, 1):
        r["rank"] = i
    for r in bad:
        r["pareto"], r["rank"] = False, None
    bad.sort(key=lambda r: (r["status"] != "early_stopped", r.get(primary) if r.get(primary) is not None else math.inf))
    return ok + bad


def top_configs(ranked: list[dict[str, Any]], k: int, multi: bool) -> list[dict[str, Any]]:
    ok = [r for r in ranked if r["status"] == "ok"]
    if multi:
        ok = [r for r in ok if r["pareto"]] + [r for r in ok if not r["pareto"]]
    seen, out = set(), []
    for r in ok:
        key = json.dumps(r["params"], sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(r)
        if len(out) >= k:
            break
    return out


# ----------------------------------------------------------------------------------------------------------------------
# re-runs
# ----------------------------------------------------------------------------------------------------------------------
def rerun_configs(cfg: SweepConfig, configs: list[dict[str, Any]], seeds: Sequence[int], sweep_dir: Path,
          log: Any = print) -> dict[str, list[dict[str, Any]]]:
    """Re-run each configuration under each seed (cached in ``reruns.json``); returns params-key -> runs."""
    from erasus_ray.evaluation import evaluate
    from erasus_ray.experiment import run_job, warm_up

    path = sweep_dir / RERUN_FILE
    cache: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}
    out: dict[str, list[dict[str, Any]]] = {}
    warm_up()
    own_reference = load_meta(sweep_dir).get("gold_metrics") if cfg.own_data else None
    gold_by_seed: dict[int, dict[str, float]] = {}
    for conf in configs:
        key = json.dumps(conf["params"], sort_keys=True, default=str)
        out[key] = []
        for seed in seeds:
            cache_key = f"{key}|{seed}"
            if cache_key not in cache and own_reference is not None:  # the user's job: same data, another seed
                from erasus_ray.tuning.own_data import evaluate_own_trial

                cache[cache_key] = evaluate_own_trial(conf["params"], cfg, own_reference, seed=seed)
                atomic_write_text(path, json.dumps(cache, indent=1, default=str))
                log(f"  re-run #{conf['rank']} seed {seed}: Avg.Gap {100 * cache[cache_key]['avg_gap']:.2f} pts")
            if cache_key not in cache:
                job = job_config(cfg, conf["params"], seed=seed)
                bench = load_cached_benchmark(job)
                if seed not in gold_by_seed:
                    gold_by_seed[seed] = evaluate(bench.gold, forget=bench.forget, retain=bench.retain, test=bench.test,
                                                  task=bench.task, seed=seed)
                result = flat_result(run_job(job, bench=bench, gold_metrics=gold_by_seed[seed], progress=False))
                cache[cache_key] = result
                atomic_write_text(path, json.dumps(cache, indent=1, default=str))
                log(f"  re-run #{conf['rank']} seed {seed}: Avg.Gap {100 * result['avg_gap']:.2f} pts, {result['seconds']:.2f}s")
            out[key].append({**cache[cache_key], "seed": seed})
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


# ----------------------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------------------
def _display_keys(cfg: SweepConfig | None, rows: list[dict[str, Any]]) -> tuple[str, ...]:
    from erasus_ray.evaluation import display_names_for, display_names_for_row, metric_names_for
    from erasus_ray.tasks import TASKS

    if cfg is not None:
        try:
            task = TASKS.get(cfg.task_name())
        except KeyError:  # an unknown benchmark or task: lay the table out from the rows
            pass
        else:
            # the adapter class's suite, plus the display metrics it declares that only a configured instance measures
            # (a diffusion task's judged generation metrics need its judge), where the trials measured them
            extra = [k for k in task.display_metrics or () if any(r["metrics"].get(k) is not None for r in rows)]
            return tuple(dict.fromkeys(display_names_for(task, [*metric_names_for(task), *extra])))
    return display_names_for_row({k: v for r in rows for k, v in r["metrics"].items() if v is not None})


def _pts(v: Any, key: str = "") -> float:
    from erasus_ray.cli.report import UNSCALED_SUFFIXES  # losses and Frechet distances are not rates: as they are

    if v is None:
        return math.nan
    return float(v) if key.endswith(UNSCALED_SUFFIXES) else 100 * float(v)


def _fraction(value: Any) -> str:
    return value if isinstance(value, str) else f"{value if value is not None else math.nan:.3g}"


def leaderboard_rows(ranked: list[dict[str, Any]], refs: list[dict[str, Any]], keys: Sequence[str],
                     reruns: dict[str, list[dict[str, Any]]], sweep_seed: int | None) -> list[dict[str, Any]]:
    """Flat CSV rows: the reference rows, then one per trial (metrics in points, losses as is)."""
    out = []
    for ref in refs:
        out.append({"rank": "", "kind": "reference", "label": ref["label"], "avg_gap_pts": 100 * ref["avg_gap"],
                    "seconds": ref["seconds"], **{k: _pts(ref["metrics"].get(k), k) for k in keys}})
    for r in ranked:
        p = r["params"]
        strategy = p.get("strategy")
        extra = {k.split(".", 1)[1]: v for k, v in p.items() if k.startswith(f"{strategy}.") and k.split(".", 1)[1] not in ("lr", "epochs")}
        row = {
            "rank": r["rank"] if r["rank"] is not None else "", "kind": "trial", "label": f"{strategy}/{p.get('selector')}@{_fraction(p.get('fraction'))}",
            "trial_id": r["trial_id"], "status": r["status"], "strategy": strategy, "selector": p.get("selector"),
            "fraction": p.get("fraction"), "lr": r.get("lr"), "epochs": r.get("epochs"),
            "strategy_params": json.dumps(extra, sort_keys=True) if extra else "",
            "avg_gap_pts": _pts(r.get("avg_gap")), "seconds": r.get("seconds"), "select_s": r.get("select_s"),
            "unlearn_s": r.get("unlearn_s"), "coreset_size": r.get("coreset_size"), "n_forget": r.get("n_forget"),
            "steps": r.get("steps"), "pareto": r.get("pareto"), "seed": r.get("seed"),
            "verified": r.get("verified"), "mode": r.get("mode"), "final_fraction": r.get("final_fraction"),
            **{k: _pts(r["metrics"].get(k), k) for k in keys},
            "params": json.dumps(p, sort_keys=True, default=str),
        }
        runs = reruns.get(json.dumps(p, sort_keys=True, default=str))
        if runs:
            gm, gs = _mean_std([100 * x["avg_gap"] for x in runs])
            sm, ss = _mean_std([x["seconds"] for x in runs])
            row.update({"rerun_seeds": " ".join(str(x["seed"]) for x in runs), "rerun_avg_gap_pts_mean": gm,
                        "rerun_avg_gap_pts_std": gs, "rerun_seconds_mean": sm, "rerun_seconds_std": ss})
            same = [x for x in runs if x["seed"] == sweep_seed]
            if same and r.get("avg_gap") is not None:
                row["rerun_same_seed_gap_diff_pts"] = abs(100 * same[0]["avg_gap"] - 100 * r["avg_gap"])
        out.append(row)
    return out




#: Columns read back as text: a Tune trial id such as ``558e4731`` would otherwise parse as a float.
TEXT_COLUMNS = ("kind", "label", "trial_id", "status", "strategy", "selector", "strategy_params", "params", "rerun_seeds", "mode")


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """``leaderboard.csv`` back as dicts (numbers parsed except in :data:`TEXT_COLUMNS`, empty cells as None)."""
    def parse(v: str, key: str = "") -> Any:
        if v == "":
            return None
        if key in TEXT_COLUMNS:
            return v
        if v in ("True", "False"):
            return v == "True"
        for cast in (int, float):
            try:
                return cast(v)
            except ValueError:
                pass
        return v

    with Path(path).open() as f:
        return [{k: parse(v, k) for k, v in r.items()} for r in csv.DictReader(f)]


def _f(v: Any, fmt: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v == "":
        return "-"
    if fmt == "d" and isinstance(v, float) and v.is_integer():
        v = int(v)
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def write_markdown(path: Path, rows: list[dict[str, Any]], keys: Sequence[str], meta: dict[str, Any], title: str,
                   max_rows: int = 50) -> None:
    cfg = meta.get("config", {})
    trials = [r for r in rows if r["kind"] == "trial"]
    ok = [r for r in trials if r["status"] == "ok"]
    own = cfg.get("job") is not None
    source = f"job `{cfg['job']}`" if own else f"benchmark `{cfg.get('benchmark', '?')}` / `{cfg.get('scenario') or 'default'}`"
    L = [f"# Leaderboard: {title}\n"]
    L.append(f"{source}, seed {cfg.get('seed', '?')}; "
             f"objective `{cfg.get('objective', '?')}`"
             + (f" (`{cfg.get('metric')}`)" if cfg.get("objective") == "single" else
                f" (Avg.Gap to {'the held-out reference' if own else 'retrain'}, seconds; both minimised)")
             + f"; {len(trials)} trials, {len(trials) - len(ok)} errored"
             + (f"; sweep wall time {meta['wall_s']:.0f}s" if meta.get("wall_s") else "") + ".\n")
    if own:
        L.append("No model retrained without the forget set exists here: Avg.Gap = mean |metric - reference| over the "
                 "task's gap metrics that have one, in points (x100), the reference being the original model's held-out "
                 "value for forget metrics (the forget set should look held-out; accuracy 0 for whole forgotten classes) "
                 "and its own value for retain and held-out metrics (utility kept); see erasus_ray.tuning.own_data.\n")
    L.append(("Avg.Gap" if own else "Avg.Gap = mean |metric - retrained model's metric| over the task's metrics, in points (x100)")
             + "; "
             "seconds = coreset selection + unlearning (evaluation not timed); metrics in points, losses and Frechet distances as is. "
             "`P` = on the Pareto front (no trial has both lower gap and fewer seconds). The original row's seconds are "
             "its training time; the retrain row's, the gold model's training time.\n")
    head = ["rank", "run", "verified", "steps", "final coreset", "lr", "epochs", "params", "Avg.Gap", "seconds", "coreset", "P", *keys]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for r in [x for x in rows if x["kind"] == "reference"] + ok[:max_rows]:
        L.append("| " + " | ".join([
            _f(r.get("rank"), "d"), r["label"], {True: "yes", False: "no"}.get(r.get("verified"), "-"), _f(r.get("steps"), "d"),
            _f(r.get("final_fraction"), ".2f"), _f(r.get("lr"), ".2e"), _f(r.get("epochs"), "d"), r.get("strategy_params") or "",
            _f(r["avg_gap_pts"]), _f(r["seconds"]), _f(r.get("coreset_size"), "d"), "P" if r.get("pareto") else "",
            *[_f(r.get(k), ".3f" if k.endswith("_loss") else ".1f") for k in keys]]) + " |")
    if len(ok) > max_rows:
        L.append(f"\n({len(ok) - max_rows} more rows in leaderboard.csv)")
    reran = [r for r in ok if r.get("rerun_seeds")]
    if reran:
        L.append(f"\n## Top {len(reran)} configurations re-run with seeds {reran[0]['rerun_seeds']} (mean +- std)\n")
        L.append("A seed changes the benchmark's original and gold models as well as selection and shuffling.\n")
        L.append("| rank | run | Avg.Gap (sweep) | Avg.Gap mean +- std | seconds mean +- std | same-seed re-run gap diff |")
        L.append("|---|---|---|---|---|---|")
        for r in reran:
            L.append(f"| {r['rank']} | {r['label']} | {_f(r['avg_gap_pts'])} | {r['rerun_avg_gap_pts_mean']:.2f} +- "
                     f"{r['rerun_avg_gap_pts_std']:.2f} | {r['rerun_seconds_mean']:.2f} +- {r['rerun_seconds_std']:.2f} | "
                     f"{_f(r.get('rerun_same_seed_gap_diff_pts'), '.4f')} |")
    early = [r for r in trials if r["status"] == "early_stopped"]
    if early:
        L.append(f"\nStopped early by ASHA (Avg.Gap and seconds at the stopping epoch, not ranked): "
                 + ", ".join(f"{r['label']} ({_f(r['avg_gap_pts'])} pts)" for r in early))
    errored = [r for r in trials if r["status"] == "error"]
    if errored:
        L.append(f"\nErrored trials (no result; see their error.txt): {', '.join(str(r['trial_id']) for r in errored)}")
    L.append("\nFiles: `leaderboard.csv` (every trial, its params as JSON), `pareto.png` (gap vs seconds), `reruns.json`.")
    atomic_write_text(path, "\n".join(L) + "\n")


#: Strategy marker shapes (distinct outlines at 6-8 pt) and fill styles; a strategy's style is one (shape, fill)
#: pair, shapes first, so up to 12 strategies get a filled shape each and 72 get a unique pair; beyond that a
#: strategy is drawn as its number (``$73$``), still one style per strategy.
STRATEGY_MARKERS: tuple[str, ...] = ("o", "s", "^", "v", "D", "P", "X", "*", "p", "h", "<", ">")
STRATEGY_FILLS: tuple[str, ...] = ("full", "none", "left", "bottom", "right", "top")
#: Legend entries per column.
LEGEND_ROWS = 40


def strategy_styles(strategies: Sequence[str]) -> dict[str, tuple[str, str]]:
    """One ``(marker, fillstyle)`` per strategy (in the given order), never repeated for any number of strategies."""
    n_pairs = len(STRATEGY_MARKERS) * len(STRATEGY_FILLS)
    out = {}
    for i, s in enumerate(strategies):
        if i < n_pairs:
            out[s] = (STRATEGY_MARKERS[i % len(STRATEGY_MARKERS)], STRATEGY_FILLS[i // len(STRATEGY_MARKERS)])
        else:
            out[s] = (f"${i + 1}$", "full")
    return out


def selector_colours(selectors: Sequence[str]) -> dict[str, tuple[float, float, float, float]]:
    """One colour per selector, never repeated: ``tab10`` for up to 10 selectors, else the hue circle sampled at
    ``n`` equally spaced points (hues ``0.92 i / n``: all distinct, and the last stays clear of the first's red)
    with (saturation, value) cycling over three levels, so neighbouring hues also differ in lightness. Smallest RGB
    distance between two colours: 0.30 / 0.25 / 0.20 / 0.10 for 11 / 20 / 30 / 60 selectors (``tab20``: 0.10 at 20).
    """
    import matplotlib
    from matplotlib.colors import hsv_to_rgb

    n = len(selectors)
    if n <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return {s: tuple(float(c) for c in cmap(i)) for i, s in enumerate(selectors)}
    out = {}
    for i, s in enumerate(selectors):
        sat, val = ((0.95, 0.85), (0.55, 0.95), (0.9, 0.6))[i % 3]
        out[s] = (*(float(c) for c in hsv_to_rgb((0.92 * i / n, sat, val))), 1.0)
    return out


def plot_pareto(rows: list[dict[str, Any]], path: Path, title: str, gap_to: str = "retrain") -> dict[str, Any]:
    """Avg.Gap (points) vs seconds (log): one marker style per strategy, one colour per selector (both one-to-one
    for any number of them, see :func:`strategy_styles` and :func:`selector_colours`), the Pareto front as a step
    line with its points ringed, re-run means +- std as grey error bars, the original and retrain rows as stars.

    Returns what was drawn: ``strategy_style`` (strategy -> (marker, fillstyle)), ``selector_colour`` (selector ->
    RGBA) and ``points`` (one per trial, read back from the plotted artists: label, strategy, selector, marker,
    fillstyle, colour). ``gap_to``: what Avg.Gap is measured against (the y label).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    ok = [r for r in rows if r["kind"] == "trial" and r["status"] == "ok"]
    refs = [r for r in rows if r["kind"] == "reference"]
    strategies = sorted({r["strategy"] for r in ok})
    selectors = sorted({r["selector"] for r in ok})
    style = strategy_styles(strategies)
    colour = selector_colours(selectors)
    # legends beside the axes, at most LEGEND_ROWS entries a column; the figure grows to fit them
    s_cols = math.ceil((len(strategies) + 1) / LEGEND_ROWS)
    c_cols = max(1, math.ceil(len(selectors) / LEGEND_ROWS))
    rows_needed = max(math.ceil((len(strategies) + 1) / s_cols), math.ceil(len(selectors) / c_cols))
    fig, ax = plt.subplots(figsize=(9, max(5.5, 0.19 * rows_needed + 0.8)))
    points = []
    for r in ok:
        marker, fill = style[r["strategy"]]
        x = max(r["seconds"], 1e-3)
        if r.get("pareto"):
            ax.plot([x], [r["avg_gap_pts"]], ls="", marker="o", ms=15, mfc="none", mec="black", mew=0.8, alpha=0.7, zorder=2)
        (line,) = ax.plot([x], [r["avg_gap_pts"]], ls="", marker=marker, fillstyle=fill, ms=9 if r.get("pareto") else 7,
                          color=colour[r["selector"]], markerfacecoloralt="white", mew=1.3, alpha=0.9, zorder=3)
        line.set_gid(str(r.get("trial_id") or r["label"]))
        points.append({"label": r["label"], "strategy": r["strategy"], "selector": r["selector"], "marker": line.get_marker(),
                       "fillstyle": line.get_fillstyle(), "colour": tuple(float(c) for c in matplotlib.colors.to_rgba(line.get_color()))})
        if r.get("rerun_avg_gap_pts_mean") is not None:
            ax.errorbar(r["rerun_seconds_mean"], r["rerun_avg_gap_pts_mean"], xerr=r["rerun_seconds_std"],
                        yerr=r["rerun_avg_gap_pts_std"], color="grey", alpha=0.6, capsize=3, zorder=2)
    front = sorted((r for r in ok if r.get("pareto")), key=lambda r: r["seconds"])
    if front:
        ax.step([max(r["seconds"], 1e-3) for r in front], [r["avg_gap_pts"] for r in front], where="post", color="black",
                lw=1, alpha=0.6, zorder=1)
    for r, c in zip(refs, ("tab:red", "tab:green")):
        ax.axhline(r["avg_gap_pts"], color=c, ls=":", lw=1)
        ax.plot([max(r["seconds"], 1e-3)], [r["avg_gap_pts"]], ls="", marker="*", ms=14, color=c, mec="black", mew=0.5, zorder=4)
        ax.annotate(r["label"], (max(r["seconds"], 1e-3), r["avg_gap_pts"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("seconds (selection + unlearning; references: training time), log")
    ax.set_ylabel(f"Avg.Gap to {gap_to} (points)")
    ax.set_title(title)
    s_handles = [Line2D([], [], ls="", marker=style[s][0], fillstyle=style[s][1], color="dimgray", markerfacecoloralt="white",
                        mew=1.2, ms=7, label=s) for s in strategies]
    s_handles.append(Line2D([], [], ls="", marker="o", ms=11, mfc="none", mec="black", label="Pareto front (ringed)"))
    c_handles = [Line2D([], [], ls="", marker="s", ms=7, color=colour[s], label=s) for s in selectors]
    first = ax.legend(handles=s_handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="marker: strategy",
                      title_fontsize=7, ncol=s_cols, frameon=False, handletextpad=0.2)
    ax.add_artist(first)
    fig.canvas.draw()  # the second legend starts where the first one ends
    right = first.get_window_extent().transformed(ax.transAxes.inverted()).x1
    ax.legend(handles=c_handles, fontsize=7, loc="upper left", bbox_to_anchor=(right + 0.01, 1.0),
              title="colour: selector", title_fontsize=7, ncol=c_cols, frameon=False, handletextpad=0.2)
    atomic_savefig(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return {"strategy_style": style, "selector_colour": colour, "points": points}


def build_leaderboard(source: Any, *, rerun: bool = True, top_k: int | None = None,
                      seeds: Sequence[int] | None = None, out: str | Path | None = None, log: Any = print) -> Path:
    """Write ``leaderboard.csv``, ``leaderboard.md`` and ``pareto.png`` for a sweep directory or ``ResultGrid``.

    ``rerun``: re-run the top ``top_k`` (default: the config's) configurations under ``seeds`` (default: the
    config's ``rerun_seeds``); needs the sweep's ``sweep.json``. ``out``: where to write (default: the sweep dir).
    Returns the folder written to.
    """
    sweep_dir = Path(getattr(source, "experiment_path", source))
    if not sweep_dir.is_dir():
        raise InvalidDataError(f"sweep dir {sweep_dir} does not exist")
    rows = load_trials(sweep_dir)
    if not rows:
        raise InvalidDataError(f"{sweep_dir} holds no trials (no */params.json): is it a Tune sweep directory?")
    meta = load_meta(sweep_dir)
    # a sweep written before closed-loop sweeps existed searched lr x epochs: open loop
    cfg = SweepConfig.from_dict({"loop": "open", **meta["config"]}) if meta.get("config") else None
    multi = cfg is None or cfg.objective == "multi"
    primary = "avg_gap" if cfg is None or multi else cfg.metric
    ranked = rank_trials(rows, primary)
    keys = _display_keys(cfg, rows)
    reruns: dict[str, list[dict[str, Any]]] = {}
    k = cfg.top_k if (cfg is not None and top_k is None) else (top_k or 0)
    if rerun and cfg is not None and k > 0:
        chosen = top_configs(ranked, k, multi)
        seeds = list(cfg.rerun_seeds if seeds is None else seeds)
        if chosen and seeds:
            log(f"[erasus-ray] re-running the top {len(chosen)} configuration(s) with seeds {seeds}")
            reruns = rerun_configs(cfg, chosen, seeds, sweep_dir, log=log)
    elif (sweep_dir / RERUN_FILE).exists() and cfg is not None:  # keep earlier re-runs in a rebuilt leaderboard
        cache = json.loads((sweep_dir / RERUN_FILE).read_text())
        for key, value in cache.items():
            params, seed = key.rsplit("|", 1)
            reruns.setdefault(params, []).append({**value, "seed": int(seed)})
    table = leaderboard_rows(ranked, meta.get("references", []), keys, reruns, cfg.seed if cfg else None)
    folder = Path(out) if out else sweep_dir
    folder.mkdir(parents=True, exist_ok=True)
    title = f"{cfg.name if cfg else sweep_dir.name} ({sweep_dir.name})"
    write_csv(table, folder / CSV_FILE)
    write_markdown(folder / MD_FILE, table, keys, meta, title)
    plot_pareto(table, folder / PNG_FILE, title, gap_to="the held-out reference" if cfg is not None and cfg.own_data else "retrain")
    best = next((r for r in table if r["kind"] == "trial" and r["status"] == "ok"), None)
    if best:
        log(f"[erasus-ray] best: {best['label']} Avg.Gap {best['avg_gap_pts']:.2f} pts in {best['seconds']:.2f}s")
    log(f"[erasus-ray] wrote {folder / CSV_FILE}, {folder / MD_FILE}, {folder / PNG_FILE}")
    return folder
