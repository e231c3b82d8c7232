"""``run_sweep``: a Ray Tune sweep of strategy x selector x fraction x lr x epochs, evaluated against retraining.

How it runs:

1. the config is validated (:class:`SweepConfig`) before anything starts;
2. the driver builds the benchmark once - data, original and gold models, trained or loaded from the cache in
   ``$ERASUS_RAY_CACHE`` - and evaluates the gold model;
3. Ray is joined (``RAY_ADDRESS``, e.g. inside ``ray job submit``, or an initialised Ray) or started in process; a
   ``Tuner`` runs :func:`run_trial` with ``OptunaSearch`` (TPE, seeded; multi-objective ``[avg_gap, seconds]`` or
   one metric) behind a ``ConcurrencyLimiter``, optional ASHA, per-trial resources from the config (which the
   trial uses: torch threads = its CPUs, CUDA when it holds a GPU; :func:`trial_placement`), MLflow/W&B
   logger callbacks when requested and installed;
4. what a trial needs from the driver travels with the trainable (``tune.with_parameters``, i.e. the object
   store), not through a driver-local path: the gold model's metrics and the bytes of the cached original and gold
   model files. A trial uses the driver's cache folder when that folder holds those files (same machine or a
   shared file system), else writes the shipped files into a node-local cache (:func:`trial_cache_dir`), so a
   worker on another node never retrains the models;
5. each trial is one :func:`erasus_ray.experiment.run_job` - the code path of ``ErasusUnlearner`` and the demo -
   evaluated against the gold metrics (a ``job:`` sweep over the user's own data: one run of the job, evaluated
   against the held-out reference of :mod:`erasus_ray.tuning.own_data`), and reports ``avg_gap`` (mean |metric - gold metric|) and ``seconds``
   (selection + unlearning; evaluation untimed);
6. ``sweep.json`` (the config, the original and gold rows) is written next to Tune's files, then the leaderboard
   is built from the ``ResultGrid``.

An interrupted (even killed) sweep resumes with ``run_sweep(cfg, resume=<sweep dir>)`` (``Tuner.restore``:
finished trials are kept, unfinished and errored ones re-run). Tune's experiment state is saved every
``TUNE_GLOBAL_CHECKPOINT_S`` seconds (set to 1 here unless given; Tune's own default is 10), so a kill loses at
most about a second of finished trials. Cost per trial: one benchmark load from cache plus one job (~1 s on
digits); Tune's own overhead is ~20 s per sweep on a 2-core machine.

Example::

    cfg = SweepConfig.from_yaml("tune_configs/ci_digits.yaml")
    sweep_dir = run_sweep(cfg)          # results/sweeps/<name>-<time>/
    build_leaderboard(sweep_dir)        # leaderboard.csv, leaderboard.md, pareto.png
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from erasus_ray.errors import InvalidConfigError
from erasus_ray.tuning.config import SweepConfig
from erasus_ray.tuning.leaderboard import _fraction, build_leaderboard
from erasus_ray.tuning.search_space import SearchSpace, job_config
from erasus_ray.tuning.trials import META_FILE, flat_result, load_cached_benchmark  # re-exported: imported from here before
from erasus_ray.utils.atomic import atomic_write_bytes, atomic_write_text

#: Seconds between Tune's experiment-state snapshots (what a killed sweep resumes from); Tune's default is 10.
CHECKPOINT_PERIOD_S = "1"
#: Set in every trial (trials get no ``runtime_env`` from us: inside ``ray job submit`` it would clash with the job's).
TRIAL_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

def benchmark_cache_files(bench: Any, cache_dir: str | os.PathLike) -> dict[str, bytes]:
    """The cached original and gold model files of ``bench`` (name -> bytes), to ship to trials.

    Named as :func:`erasus_ray.benchmarks.base.build_benchmark` names them: ``<name>-<sha1(config)[:16]>-{original,
    gold}.{pt,json}``. Empty (with a warning) when they are not there, e.g. a benchmark built without the cache.
    """
    key = hashlib.sha1(json.dumps(bench.config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    names = [f"{bench.name}-{key}-{which}{ext}" for which in ("original", "gold") for ext in (".pt", ".json")]
    paths = [Path(cache_dir) / n for n in names]
    if not all(p.exists() for p in paths):
        warnings.warn(f"the cached model files {names} are not in {cache_dir}; trials on other nodes will train them",
                      RuntimeWarning, stacklevel=2)
        return {}
    return {p.name: p.read_bytes() for p in paths}


def trial_cache_dir(driver_cache_dir: str, cache_files: dict[str, bytes] | None) -> str:
    """Where a trial loads the benchmark's models from: the driver's cache folder if it holds the shipped files
    (same node, or a shared file system), else a node-local folder the shipped files are written into (atomically:
    trials on one node may do this at the same time)."""
    files = cache_files or {}
    driver = Path(driver_cache_dir)
    if all((driver / n).is_file() and (driver / n).stat().st_size == len(b) for n, b in files.items()):
        return str(driver)
    digest = hashlib.sha1(str(driver).encode()).hexdigest()[:12]
    local = Path(os.environ.get("ERASUS_RAY_TRIAL_CACHE") or Path(tempfile.gettempdir()) / f"erasus-ray-trial-cache-{digest}")
    local.mkdir(parents=True, exist_ok=True)
    for n, b in files.items():
        target = local / n
        if not (target.is_file() and target.stat().st_size == len(b)):
            atomic_write_bytes(target, b)
    return str(local)


def _epoch_reporting_unlearner(bench: Any, gold_metrics: dict[str, float], seed: int, report: Any,
                               extra: dict[str, Any]) -> tuple[type, dict]:
    """An ``ErasusUnlearner`` whose runner evaluates the model after every epoch and reports it (for ASHA).

    The epoch evaluations are not unlearning cost: their seconds are collected in the returned dict and taken out
    of the reported ``seconds`` and of the final result. Strategies that do not use the runner's epoch loop
    (Fisher noise, SSD, ...) report only once, at the end.
    """
    from erasus_ray.evaluation import evaluate
    from erasus_ray.runners import LocalRunner
    from erasus_ray.unlearner import ErasusUnlearner

    state = {"eval_s": 0.0, "t0": None}

    class EpochReportingRunner(LocalRunner):
        def run(self, strategy: Any, ctx: Any, **kwargs: Any) -> Any:  # LocalRunner.run with an epoch hook
            return super().run(strategy, ctx, on_epoch_end=lambda epoch, rep: on_epoch(ctx.model, epoch, rep))

    def on_epoch(model: Any, epoch: int, rep: Any) -> None:
        start = time.perf_counter()
        was_training = model.training
        m = evaluate(model, forget=bench.forget, retain=bench.retain, test=bench.test, task=bench.task,
                     gold_metrics=gold_metrics, seed=seed)
        model.train(was_training)
        state["eval_s"] += time.perf_counter() - start
        elapsed = time.perf_counter() - state["t0"] - state["eval_s"]
        report({"avg_gap": float(m["avg_gap"]), "seconds": elapsed, "epoch": epoch, "steps": rep.steps, "seed": seed,
                "stopped": f"running (epoch {epoch})", **extra})

    class EpochReportingUnlearner(ErasusUnlearner):
        def fit(self, *args: Any, **kwargs: Any) -> Any:
            state["t0"] = time.perf_counter()
            return super().fit(*args, **kwargs)

        def make_runner(self, config: Any) -> Any:
            return EpochReportingRunner(config) if self.backend == "local" else super().make_runner(config)

    return EpochReportingUnlearner, state


def _closed_loop_unlearner(cfg: SweepConfig, bench: Any) -> type:
    """An ``ErasusUnlearner`` that runs the trial under the controller: the sweep's ``target`` and budget, the
    benchmark's test set as the held-out set (the ``heldout`` target's reference and the utility guard's)."""
    from erasus_ray.unlearner import ErasusUnlearner

    budget = {k: getattr(cfg, k) for k in ("budget_steps", "budget_seconds") if getattr(cfg, k) is not None}

    class ClosedLoopUnlearner(ErasusUnlearner):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "target": cfg.target, **budget})

        def fit(self, *args: Any, **kwargs: Any) -> Any:
            return super().fit(*args, **{"heldout_data": bench.test, **kwargs})

    return ClosedLoopUnlearner


def evaluate_trial(config: dict[str, Any], sweep: dict[str, Any], gold_metrics: dict[str, float],
                   report_epochs: Any = None, device: str | None = None) -> dict[str, Any]:
    """The sampled job on the cached benchmark, evaluated against the gold model: what a trial reports.

    ``report_epochs``: a callable that receives an intermediate result after every epoch (ASHA's rungs).
    ``device``: where the unlearned copy of the model runs (``ErasusUnlearner(device=...)``; evaluation follows the
    model); None keeps the benchmark model's device (CPU).
    """
    from erasus_ray.experiment import run_job
    from erasus_ray.unlearner import ErasusUnlearner

    cfg = SweepConfig.from_dict(sweep)
    if cfg.own_data:  # the user's job: measured against the held-out reference, not a gold model (no epoch reports)
        from erasus_ray.tuning.own_data import evaluate_own_trial

        return evaluate_own_trial(config, cfg, gold_metrics, device=device)
    job = job_config(cfg, config)
    bench = load_cached_benchmark(job)
    cls, state = ErasusUnlearner, {"eval_s": 0.0}
    if cfg.closed_loop:
        cls = _closed_loop_unlearner(cfg, bench)
    elif report_epochs is not None:
        extra = {k: job.runner[k] for k in ("lr", "epochs") if k in job.runner}
        cls, state = _epoch_reporting_unlearner(bench, gold_metrics, job.seed, report_epochs, extra)
    if device is not None:
        base = cls

        class OnDevice(base):  # type: ignore[misc, valid-type]  # run_job builds the unlearner; this adds the device
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **{**kwargs, "device": device})

        cls = OnDevice
    result = flat_result(run_job(job, bench=bench, gold_metrics=gold_metrics, progress=False, unlearner_cls=cls))
    if state["eval_s"]:
        result["seconds"] -= state["eval_s"]
        result["unlearn_s"] -= state["eval_s"]
        result["epoch_eval_s"] = state["eval_s"]
    return result


def trial_placement(assigned: dict[str, float] | None, reserved: dict[str, float], cuda_available: bool) -> dict[str, Any]:
    """Torch threads and device of a trial from the resources Ray assigned it (``assigned``, from
    ``ray.get_runtime_context().get_assigned_resources()``; None outside a Ray worker: then the config's
    ``resources``, ``reserved``, stand in).

    ``threads`` = the reserved CPUs, floored, at least 1 (``cpu: 0.5`` -> 1 thread). ``device`` = ``"cuda"`` when
    the trial holds a GPU (Ray has set ``CUDA_VISIBLE_DEVICES`` to it) and torch sees CUDA, else ``"cpu"``, with a
    ``device_note`` saying why a reserved GPU went unused.
    """
    import torch

    res = {"CPU": float(reserved.get("cpu", 1)), "GPU": float(reserved.get("gpu", 0))} if assigned is None else assigned
    cpus, gpus = float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))
    out: dict[str, Any] = {"threads": max(1, int(math.floor(cpus))), "device": "cpu", "cpus": cpus, "gpus": gpus}
    if gpus > 0:
        if cuda_available:
            out["device"] = "cuda"
        else:
            out["device_note"] = (f"reserved {gpus:g} GPU(s) but torch.cuda.is_available() is False in the trial "
                                  f"(torch {torch.__version__}); ran on cpu")
    return out


def _assigned_resources() -> dict[str, float] | None:
    """What Ray reserved for this worker (``{"CPU": 2.0, "GPU": 1.0}``), or None outside a Ray worker."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return {k: float(v) for k, v in ray.get_runtime_context().get_assigned_resources().items()}
    except (AssertionError, ImportError, RuntimeError):  # AssertionError: not a worker process
        return None


def run_trial(config: dict[str, Any], *, sweep: dict[str, Any], gold_metrics: dict[str, float], cache_dir: str,
              cache_files: dict[str, bytes] | None = None) -> None:
    """One Tune trial: :func:`evaluate_trial`, reported once with ``tune.report`` (and per epoch under ASHA).

    The trial uses what it reserved (:func:`trial_placement`): torch threads = its CPUs, the model on CUDA when it
    holds a GPU; the result records ``threads`` and ``device`` (and ``device_note`` when a GPU went unused).
    ``gold_metrics`` and ``cache_files`` (the cached model files' bytes) come through the object store; see
    :func:`trial_cache_dir` for where the models are loaded from.
    """
    for k, v in TRIAL_ENV.items():
        os.environ.setdefault(k, v)
    os.environ["ERASUS_RAY_CACHE"] = trial_cache_dir(cache_dir, cache_files)
    import torch
    from ray import tune

    place = trial_placement(_assigned_resources(), sweep.get("resources") or {}, torch.cuda.is_available())
    torch.set_num_threads(place["threads"])
    from erasus_ray.utils.malloc import hold_freed_memory_from_env

    hold_freed_memory_from_env()
    if "device_note" in place:
        warnings.warn(place["device_note"], RuntimeWarning, stacklevel=1)
    info = {k: place[k] for k in ("threads", "device", "device_note") if k in place}
    per_epoch = (lambda r: tune.report({**r, **info})) if sweep.get("scheduler") else None  # ASHA: a result per epoch
    result = evaluate_trial(config, sweep, gold_metrics, report_epochs=per_epoch, device=place["device"] if place["gpus"] > 0 else None)
    tune.report({**result, **info})


def reference_info(cfg: SweepConfig) -> tuple[Any, dict[str, float], list[dict[str, Any]]]:
    """Build (or load) the benchmark in the driver, evaluate the gold model, and the original + gold rows."""
    from erasus_ray.experiment import JobConfig, reference_rows, warm_up

    warm_up()
    job = JobConfig.from_dict({"benchmark": cfg.benchmark, "scenario": cfg.scenario, "seed": cfg.seed,
                               "benchmark_options": dict(cfg.benchmark_options), "selector": None, "fraction": 1.0})
    bench = load_cached_benchmark(job)
    from erasus_ray.evaluation import evaluate

    gold = evaluate(bench.gold, forget=bench.forget, retain=bench.retain, test=bench.test, task=bench.task, seed=cfg.seed)
    refs = []
    for r in reference_rows(bench, gold, cfg.seed):
        refs.append({"label": r["label"], "avg_gap": float(r["metrics"]["avg_gap"]), "seconds": float(r["timings"]["total"]),
                     "metrics": {k: float(v) for k, v in r["metrics"].items() if isinstance(v, (int, float))}})
    return bench, gold, refs


def _callbacks(cfg: SweepConfig, name: str) -> list[Any]:
    """Ray Tune's MLflow / W&B logger callbacks with the config's settings (``callbacks: {mlflow: {...}}``), only
    when the package is installed (otherwise a warning). Defaults: MLflow ``experiment_name`` and W&B ``project``
    = the sweep's folder name."""
    out = []
    for cb, settings in cfg.callback_settings().items():
        try:
            if cb == "mlflow":
                import mlflow  # noqa: F401
                from ray.air.integrations.mlflow import MLflowLoggerCallback

                out.append(MLflowLoggerCallback(**{"experiment_name": name, **settings}))
            elif cb == "wandb":
                import wandb  # noqa: F401
                from ray.air.integrations.wandb import WandbLoggerCallback

                out.append(WandbLoggerCallback(**{"project": name, **settings}))
        except ImportError:
            warnings.warn(f"callbacks: {cb} is not installed; the sweep runs without it", RuntimeWarning, stacklevel=2)
    return out


def _progress_callback() -> Any:
    """One line per finished trial instead of Tune's tables."""
    from ray.tune import Callback

    class TrialLines(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            r, c = trial.last_result or {}, trial.config
            s = c.get("strategy")
            lr = f"{r['lr']:.3g}" if isinstance(r.get("lr"), (int, float)) else "-"
            early = f" (stopped early at epoch {r['epoch']})" if str(r.get("stopped", "")).startswith("running") else ""
            # a closed-loop trial's step size is the controller's, not a searched lr x epochs: show its steps
            budget = (f"closed loop, {r.get('steps')} steps" if r.get("mode") == "closed_loop"
                      else f"lr={lr} epochs={r.get('epochs')}")
            print(f"  trial {trial.trial_id}: {s} {c.get('selector')}@{_fraction(c.get('fraction'))} "
                  f"{budget} -> Avg.Gap {100 * r.get('avg_gap', float('nan')):.2f} pts, "
                  f"{r.get('seconds', float('nan')):.2f}s, verified {r.get('verified')}{early}", flush=True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            print(f"  trial {trial.trial_id}: {trial.config.get('strategy')} {trial.config.get('selector')} ERRORED "
                  f"(see {trial.path}/error.txt)", flush=True)

    return TrialLines()


def _init_ray(cfg: SweepConfig) -> bool:
    """Join an initialised Ray or ``RAY_ADDRESS`` (set by ``ray job submit``), else start the embedded local Ray.
    Returns True if this call started Ray (the caller shuts it down). No ``runtime_env``: inside a submitted job it
    would be merged with the job's (working dir, env vars) and clash; trials set their environment themselves."""
    import ray

    if ray.is_initialized():
        print(f"[erasus-ray] Ray: using the initialised Ray at {ray.get_runtime_context().gcs_address}", flush=True)
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ctx = ray.init(address=address, log_to_driver=False)
        print(f"[erasus-ray] Ray: joined the cluster at {ctx.address_info['gcs_address']} (RAY_ADDRESS={address})", flush=True)
    else:
        ctx = ray.init(address="local", include_dashboard=False, log_to_driver=False)  # never a stray cluster
        print(f"[erasus-ray] Ray: started an embedded local Ray at {ctx.address_info['gcs_address']}", flush=True)
    return True


def build_searcher(cfg: SweepConfig) -> Any:
    """``OptunaSearch`` (TPE seeded by ``cfg.seed``) over :class:`SearchSpace`, behind a ``ConcurrencyLimiter``."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    if cfg.objective == "multi":
        metric: Any = ["avg_gap", "seconds"]
        mode: Any = ["min", "min"]
    else:
        metric, mode = cfg.metric, "min"
    searcher = OptunaSearch(space=SearchSpace(cfg), metric=metric, mode=mode, seed=cfg.seed)
    return ConcurrencyLimiter(searcher, max_concurrent=cfg.max_concurrent)


def build_tuner(cfg: SweepConfig, trainable: Any, name: str, storage_path: str) -> Any:
    from ray import tune

    search_alg = build_searcher(cfg)
    scheduler = None
    if cfg.scheduler is not None:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(metric=cfg.metric, mode="min", time_attr="training_iteration",
                                  grace_period=cfg.scheduler.get("grace_period", 1),
                                  reduction_factor=cfg.scheduler.get("reduction_factor", 2))
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=cfg.num_samples,
                                    time_budget_s=cfg.time_budget_s, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, callbacks=[_progress_callback(), *_callbacks(cfg, name)],
                                  verbose=0),
    )


def sweep_directory(cfg: SweepConfig, *, resume: str | os.PathLike | None = None, name: str | None = None,
                    storage_path: str | os.PathLike | None = None) -> Path:
    """The absolute folder a sweep writes to: ``resume`` (which must be a restorable Tune sweep), else
    ``<storage_path or cfg.storage_path>/<name or cfg.name-YYYYmmdd-HHMMSS>``; a relative storage path is taken
    from the current directory (``results/sweeps`` by default) and ``~`` is expanded. A fresh sweep's folder
    must not exist yet (Tune would silently resume into it)."""
    if resume is not None:
        from ray import tune

        sweep_dir = Path(resume).expanduser().resolve()
        if not (sweep_dir / "tuner.pkl").exists() and not tune.Tuner.can_restore(str(sweep_dir)):
            raise InvalidConfigError(f"resume: {sweep_dir} is not a Tune sweep directory that can be restored")
        return sweep_dir
    root = Path(storage_path or cfg.storage_path).expanduser().resolve()
    sweep_dir = root / (name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if sweep_dir.exists():
        raise InvalidConfigError(f"name: {sweep_dir} already exists; pass resume={str(sweep_dir)!r} to continue it")
    return sweep_dir


def run_sweep(cfg: SweepConfig, *, resume: str | os.PathLike | None = None, name: str | None = None,
              storage_path: str | None = None, leaderboard: bool = True, rerun: bool = True) -> Path:
    """Run (or resume) the sweep; returns its directory (``<storage_path>/<name>``) with the leaderboard in it.

    ``name`` defaults to ``<cfg.name>-<YYYYmmdd-HHMMSS>``: Tune resumes silently when a name is reused, so a fresh
    sweep always gets a fresh directory, and ``resume`` names the one to continue.
    """
    from ray import tune

    cache_dir = str(Path(os.environ.setdefault("ERASUS_RAY_CACHE", str(Path.home() / ".cache" / "erasus-ray"))).resolve())
    os.environ["ERASUS_RAY_CACHE"] = cache_dir
    sweep_dir = sweep_directory(cfg, resume=resume, name=name, storage_path=storage_path)
    if cfg.own_data:
        from erasus_ray.tuning.own_data import own_reference_info

        print(f"[erasus-ray] sweep {cfg.name}: your job {cfg.job}; measuring the original model against the held-out "
              "reference in the driver (trials read the job's files from its paths)")
        gold, refs = own_reference_info(cfg.job, cfg.seed)
        cache_files: dict[str, bytes] = {}
    else:
        print(f"[erasus-ray] sweep {cfg.name}: {cfg.benchmark}/{cfg.scenario or 'default'}; building the benchmark and the "
              "gold model in the driver (cached after the first run)")
        bench, gold, refs = reference_info(cfg)
        cache_files = benchmark_cache_files(bench, cache_dir)
    meta: dict[str, Any] = {"config": cfg.to_dict(), "references": refs, "gold_metrics": gold, "cache_dir": cache_dir}
    if resume is None:  # written first, so an interrupted sweep still has its reference rows
        sweep_dir.mkdir(parents=True)
        atomic_write_text(sweep_dir / META_FILE, json.dumps(meta, indent=2, default=str))
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", CHECKPOINT_PERIOD_S)  # read when the Tuner's controller starts
    started = _init_ray(cfg)
    try:
        # with_parameters puts these in the object store: trials on any node get them without a driver-local path
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, sweep=cfg.to_dict(), gold_metrics=gold, cache_dir=cache_dir, cache_files=cache_files),
            {k: float(v) for k, v in cfg.resources.items()},
        )
        t0 = time.perf_counter()
        if resume is not None:
            tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_errored=True)
        else:
            tuner = build_tuner(cfg, trainable, sweep_dir.name, str(sweep_dir.parent))
        grid = tuner.fit()
        wall = time.perf_counter() - t0
        sweep_dir = Path(grid.experiment_path)
        if resume is not None and (sweep_dir / META_FILE).exists():
            meta["earlier_wall_s"] = json.loads((sweep_dir / META_FILE).read_text()).get("wall_s")
        meta.update({"wall_s": wall, "n_trials": len(grid), "n_errors": grid.num_errors})
        atomic_write_text(sweep_dir / META_FILE, json.dumps(meta, indent=2, default=str))
        print(f"[erasus-ray] {len(grid)} trials ({grid.num_errors} errored) in {wall:.1f}s -> {sweep_dir}")
    finally:
        if started:
            import ray

            ray.shutdown()
    if leaderboard:
        build_leaderboard(grid, rerun=rerun)
    return sweep_dir


__all__ = ["META_FILE", "benchmark_cache_files", "build_searcher", "build_tuner", "evaluate_trial", "flat_result", "reference_info",
           "run_sweep", "run_trial", "sweep_directory", "trial_cache_dir", "trial_placement"]
