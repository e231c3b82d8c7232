#!/usr/bin/env python
"""Class erasure on ``digits_diffusion``: each method with its defaults, judged against the retrained (gold) model.

For each seed: the original and gold rows, then every method in ``--methods`` run through ``ErasusUnlearner`` on the
whole forget set (``selector=None``: every training image of the erased class) with its own defaults (``--set
method.key=value`` overrides one). Metrics are the registered judged metrics (erased-class generation rate, other
classes' judged accuracy, Frechet distance in the judge's features), each from ``judge_samples`` DDIM images per
class, plus the loss-attack AUC, and Avg.Gap to the gold model (the mean absolute gap over the registry's gap metrics,
:func:`erasus_ray.evaluation.gap_names_for`). Writes ``results.csv`` row by row (a killed run keeps what it measured)
and prints a markdown table; over several seeds also a mean +- std table per method. A method whose capabilities the
task lacks (``CapabilityError``, e.g. ``npo`` needs logits) is reported as refused and skipped.

``--table a.csv,b.csv`` only prints the tables of CSVs written by earlier runs (e.g. one process per seed).

Example (the command RESULTS.md records)::

    ERASUS_RAY_CACHE=/tmp/erasus-bench-cache python benchmarks/diffusion/run.py --seeds 0 \\
        --methods esd,concept_ablation,grad_diff
"""

from __future__ import annotations

import argparse
import copy
import csv
import time
from pathlib import Path

import torch

from erasus_ray import ErasusUnlearner
from erasus_ray.benchmarks import load_benchmark
from erasus_ray.evaluation import gap_metrics, gap_names_for, run_metrics
from erasus_ray.tasks.capabilities import CapabilityError

METRICS = ("erased_generation_rate", "retained_generation_acc", "retained_frechet", "mia_loss_auc")
COLUMNS = ("seed", "method", "seconds", *METRICS, "mia_fixed_t_auc", "avg_gap", "load1")
#: (column, header, format) of the printed tables
SHOWN = (("erased_generation_rate", "erased-class rate", ".3f"), ("retained_generation_acc", "other classes judged acc", ".3f"),
         ("retained_frechet", "Frechet (judge feats)", ".2f"), ("mia_loss_auc", "loss MIA AUC", ".3f"),
         ("mia_fixed_t_auc", "MIA AUC, fixed t, same class", ".3f"), ("avg_gap", "Avg.Gap", ".3f"), ("seconds", "seconds", ".1f"),
         ("load1", "load avg (1 min)", ".1f"))


def load_average() -> float:
    """The machine's 1-minute load average (``/proc/loadavg``; nan where there is none): seconds measured on shared
    cores mean little without it."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def _value(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_overrides(items: list[str]) -> dict[str, dict[str, int | float | str]]:
    out: dict[str, dict[str, int | float | str]] = {}
    for item in items:
        key, value = item.split("=", 1)
        method, name = key.split(".", 1)
        out.setdefault(method, {})[name] = _value(value)
    return out


def label(method: str, overrides: dict[str, int | float | str]) -> str:
    return method + (f" ({', '.join(f'{k}={v}' for k, v in overrides.items())})" if overrides else "")


#: Timesteps of the sample-level membership attack (low noise, where members are fitted best; Carlini et al. 2023
#: and SecMI read the loss at fixed small t).
MIA_TIMESTEPS = (25, 50, 100, 200)


def measure(bench, model) -> dict[str, float]:
    splits = {"forget": bench.forget, "retain": bench.retain, "test": bench.test}
    out = run_metrics(model, bench.task, splits, METRICS, seed=bench.seed)
    # members (the erased class's training images) vs non-members of the same class, so the class is no confound
    fixed = bench.task.at_timesteps(MIA_TIMESTEPS, seed=bench.seed)
    test = bench.test.subset([i for i in bench.test.ids if int(bench.test.base.y[i]) == bench.info["forget_class"]])
    out["mia_fixed_t_auc"] = run_metrics(model, fixed, {"forget": bench.forget, "test": test}, ["mia_loss_auc"])["mia_loss_auc"]
    return out


def save_grid(bench, models: dict[str, torch.nn.Module], path: Path, per_class: int = 3, scale: int = 4) -> None:
    """A PNG with one row band per model (in ``models`` order) and one column per class: ``per_class`` samples each,
    drawn from the same seeded noise for every model, so the bands differ only by the model."""
    from PIL import Image

    cell = 8 * scale
    grid = Image.new("L", (10 * cell, len(models) * per_class * cell + (len(models) - 1) * scale), 255)
    for band, model in enumerate(models.values()):
        for cls in range(10):
            images = bench.task.sample(model, torch.full((per_class,), cls), seed=bench.seed)
            for k, img in enumerate(((images.clamp(-1, 1) + 1) * 127.5).round().byte()[:, 0]):
                tile = Image.fromarray(img.numpy(), "L").resize((cell, cell), Image.NEAREST)
                grid.paste(tile, (cls * cell, band * (per_class * cell + scale) + k * cell))
    grid.save(path)


def unlearn(bench, method: str, overrides: dict[str, float], selector: str | None = None,
            fraction: float | None = None, selector_kwargs: dict | None = None) -> tuple[torch.nn.Module, float]:
    """``method`` on the whole forget set, or (``selector``, built with ``selector_kwargs``) on its ``fraction``
    coreset scored in-process (no Ray: 146 images); seconds include the selection."""
    start = time.perf_counter()
    result = ErasusUnlearner(copy.deepcopy(bench.original), strategy=method, selector=selector,
                             fraction=fraction if selector else None, distributed="none", task=bench.task,
                             selector_kwargs=selector_kwargs if selector else None,
                             seed=bench.seed, progress=False, model_factory=bench.model_factory, recipe=bench.recipe,
                             **overrides).fit(forget_data=bench.forget, retain_data=bench.retain)
    return result.model, time.perf_counter() - start


def with_gap(row: dict, gold: dict, task) -> dict:
    """``row`` plus its Avg.Gap to the gold model's row over the task's gap metrics (rates and the Frechet distance,
    each in its own unit, as the registry's Avg.Gap)."""
    return {**row, "avg_gap": gap_metrics(row, gold, gap_names_for(task, METRICS))["avg_gap"]}


def read_rows(paths: str) -> list[dict]:
    rows: list[dict] = []
    for path in paths.split(","):
        with open(path, newline="") as fh:
            rows.extend(csv.DictReader(fh))
    return rows


def reference_row(path: str, seed: int, method: str) -> dict:
    """Row ``method`` of ``seed`` in the CSV at ``path``, its metrics as floats."""
    for row in read_rows(path):
        if int(row["seed"]) == seed and row["method"] == method:
            return {k: (v if k == "method" else float(v)) for k, v in row.items() if v not in (None, "")}
    raise SystemExit(f"--references: no {method!r} row for seed {seed} in {path}")


def run_seed(args, seed: int, overrides: dict, write) -> None:
    options = {"forget_class": args.forget_class}
    if args.judge_samples:
        options["judge_samples"] = args.judge_samples
    bench = load_benchmark(args.benchmark, seed=seed, **options)
    if args.references:  # the original / gold rows an earlier run measured with the same settings: not re-measured
        gold = reference_row(args.references.format(seed=seed), seed, "gold (retrain)")
    else:
        gold = {"seed": seed, "method": "gold (retrain)", "seconds": bench.seconds["retrain"], **measure(bench, bench.gold)}
        write(with_gap({"seed": seed, "method": "original", "seconds": bench.seconds["train_original"],
                        **measure(bench, bench.original)}, gold, bench.task))
        write(with_gap(gold, gold, bench.task))
    models = {"original": bench.original, "gold": bench.gold}
    for method in args.methods.split(","):
        try:
            models[method], seconds = unlearn(bench, method, overrides.get(method, {}), args.selector, args.fraction,
                                              overrides.get("selector"))
        except CapabilityError as exc:  # the registry's honest refusal: reported, not a crash of the whole board
            print(f"seed {seed}: {method} refused: {exc}", flush=True)
            continue
        name = label(method, overrides.get(method, {})) + (
            f" [{label(args.selector, overrides.get('selector', {}))} {args.fraction:.0%}]" if args.selector else "")
        write(with_gap({"seed": seed, "method": name, "seconds": seconds,
                        **measure(bench, models[method])}, gold, bench.task))
    if args.grid:
        save_grid(bench, models, Path(args.grid.format(seed=seed)))


def _cell(value, fmt: str) -> str:
    return "-" if value in (None, "") else format(float(value), fmt)  # "-": a column an older CSV lacks


def _mean_std_cell(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    std = float(torch.tensor(values, dtype=torch.float64).std()) if len(values) > 1 else 0.0  # ddof 1
    return f"{format(sum(values) / len(values), fmt)} +- {format(std, fmt)}"


def print_tables(rows: list[dict]) -> None:
    """The per-seed markdown table and, when there are several seeds, mean +- std (ddof 1) per method."""
    print("| seed | method | " + " | ".join(h for _, h, _ in SHOWN) + " |")
    print("| --- " * (2 + len(SHOWN)) + "|")
    for r in rows:
        print(f"| {r['seed']} | {r['method']} | " + " | ".join(_cell(r.get(k), f) for k, _, f in SHOWN) + " |")
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    if len({r["seed"] for r in rows}) < 2:
        return
    print("\n| method | seeds | " + " | ".join(h for _, h, _ in SHOWN) + " |")
    print("| --- " * (2 + len(SHOWN)) + "|")
    for method, runs in by_method.items():
        cells = [_mean_std_cell([float(r[k]) for r in runs if r.get(k) not in (None, "")], f) for k, _, f in SHOWN]
        print(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", default="digits_diffusion", help="digits_diffusion or digits_prompt_diffusion")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--methods", default="esd,concept_ablation,grad_diff")
    parser.add_argument("--forget-class", type=int, default=3)
    parser.add_argument("--judge-samples", type=int, default=0, help="images per class judged (0: benchmark default, 64)")
    parser.add_argument("--selector", default=None, help="coreset selector (default: the whole forget set)")
    parser.add_argument("--fraction", type=float, default=0.1, help="coreset fraction with --selector")
    parser.add_argument("--set", action="append", default=[], help="method.key=value override (selector.key=value: "
                        "a --selector constructor argument)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results.csv"))
    parser.add_argument("--grid", default=str(Path(__file__).parent / "samples_seed{seed}.png"),
                        help="PNG of samples per class: original, gold, then each method ('' to skip)")
    parser.add_argument("--references", default="", help="CSV ('{seed}' filled in) whose original / gold rows to "
                        "reuse instead of measuring them again (same --judge-samples)")
    parser.add_argument("--table", default="", help="comma-separated CSVs of earlier runs: only print their tables")
    args = parser.parse_args()
    if args.table:
        print_tables(read_rows(args.table))
        return
    torch.set_num_threads(1)  # DATA.md: one thread is fastest for tiny models on shared cores
    overrides = parse_overrides(args.set)
    rows: list[dict] = []
    with open(args.out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()

        def write(row: dict) -> None:
            row = {**row, "load1": load_average()}  # when the row (its method, then its metrics) ended
            rows.append(row)
            writer.writerow(row)
            fh.flush()
            print(row, flush=True)

        for seed in [int(s) for s in args.seeds.split(",")]:
            run_seed(args, seed, overrides, write)
    print_tables(rows)


if __name__ == "__main__":
    main()
