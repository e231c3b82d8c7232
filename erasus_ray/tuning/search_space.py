"""The conditional search space of a sweep, built from the registries, and the job a sampled point stands for.

Optuna's define-by-run API draws ``strategy`` and ``selector`` first, then the parameters that belong to that
strategy: ``<strategy>.lr`` and ``<strategy>.epochs`` (for strategies the runner drives with an optimizer) and
``<strategy>.<hyperparameter>`` for the ranges in ``strategy_params``. Scoping names by strategy keeps TPE's
per-parameter models apart (an NPO learning rate says nothing about gradient ascent's). ``fraction`` is shared.
A registered algorithm enters every sweep whose ``strategies``/``selectors`` is ``all``; nothing here lists names.

Example::

    space = SearchSpace(SweepConfig.from_yaml("tune_configs/ci_digits.yaml"))
    OptunaSearch(space=space, metric=["avg_gap", "seconds"], mode=["min", "min"], seed=0)
    job = job_config(sweep_cfg, {"strategy": "npo", "selector": "el2n", "fraction": 0.1, "npo.lr": 1e-3, ...})
"""

from __future__ import annotations

from typing import Any

from erasus_ray.experiment import JobConfig
from erasus_ray.tuning.config import Range, SweepConfig


def uses_optimizer(strategy: str) -> bool:
    """True when the runner drives the strategy's loss with an optimizer, so ``lr``/``epochs`` mean something
    (not for Fisher noise, SSD dampening or retraining with the benchmark's own recipe)."""
    from erasus_ray.strategies import STRATEGIES, Strategy

    cls = STRATEGIES.get(strategy)
    return cls.loss is not Strategy.loss and strategy != "retrain"


def _suggest(trial: Any, name: str, rng: Range) -> Any:
    if rng.choices is not None:
        return trial.suggest_categorical(name, list(rng.choices))
    if rng.fixed:
        return rng.low
    if rng.integer:
        return trial.suggest_int(name, int(rng.low), int(rng.high), log=rng.log)
    return trial.suggest_float(name, float(rng.low), float(rng.high), log=rng.log)


class SearchSpace:
    """Define-by-run space for ``OptunaSearch(space=...)``; a picklable callable (Tune saves the searcher)."""

    def __init__(self, cfg: SweepConfig) -> None:
        self.cfg = cfg
        self.strategies = cfg.strategy_names()
        self.selectors = cfg.selector_names()

    def __call__(self, trial: Any) -> dict[str, Any]:
        cfg = self.cfg
        strategy = trial.suggest_categorical("strategy", self.strategies)
        selector = trial.suggest_categorical("selector", self.selectors)
        if cfg.closed_loop:  # the controller finds the step size and grows the coreset: nothing of that is searched
            return {"seed": cfg.seed, "fraction": "auto", **self._strategy_params(trial, strategy)}
        fraction = _suggest(trial, "fraction", cfg.fraction_range())
        constants: dict[str, Any] = {"seed": cfg.seed}
        if fraction is not None and cfg.fraction_range().fixed:
            constants["fraction"] = fraction
        if uses_optimizer(strategy):
            for key, rng in (("lr", cfg.lr_range(strategy)), ("epochs", cfg.epochs_range(strategy))):
                value = _suggest(trial, f"{strategy}.{key}", rng)
                if rng.fixed:
                    constants[f"{strategy}.{key}"] = value
        return {**constants, **self._strategy_params(trial, strategy)}

    def _strategy_params(self, trial: Any, strategy: str) -> dict[str, Any]:
        """The strategy's own hyperparameters: suggested, and returned where fixed (Tune keeps what is returned)."""
        constants = {}
        for param, rng in self.cfg.strategy_param_ranges(strategy).items():
            if isinstance(rng, Range):
                value = _suggest(trial, f"{strategy}.{param}", rng)
                if rng.fixed:
                    constants[f"{strategy}.{param}"] = value
            else:
                constants[f"{strategy}.{param}"] = rng
        return constants


def sampled_job(cfg: SweepConfig, params: dict[str, Any], seed: int | None = None) -> dict[str, Any]:
    """What a sampled point stands for - ``strategy``, ``strategy_params``, ``selector``, ``selector_params``,
    ``fraction``, ``runner`` (the sweep's fixed settings with the sampled lr / epochs) and ``seed`` (``seed``
    overrides the sweep's, for re-runs) - whatever the sweep runs it on (a benchmark, or the user's own job).

    ``params`` are a trial's config as Tune stores it (``strategy``, ``selector``, ``fraction``,
    ``<strategy>.<name>``); keys of other strategies are ignored.
    """
    strategy = params["strategy"]
    scoped = {k.split(".", 1)[1]: v for k, v in params.items() if isinstance(k, str) and k.startswith(f"{strategy}.")}
    runner = dict(cfg.runner)
    for key in ("lr", "epochs"):
        if key in scoped:
            value = scoped.pop(key)
            runner[key] = int(value) if key == "epochs" else float(value)
    selector = params["selector"]
    return {"strategy": strategy, "strategy_params": scoped, "selector": selector,
            "selector_params": dict(cfg.selector_params.get(selector, {})),
            "fraction": params["fraction"] if params["fraction"] == "auto" else float(params["fraction"]),
            "runner": runner, "seed": int(cfg.seed if seed is None else seed)}


def job_config(cfg: SweepConfig, params: dict[str, Any], seed: int | None = None) -> JobConfig:
    """The benchmark :class:`JobConfig` a sampled point stands for (see :func:`sampled_job`)."""
    return JobConfig.from_dict({
        "benchmark": cfg.benchmark,
        "scenario": cfg.scenario,
        "benchmark_options": dict(cfg.benchmark_options),
        **sampled_job(cfg, params, seed),
        # the sweep's target, so that run_job gives fit the gold model where the target is measured against it
        # ("auto": the benchmark's default target)
        "target": None if cfg.target == "auto" else cfg.target,
    })


def trial_params(row: dict[str, Any]) -> dict[str, Any]:
    """A trial's searched parameters from a leaderboard / dataframe row (keys ``config/...`` or plain)."""
    out = {}
    for k, v in row.items():
        if not isinstance(k, str):
            continue
        key = k[len("config/"):] if k.startswith("config/") else k
        if key in ("strategy", "selector", "fraction", "seed") or "." in key:
            if v is None or (isinstance(v, float) and v != v):  # NaN: a parameter of another strategy
                continue
            out[key] = v
    return out
