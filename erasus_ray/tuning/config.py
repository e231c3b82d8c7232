"""``SweepConfig``: what a Ray Tune sweep searches, how, and where it writes - validated before Ray starts.

A sweep YAML (see ``tune_configs/``) names a benchmark - or, with ``job: my_job.yaml``, a job config on the user's own
model and data (:mod:`erasus_ray.tuning.own_data`: no gold model; trials are measured against held-out rows) -, which strategies and selectors may enter the search space
(allow and deny lists over the registries, so a newly registered algorithm joins a sweep that says ``all``), the
ranges of fraction, learning rate and epochs, per-strategy hyperparameter ranges, the objective (``multi``:
Avg.Gap to retrain and seconds, both minimised; ``single``: one of them), the Tune settings (trials, concurrency,
optional ASHA, per-trial resources, storage path) and the leaderboard's re-runs (top-k x seeds).

Every error names the offending key, e.g. ``fraction.high: must be in (0, 1], got 1.5``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erasus_ray.config_files import config_from_mapping, field_names, load_yaml_mapping
from erasus_ray.errors import InvalidConfigError, UnknownNameError
from erasus_ray.experiment import JOB_OWNED_RUNNER_KEYS
from erasus_ray.settings import section_settings
from erasus_ray.tasks import CapabilityError, Task, missing, require
from erasus_ray.tuning.own_job import load_own_job, loaded_job

#: Left out of ``strategies: all`` unless listed explicitly: ``retrain`` is the gold reference every leaderboard
#: already shows (it would win on Avg.Gap by construction).
DEFAULT_DENY_STRATEGIES: tuple[str, ...] = ("retrain",)
OBJECTIVES = ("multi", "single")
LOOPS = ("closed", "open")
METRICS = ("avg_gap", "seconds")
CALLBACKS = ("mlflow", "wandb")
#: Settings each logger callback accepts (keyword arguments of Ray's ``MLflowLoggerCallback`` /
#: ``WandbLoggerCallback``; W&B passes any other key on to ``wandb.init``, e.g. ``mode: offline``).
CALLBACK_KEYS: dict[str, tuple[str, ...] | None] = {
    "mlflow": ("tracking_uri", "registry_uri", "experiment_name", "tags", "tracking_token", "save_artifact",
               "log_params_on_trial_end"),
    "wandb": None,
}
#: Runner settings the sweep searches itself; the rest (batch sizes, clipping, ...) are fixed in ``runner``.
SEARCHED_RUNNER_KEYS = ("lr", "epochs")


def _num(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidConfigError(f"{key}: must be a number, got {value!r}")
    return float(value)


@dataclass
class Range:
    """A searched number: ``{low, high, log}`` (``low == high`` fixes it) or explicit ``choices``."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[float] | None = None
    integer: bool = False

    @classmethod
    def parse(cls, value: Any, key: str, *, integer: bool = False, low_bound: float = 0.0, high_bound: float = math.inf,
              low_open: bool = True) -> "Range":
        """``value``: a number (fixed), a list (choices) or a mapping ``{low, high, log}`` / ``{choices}``."""

        def check(v: Any, k: str) -> float:
            x = _num(v, k)
            if integer and x != int(x):
                raise InvalidConfigError(f"{k}: must be an integer, got {v!r}")
            ok_low = x > low_bound if low_open else x >= low_bound
            if not ok_low or x > high_bound:
                bracket = "(" if low_open else "["
                raise InvalidConfigError(f"{k}: must be in {bracket}{low_bound:g}, {high_bound:g}], got {v!r}")
            return int(x) if integer else x

        if isinstance(value, (int, float)) and not isinstance(value, bool):
            x = check(value, key)
            return cls(low=x, high=x, integer=integer)
        if isinstance(value, list):
            value = {"choices": value}
        if not isinstance(value, dict):
            raise InvalidConfigError(f"{key}: must be a number, a list of choices or a mapping {{low, high, log}}, got {value!r}")
        unknown = sorted(set(value) - {"low", "high", "log", "choices"})
        if unknown:
            raise InvalidConfigError(f"{key}: unknown key(s) {unknown}; known: ['choices', 'high', 'log', 'low']")
        if "choices" in value:
            if set(value) - {"choices"}:
                raise InvalidConfigError(f"{key}: give either choices or low/high, not both")
            choices = value["choices"]
            if not isinstance(choices, list) or not choices:
                raise InvalidConfigError(f"{key}.choices: must be a non-empty list, got {choices!r}")
            return cls(choices=[check(v, f"{key}.choices[{i}]") for i, v in enumerate(choices)], integer=integer)
        if "low" not in value or "high" not in value:
            raise InvalidConfigError(f"{key}: a range needs both low and high, got {value!r}")
        low, high = check(value["low"], f"{key}.low"), check(value["high"], f"{key}.high")
        if low > high:
            raise InvalidConfigError(f"{key}: low ({low}) is above high ({high})")
        log = value.get("log", False)
        if not isinstance(log, bool):
            raise InvalidConfigError(f"{key}.log: must be true or false, got {log!r}")
        return cls(low=low, high=high, log=log, integer=integer)

    @property
    def fixed(self) -> bool:
        return self.choices is None and self.low == self.high

    def to_dict(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log}


@dataclass
class SweepConfig:
    """A sweep: benchmark, search space, objective, Tune settings and leaderboard re-runs (see the module doc)."""

    name: str = "sweep"
    #: a job config on the user's own model and data (``model:`` / ``data:``, see :mod:`erasus_ray.jobs`) to sweep
    #: instead of ``benchmark``; relative to the sweep YAML's folder. See :mod:`erasus_ray.tuning.own_data`.
    job: str | None = None
    benchmark: str = "digits"
    scenario: str | None = None
    seed: int = 0
    benchmark_options: dict[str, Any] = field(default_factory=dict)
    # --- search space
    strategies: list[str] | str = "all"
    exclude_strategies: list[str] = field(default_factory=lambda: list(DEFAULT_DENY_STRATEGIES))
    selectors: list[str] | str = "all"
    exclude_selectors: list[str] = field(default_factory=list)
    fraction: Any = field(default_factory=lambda: {"low": 0.02, "high": 1.0, "log": True})
    #: absolute range, or None: per strategy ``[default_lr / 10, default_lr * 10]`` (log)
    lr: Any = None
    #: absolute range, or None: per strategy ``[max(1, default_epochs // 4), 2 * default_epochs]``
    epochs: Any = None
    #: per strategy: hyperparameter -> value (fixed) or range, e.g. ``{npo: {beta: {low: 0.05, high: 0.5}}}``
    strategy_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: per selector: constructor arguments (fixed)
    selector_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: fixed runner settings (batch sizes, clipping, ...), as in a job config
    runner: dict[str, Any] = field(default_factory=dict)
    # --- closed loop (issue 14)
    #: ``closed``: every trial runs its strategy x selector under the controller (``erasus_ray.control``) until
    #: ``target`` holds on the whole forget set, within ``budget_steps`` / ``budget_seconds``, with the adaptive
    #: coreset (nothing about lr / epochs / fraction is searched); ``open``: lr x epochs x fraction are searched and
    #: each trial is verified once. Unset: ``open`` when ``lr``, ``epochs`` or a ``scheduler`` (ASHA stops trials per epoch) is given, else ``closed``.
    loop: str | None = None
    target: Any = "auto"
    budget_steps: int | None = None
    budget_seconds: float | None = None
    # --- objective and Tune
    objective: str = "multi"
    metric: str = "avg_gap"
    num_samples: int = 20
    max_concurrent: int = 2
    scheduler: dict[str, Any] | None = None
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1})
    storage_path: str = "results/sweeps"
    time_budget_s: float | None = None
    #: ``[mlflow, wandb]`` (default settings) or ``{mlflow: {tracking_uri: ..., experiment_name: ...}, wandb: {project: ...}}``
    callbacks: list[str] | dict[str, dict[str, Any] | None] = field(default_factory=list)
    # --- leaderboard
    top_k: int = 3
    rerun_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])

    # parsed (not config keys)
    _fraction: Range = field(default=None, repr=False)  # type: ignore[assignment]
    _lr: Range | None = field(default=None, repr=False)
    _epochs: Range | None = field(default=None, repr=False)
    _strategy_params: dict[str, dict[str, Range | Any]] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return sorted(field_names(cls))

    @classmethod
    def from_dict(cls, data: Any) -> "SweepConfig":
        """Validate and build; every error names the key, and nothing here starts Ray or trains a model."""
        return config_from_mapping(cls, data, "sweep config")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SweepConfig":
        """Load a sweep YAML; a relative ``job:`` path is taken from the YAML's folder."""
        data = load_yaml_mapping(path, "sweep config")
        if isinstance(data.get("job"), str) and not Path(data["job"]).expanduser().is_absolute():
            data["job"] = str((Path(path).resolve().parent / data["job"]).resolve())
        try:
            return cls.from_dict(data)
        except InvalidConfigError as err:
            raise InvalidConfigError(f"sweep config {path}: {err}") from None

    @property
    def own_data(self) -> bool:
        """Whether the sweep runs on the user's job (``job:``) rather than a bundled benchmark."""
        return self.job is not None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.keys()}

    # ------------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        from erasus_ray.benchmarks import BENCHMARKS

        if not isinstance(self.name, str) or not self.name or any(c in self.name for c in "/\\ "):
            raise InvalidConfigError(f"name: must be a non-empty string without '/', '\\' or spaces, got {self.name!r}")
        if self.job is not None:
            if not isinstance(self.job, str) or not Path(self.job).expanduser().is_file():
                raise InvalidConfigError(f"job: {self.job!r} is not a job config file")
            load_own_job(self.job)
        elif self.benchmark not in BENCHMARKS:
            raise InvalidConfigError(f"benchmark: unknown {self.benchmark!r}; known: {', '.join(sorted(BENCHMARKS))}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InvalidConfigError(f"seed: must be an integer, got {self.seed!r}")
        for key in ("benchmark_options", "strategy_params", "selector_params", "runner", "resources"):
            if not isinstance(getattr(self, key), dict):
                raise InvalidConfigError(f"{key}: must be a mapping, got {getattr(self, key)!r}")
        self._fraction = Range.parse(self.fraction, "fraction", low_bound=0.0, high_bound=1.0)
        self._lr = None if self.lr is None else Range.parse(self.lr, "lr")
        self._epochs = None if self.epochs is None else Range.parse(self.epochs, "epochs", integer=True, low_bound=1, low_open=False)
        self._validate_names()
        section_settings("runner", self.runner, exclude=(*SEARCHED_RUNNER_KEYS, *JOB_OWNED_RUNNER_KEYS),
                         hint=" (lr and epochs are searched: set them with the top-level 'lr' and 'epochs' keys)")
        self._validate_params()
        self._validate_loop()
        if self.objective not in OBJECTIVES:
            raise InvalidConfigError(f"objective: must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        if self.metric not in METRICS:
            raise InvalidConfigError(f"metric: must be one of {list(METRICS)}, got {self.metric!r}")
        for key in ("num_samples", "max_concurrent", "top_k"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "top_k" else 1):
                raise InvalidConfigError(f"{key}: must be an integer >= {0 if key == 'top_k' else 1}, got {v!r}")
        if not isinstance(self.rerun_seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.rerun_seeds):
            raise InvalidConfigError(f"rerun_seeds: must be a list of integers, got {self.rerun_seeds!r}")
        self._validate_scheduler()
        bad = sorted(set(self.resources) - {"cpu", "gpu"})
        if bad:
            raise InvalidConfigError(f"resources: unknown key(s) {bad}; known: ['cpu', 'gpu']")
        for k, v in self.resources.items():
            if _num(v, f"resources.{k}") < 0:
                raise InvalidConfigError(f"resources.{k}: must be >= 0, got {v!r}")
        if not isinstance(self.storage_path, str) or not self.storage_path:
            raise InvalidConfigError(f"storage_path: must be a non-empty path, got {self.storage_path!r}")
        if self.time_budget_s is not None and _num(self.time_budget_s, "time_budget_s") <= 0:
            raise InvalidConfigError(f"time_budget_s: must be > 0, got {self.time_budget_s!r}")
        self._validate_callbacks()

    def _validate_loop(self) -> None:
        if self.loop is None:
            # searching lr/epochs, or stopping trials per epoch (ASHA), is an open-loop sweep
            self.loop = "open" if self.lr is not None or self.epochs is not None or self.scheduler is not None else "closed"
        if self.loop not in LOOPS:
            raise InvalidConfigError(f"loop: must be one of {list(LOOPS)}, got {self.loop!r}")
        if self.loop == "closed":
            for key in ("lr", "epochs"):
                if getattr(self, key) is not None:
                    raise InvalidConfigError(f"{key}: a closed-loop sweep does not search it (the controller finds the step size); "
                                             "set loop: open to search lr x epochs")
            if self.scheduler is not None:
                raise InvalidConfigError("scheduler: ASHA stops trials per epoch; a closed-loop trial has no epochs (set loop: open)")
        from erasus_ray.evaluation.verification import TARGET_NAMES

        if not (isinstance(self.target, dict) or self.target in TARGET_NAMES):
            raise InvalidConfigError(f"target: must be one of {list(TARGET_NAMES)} or a dict of metric bounds, got {self.target!r}")
        if self.budget_steps is not None and (isinstance(self.budget_steps, bool) or not isinstance(self.budget_steps, int) or self.budget_steps < 1):
            raise InvalidConfigError(f"budget_steps: must be a positive integer, got {self.budget_steps!r}")
        if self.budget_seconds is not None and _num(self.budget_seconds, "budget_seconds") <= 0:
            raise InvalidConfigError(f"budget_seconds: must be > 0, got {self.budget_seconds!r}")

    @property
    def closed_loop(self) -> bool:
        return self.loop == "closed"

    def _name_list(self, key: str, registry: Any) -> list[str] | str:
        value = getattr(self, key)
        if value == "all" and not key.startswith("exclude"):
            return value
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidConfigError(f"{key}: must be 'all' or a list of names, got {value!r}")
        out = []
        for v in value:
            try:
                out.append(registry.get(v).name)
            except UnknownNameError as err:
                raise InvalidConfigError(f"{key}: {err}") from None
        return out

    def _validate_names(self) -> None:
        from erasus_ray.selectors import SELECTORS
        from erasus_ray.strategies import STRATEGIES

        self.strategies = self._name_list("strategies", STRATEGIES)
        self.exclude_strategies = self._name_list("exclude_strategies", STRATEGIES)  # type: ignore[assignment]
        self.selectors = self._name_list("selectors", SELECTORS)
        self.exclude_selectors = self._name_list("exclude_selectors", SELECTORS)  # type: ignore[assignment]
        task = self.task_name()
        for name in self.strategy_names(explicit_only=True):
            try:
                require(self.task_adapter(), STRATEGIES.get(name).requires, algorithm=f"strategy {name!r}")
            except CapabilityError as err:
                raise InvalidConfigError(f"strategies: {err} ({self.job or self.benchmark})") from None
        if not self.strategy_names():
            raise InvalidConfigError(
                f"strategies: the search space is empty (strategies={self.strategies!r}, exclude_strategies={self.exclude_strategies!r}, "
                f"task {task!r})"
            )
        if not self.selector_names():
            raise InvalidConfigError(
                f"selectors: the search space is empty (selectors={self.selectors!r}, exclude_selectors={self.exclude_selectors!r})"
            )

    def _validate_params(self) -> None:
        from erasus_ray.selectors import SELECTORS
        from erasus_ray.strategies import STRATEGIES

        self._strategy_params = {}
        for name, params in self.strategy_params.items():
            try:
                cls = STRATEGIES.get(name)
            except UnknownNameError as err:
                raise InvalidConfigError(f"strategy_params: {err}") from None
            if not isinstance(params, dict):
                raise InvalidConfigError(f"strategy_params.{name}: must be a mapping, got {params!r}")
            parsed: dict[str, Any] = {}
            for p, v in params.items():
                key = f"strategy_params.{name}.{p}"
                if isinstance(v, (dict, list)):
                    parsed[p] = Range.parse(v, key, low_bound=-math.inf, low_open=False)
                else:
                    parsed[p] = v
            try:  # the strategy's own constructor checks names and fixed values
                cls(**{p: (v.low if isinstance(v, Range) and v.choices is None else v.choices[0] if isinstance(v, Range) else v)
                       for p, v in parsed.items()})
            except (TypeError, InvalidConfigError) as err:
                raise InvalidConfigError(f"strategy_params.{name}: {err}") from None
            self._strategy_params[cls.name] = parsed
        for name, params in self.selector_params.items():
            try:
                cls = SELECTORS.get(name)
            except UnknownNameError as err:
                raise InvalidConfigError(f"selector_params: {err}") from None
            if not isinstance(params, dict):
                raise InvalidConfigError(f"selector_params.{name}: must be a mapping, got {params!r}")
            try:
                cls(**params)
            except (TypeError, InvalidConfigError) as err:
                raise InvalidConfigError(f"selector_params.{name}: {err}") from None

    def _validate_callbacks(self) -> None:
        value = self.callbacks
        if isinstance(value, list):
            value = {c: None for c in value} if all(isinstance(c, str) for c in value) else None
        if not isinstance(value, dict) or any(c not in CALLBACKS for c in value):
            raise InvalidConfigError(
                f"callbacks: must be a list drawn from {list(CALLBACKS)} or a mapping of those names to settings, got {self.callbacks!r}")
        for name, settings in value.items():
            if settings is None:
                continue
            if not isinstance(settings, dict) or not all(isinstance(k, str) for k in settings):
                raise InvalidConfigError(f"callbacks.{name}: must be a mapping of settings, got {settings!r}")
            known = CALLBACK_KEYS[name]
            bad = sorted(set(settings) - set(known)) if known is not None else []
            if bad:
                raise InvalidConfigError(f"callbacks.{name}: unknown setting(s) {bad}; known: {sorted(known)}")

    def callback_settings(self) -> dict[str, dict[str, Any]]:
        """Logger callbacks to add: name -> keyword arguments of Ray's callback class (empty: its defaults)."""
        if isinstance(self.callbacks, dict):
            return {k: dict(v or {}) for k, v in self.callbacks.items()}
        return {k: {} for k in self.callbacks}

    def _validate_scheduler(self) -> None:
        if self.scheduler is None:
            return
        if not isinstance(self.scheduler, dict) or self.scheduler.get("type") != "asha":
            raise InvalidConfigError(f"scheduler: must be null or a mapping with type: asha, got {self.scheduler!r}")
        bad = sorted(set(self.scheduler) - {"type", "grace_period", "reduction_factor"})
        if bad:
            raise InvalidConfigError(f"scheduler: unknown key(s) {bad}; known: ['grace_period', 'reduction_factor', 'type']")
        if self.objective != "single":
            raise InvalidConfigError("scheduler: ASHA stops trials on one metric; set objective: single")
        if self.metric != "avg_gap":
            raise InvalidConfigError("scheduler: ASHA compares Avg.Gap after each epoch; set metric: avg_gap")
        for k, low in (("grace_period", 1), ("reduction_factor", 2)):
            v = self.scheduler.get(k, low)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise InvalidConfigError(f"scheduler.{k}: must be an integer >= {low}, got {v!r}")

    # ------------------------------------------------------------------------------------------------------------
    def task_adapter(self) -> Task:
        """The benchmark's declared adapter (``BenchmarkSpec.declared_task``: what it declares, without building the
        benchmark); for a ``job:`` sweep, the adapter of the job's model (the model is loaded once per process)."""
        if self.job is not None:
            return loaded_job(self.job)[2]
        from erasus_ray.benchmarks import benchmark_spec_class

        return benchmark_spec_class(self.benchmark).declared_task()

    def task_name(self) -> str:
        return self.task_adapter().name

    def strategy_names(self, explicit_only: bool = False) -> list[str]:
        """The strategies in the space: the allow list (or every registered one that runs on this task and is
        not contract-exempt), minus the deny list."""
        from erasus_ray.strategies import STRATEGIES

        if self.strategies != "all":
            names = list(self.strategies)
        elif explicit_only:
            return []
        else:
            task = self.task_adapter()
            names = [
                n for n in STRATEGIES.names()
                if not missing(task, STRATEGIES.get(n).requires) and STRATEGIES.get(n).contract_exempt_reason is None
            ]
        return [n for n in names if n not in self.exclude_strategies]

    def selector_names(self) -> list[str]:
        from erasus_ray.selectors import SELECTORS

        if self.selectors == "all":
            # only selectors whose requirements this benchmark's task declares (e.g. deepfool needs class labels)
            task = self.task_adapter()
            names = [n for n in SELECTORS.names() if not missing(task, SELECTORS.get(n).requires)]
        else:
            names = list(self.selectors)
        return [n for n in names if n not in self.exclude_selectors]

    def strategy_param_ranges(self, strategy: str) -> dict[str, Range | Any]:
        return self._strategy_params.get(strategy, {})

    def lr_range(self, strategy: str) -> Range:
        from erasus_ray.strategies import STRATEGIES

        if self._lr is not None:
            return self._lr
        d = STRATEGIES.get(strategy).default_lr
        return Range(low=d / 10, high=d * 10, log=True)

    def epochs_range(self, strategy: str) -> Range:
        from erasus_ray.strategies import STRATEGIES

        if self._epochs is not None:
            return self._epochs
        d = STRATEGIES.get(strategy).default_epochs
        return Range(low=max(1, d // 4), high=2 * d, integer=True)

    def fraction_range(self) -> Range:
        return self._fraction
