"""``erasus-ray demo`` and ``erasus-ray unlearn --config``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from erasus_ray.benchmarks import load_benchmark
from erasus_ray.cli.report import plot_rows, print_table, save_json
from erasus_ray.evaluation import evaluate
from erasus_ray.experiment import JobConfig, display_keys, reference_rows, run_job


def run_demo(
    benchmark: str = "digits",
    scenario: str | None = None,
    strategy: str | None = None,
    selector: str | None = "el2n",
    fraction: float = 0.1,
    seed: int = 0,
    out: Path = Path("results/demo"),
    progress: bool = True,
    variant: str | None = None,
    use_ray: bool = True,
) -> list[dict[str, Any]]:
    """Original vs gold vs full-forget-set vs coreset unlearning on a benchmark; writes results.json and demo.png.

    With ``use_ray`` (the default) the coreset is scored on the Ray actor pool (``actors/scoring.yaml``): the
    embedded local Ray is started in-process, or ``RAY_ADDRESS`` is joined. Its start-up and actor creation are
    part of the selection time that the table reports.
    """
    options = {"variant": variant} if variant else {}
    cfg = JobConfig.from_dict(
        {"benchmark": benchmark, "scenario": scenario, "seed": seed, "strategy": strategy, "selector": selector,
         "fraction": fraction, "benchmark_options": options, "execution": {"distributed": "ray" if use_ray else "none"}}
    )
    print(f"[erasus-ray] {benchmark}: building data and the original + gold (retrained) models (cached after the first run)")
    bench = load_benchmark(cfg.benchmark, cfg.scenario, cfg.seed, **cfg.benchmark_options)
    gold = evaluate(bench.gold, forget=bench.forget, retain=bench.retain, test=bench.test, task=bench.task, seed=seed)
    rows = reference_rows(bench, gold, seed)
    print(f"[erasus-ray] unlearning {len(bench.forget_ids)} forget samples with {cfg.strategy}: full forget set, then a {fraction:.0%} {selector} coreset")
    rows.append(run_job(cfg, bench=bench, gold_metrics=gold, progress=progress, label=f"{cfg.strategy} full", fraction=1.0))
    rows.append(run_job(cfg, bench=bench, gold_metrics=gold, progress=progress, label=f"{cfg.strategy} {selector} {fraction:.0%}"))
    keys = display_keys(bench)
    title = f"{bench.name}/{bench.scenario} seed={seed}: metrics in points, Avg.Gap to retrain (lower is better)"
    print_table(rows, keys, title)
    full, core = rows[2], rows[3]
    ratio = core["timings"]["total"] / max(full["timings"]["total"], 1e-9)
    where = "on the Ray scoring pool" if use_ray else "in process"
    print(
        f"coreset selection {where}: {core['timings'].get('select', 0.0):.2f}s; unlearning {core['timings'].get('unlearn', 0.0):.2f}s "
        f"vs {full['timings'].get('unlearn', 0.0):.2f}s on the full forget set."
    )
    print(
        f"coreset end-to-end {core['timings']['total']:.2f}s = {ratio:.2f}x the full forget set "
        f"({full['timings']['total']:.2f}s) and {core['timings']['total'] / max(bench.seconds['retrain'], 1e-9):.3f}x retraining "
        f"({bench.seconds['retrain']:.2f}s, measured when the gold model was trained)."
    )
    out.mkdir(parents=True, exist_ok=True)
    save_json(rows, out / "results.json", {"benchmark": bench.name, "scenario": bench.scenario, "seed": seed, "config": cfg.to_dict()})
    plot_rows(rows, keys, out / "demo.png", f"{bench.name}/{bench.scenario} (seed {seed})")
    print(f"wrote {out / 'results.json'} and {out / 'demo.png'}")
    return rows


def run_config(path: Path, out: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run one job from a YAML config; write results.json (metrics, coreset ids, timings) and the model weights."""
    cfg = JobConfig.from_yaml(path)
    row = run_job(cfg, progress=progress)
    folder = Path(out or cfg.output or f"results/{cfg.benchmark}")
    row["result"].save(folder)  # model first, results last, both atomic
    print_table([row], [k for k in row["metrics"] if not k.startswith(("gold_", "gap_")) and k not in ("avg_gap", "seed")][:6], str(path))
    print(f"wrote {folder / 'results.json'} and {folder / 'model.pt'}")
    return row
