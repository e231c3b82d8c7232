#!/usr/bin/env python
"""Class erasure on ``digits_diffusion``: each method with its defaults, judged against the retrained (gold) model.

For each seed: the original and gold rows, then every method in ``--methods`` run through ``ErasusUnlearner`` on the
whole forget set (``selector=None``: every training image of the erased class) with its own defaults (``--set
method.key=value`` overrides one). Metrics are the registered judged metrics (erased-class generation rate, other
classes' judged accuracy, Frechet distance in the judge's features), each from ``judge_samples`` DDIM images per
class, plus the loss-attack AUC. Writes ``results.csv`` and prints a markdown table.

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
from erasus_ray.evaluation import run_metrics

METRICS = ("erased_generation_rate", "retained_generation_acc", "retained_frechet", "mia_loss_auc")


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


def unlearn(bench, method: str, overrides: dict[str, float]) -> tuple[torch.nn.Module, float]:
    start = time.perf_counter()
    result = ErasusUnlearner(copy.deepcopy(bench.original), strategy=method, selector=None, fraction=None,
                             task=bench.task, seed=bench.seed, progress=False, model_factory=bench.model_factory,
                             recipe=bench.recipe, **overrides).fit(forget_data=bench.forget, retain_data=bench.retain)
    return result.model, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", default="digits_diffusion", help="digits_diffusion or digits_prompt_diffusion")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--methods", default="esd,concept_ablation,grad_diff")
    parser.add_argument("--forget-class", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="method.key=value override")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results.csv"))
    parser.add_argument("--grid", default=str(Path(__file__).parent / "samples_seed{seed}.png"),
                        help="PNG of samples per class: original, gold, then each method ('' to skip)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # DATA.md: one thread is fastest for tiny models on shared cores
    overrides = parse_overrides(args.set)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        bench = load_benchmark(args.benchmark, seed=seed, forget_class=args.forget_class)
        rows.append({"seed": seed, "method": "original", "seconds": bench.seconds["train_original"], **measure(bench, bench.original)})
        rows.append({"seed": seed, "method": "gold (retrain)", "seconds": bench.seconds["retrain"], **measure(bench, bench.gold)})
        models = {"original": bench.original, "gold": bench.gold}
        for method in args.methods.split(","):
            models[method], seconds = unlearn(bench, method, overrides.get(method, {}))
            rows.append({"seed": seed, "method": label(method, overrides.get(method, {})), "seconds": seconds,
                         **measure(bench, models[method])})
            print(rows[-1], flush=True)
        if args.grid:
            save_grid(bench, models, Path(args.grid.format(seed=seed)))
    with open(args.out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("| seed | method | erased-class rate | other classes judged acc | Frechet (judge feats) | loss MIA AUC "
          "| MIA AUC, fixed t, same class | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['seed']} | {r['method']} | {r['erased_generation_rate']:.3f} | {r['retained_generation_acc']:.3f} | "
              f"{r['retained_frechet']:.2f} | {r['mia_loss_auc']:.3f} | {r['mia_fixed_t_auc']:.3f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
