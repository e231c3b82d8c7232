"""``erasus-ray demo`` and ``erasus-ray unlearn --config``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from erasus_ray.benchmarks import BENCHMARKS, benchmark_spec_class, load_benchmark
from erasus_ray.cli.report import plot_rows, print_table, save_json
from erasus_ray.errors import UnknownNameError
from erasus_ray.evaluation import evaluate
from erasus_ray.experiment import JobConfig, display_keys, reference_rows, run_job

def demo_benchmark(name: str) -> str:
    """The benchmark ``erasus-ray demo --task NAME`` runs: a benchmark's own name, or the name of a task family that
    exactly one benchmark has (``diffusion`` -> ``digits_diffusion``; read from the benchmarks' adapter classes, so a
    new family's benchmark gets its alias without an edit here). Unknown: an error listing both kinds of name."""
    if name in BENCHMARKS:
        return name
    families: dict[str, list[str]] = {}
    for bench in sorted(BENCHMARKS):
        families.setdefault(benchmark_spec_class(bench).task_class.name, []).append(bench)
    if len(families.get(name, ())) == 1:
        return families[name][0]
    aliases = sorted(f for f, benches in families.items() if len(benches) == 1 and f not in BENCHMARKS)
    raise UnknownNameError(f"Unknown demo task {name!r}. Benchmarks: {', '.join(sorted(BENCHMARKS))}; task families "
                           f"with one benchmark: {', '.join(aliases)}")


def run_demo(
    benchmark: str = "digits",
    scenario: str | None = None,
    strategy: str | None = None,
    selector: str | None = "el2n",
    fraction: float | str = "auto",
    seed: int = 0,
    out: Path = Path("results/demo"),
    progress: bool = True,
    variant: str | None = None,
    use_ray: bool = True,
) -> list[dict[str, Any]]:
    """Original vs gold vs full-forget-set vs coreset unlearning on a benchmark; writes results.json and demo.png.

    Both runs are closed-loop (they stop when the target holds on the whole forget set; the table's ``verified``
    column). ``fraction="auto"``: the adaptive coreset. With ``use_ray`` (the default) the coreset is scored on the Ray
    actor pool (``actors/scoring.yaml``): the embedded local Ray is started in-process, or ``RAY_ADDRESS`` is joined;
    that start-up (and the actors') is timed on its own line, and selection is timed on the warm pool.
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
    pool, startup = _warm_pool(bench.task) if use_ray and selector else (None, 0.0)
    if pool is not None:
        print(f"[erasus-ray] cluster start-up: local Ray and {len(pool._handles)} scoring actors in {startup:.2f}s (once per process)")
    what = "an adaptive" if fraction == "auto" else f"a {float(fraction):.0%}"
    print(f"[erasus-ray] unlearning {len(bench.forget_ids)} forget samples with {cfg.strategy}: full forget set, then {what} {selector} coreset")
    try:
        rows.append(run_job(cfg, bench=bench, gold_metrics=gold, progress=progress, label=f"{cfg.strategy} full", fraction=1.0))
        label = f"{cfg.strategy} {selector} " + ("auto" if fraction == "auto" else f"{float(fraction):.0%}")
        rows.append(run_job(cfg, bench=bench, gold_metrics=gold, progress=progress, label=label, pool=pool))
    finally:
        if pool is not None:
            pool.close()
    keys = display_keys(bench)
    title = f"{bench.name}/{bench.scenario} seed={seed}: metrics in points, Avg.Gap to retrain (lower is better)"
    print_table(rows, keys, title)
    full, core = rows[2], rows[3]
    ratio = core["timings"]["total"] / max(full["timings"]["total"], 1e-9)
    where = "on the warm Ray scoring pool" if pool is not None else "in process"
    growth = core["verification"].get("coreset_growth")
    print(
        f"coreset selection {where}: {core['timings'].get('select', 0.0):.2f}s; unlearning {core['timings'].get('unlearn', 0.0):.2f}s "
        f"vs {full['timings'].get('unlearn', 0.0):.2f}s on the full forget set"
        + ("" if not growth else f"; the adaptive coreset stayed at {growth[0]} of {len(bench.forget_ids)}." if len(growth) == 1
           else f"; the adaptive coreset grew {' -> '.join(map(str, growth))} of {len(bench.forget_ids)}.")
    )
    print(
        f"coreset end-to-end {core['timings']['total']:.2f}s = {ratio:.2f}x the full forget set "
        f"({full['timings']['total']:.2f}s) and {core['timings']['total'] / max(bench.seconds['retrain'], 1e-9):.3f}x retraining "
        f"({bench.seconds['retrain']:.2f}s, measured when the gold model was trained)."
    )
    for row in rows[2:]:
        v = row["verification"]
        print(f"{row['label']}: verified={v.get('passed')} ({v.get('target')} target: {v.get('why')}); {v.get('stopped')}")
    out.mkdir(parents=True, exist_ok=True)
    save_json(rows, out / "results.json", {"benchmark": bench.name, "scenario": bench.scenario, "seed": seed, "config": cfg.to_dict(),
                                           "cluster_startup_s": startup})
    plot_rows(rows, keys, out / "demo.png", f"{bench.name}/{bench.scenario} (seed {seed})")
    print(f"wrote {out / 'results.json'} and {out / 'demo.png'}")
    return rows


def _warm_pool(task: Any) -> tuple[Any, float]:
    """Start Ray and the scoring actors now, timed: (the started pool, seconds)."""
    import time

    from erasus_ray.distributed import PoolSpec, ScoringPool

    start = time.perf_counter()
    pool = ScoringPool(PoolSpec.load()).start(task)
    return pool, time.perf_counter() - start


def run_config(path: Path, out: str | None = None, progress: bool = True, coreset_from: str | None = None,
               coreset_k: int | None = None) -> dict[str, Any]:
    """Run one job from a YAML config; write results.json (metrics, coreset ids, timings) and the model weights.

    A config with ``model:`` / ``data:`` runs on the user's own model and data (:mod:`erasus_ray.jobs`); one with
    ``benchmark:`` on a bundled benchmark. ``coreset_from`` / ``coreset_k`` (``--coreset-from`` / ``--coreset-k``,
    the seed's flags) override the config's ``selector`` and ``k``."""
    from erasus_ray.config_files import config_from_mapping, load_yaml_mapping
    from erasus_ray.errors import InvalidConfigError
    from erasus_ray.jobs import is_own_data_job, run_user_job
    from erasus_ray.jobs.config import from_mapping

    data = load_yaml_mapping(path, "config")
    overrides = {k: v for k, v in (("selector", coreset_from), ("k", coreset_k)) if v is not None}
    if is_own_data_job(data):
        doc = run_user_job(from_mapping({**data, **overrides}, path), out=out, progress=progress)
        print(f"wrote {doc['output']}/results.json and {doc['output']}/{doc['model_file']}")
        return doc
    try:
        cfg = config_from_mapping(JobConfig, {**data, **overrides}, "config")  # as JobConfig.from_yaml reads it
    except InvalidConfigError as err:
        raise InvalidConfigError(f"config {path}: {err}") from None
    row = run_job(cfg, progress=progress)
    folder = Path(out or cfg.output or f"results/{cfg.benchmark}")
    row["result"].save(folder)  # model first, results last, both atomic
    print_table([row], [k for k in row["metrics"] if not k.startswith(("gold_", "gap_")) and k not in ("avg_gap", "seed")][:6], str(path))
    print(f"wrote {folder / 'results.json'} and {folder / 'model.pt'}")
    return row
