"""Shared machinery of the meta strategies (``auto``, ``pipeline``, ``ensemble``): they run *other* strategies.

A meta strategy receives one runner from its caller and runs each inner strategy through a copy of that runner
whose :class:`~erasus_ray.runners.RunnerConfig` is adjusted for the inner strategy. Which ``lr`` / ``epochs`` /
``optimizer`` an inner strategy gets, first match wins:

1. the settings given with that stage or member (``("fine_tune", {"epochs": 2})``);
2. the settings the caller set explicitly (``ErasusUnlearner(..., lr=...)`` or ``fit(epochs=...)``; the
   unlearner passes them in ``ctx.state["runner_overrides"]``);
3. the inner strategy's own ``default_lr`` / ``default_epochs`` / ``default_optimizer``.

Everything else in the runner config (batch size, seed, precision, clipping, progress) is the caller's unless the
stage sets it. Each inner run starts from ``seed_everything(ctx.seed)`` with a fresh ``ctx.state`` - exactly what
a separate :meth:`ErasusUnlearner.fit` call would see - so a meta run reproduces the same inner runs done by hand.
"""

from __future__ import annotations

import copy
import inspect
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from erasus_ray.config_files import field_names
from erasus_ray.errors import InvalidConfigError
from erasus_ray.runner_io import RunnerConfig
from erasus_ray.strategies.base import STRATEGIES, Strategy, UnlearnContext, refuse_driver_only
from erasus_ray.tasks import Capability, Task
from erasus_ray.utils import seed_everything

if TYPE_CHECKING:
    from erasus_ray.runners.local import LocalRunner, RunReport

#: Runner settings a stage may carry next to its strategy hyperparameters: the fields of ``RunnerConfig`` but those
#: that belong to the whole run (its seed, progress bar and activation checkpointing).
STAGE_RUNNER_KEYS: tuple[str, ...] = tuple(
    k for k in field_names(RunnerConfig) if k not in ("seed", "progress", "gradient_checkpointing")
)
#: Runner settings whose fallback is the inner strategy's class default (rule 3 above).
PER_STRATEGY_KEYS: tuple[str, ...] = ("lr", "epochs", "optimizer")


@dataclass
class Stage:
    """One inner strategy of a meta strategy and the runner settings it runs with (only those it sets)."""

    strategy: Strategy
    runner_kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.strategy.name, "params": self.strategy.hparams(), "runner": dict(self.runner_kwargs)}

    def requirements(self) -> frozenset[Capability]:
        """The strategy's, plus logits when the stage stops on a forget accuracy (``forget_target``)."""
        return self.strategy.requirements() | runner_requirements(self.runner_kwargs)


def runner_requirements(settings: Mapping[str, Any]) -> frozenset[Capability]:
    """What runner settings read from the task: ``forget_target`` stops on the coreset's forget accuracy (logits)."""
    return frozenset({Capability.LOGITS}) if settings.get("forget_target") is not None else frozenset()


def make_stage(spec: Any, *, owner: str) -> Stage:
    """A :class:`Stage` from ``"name"``, ``("name", {kwargs})``, a :class:`Strategy` or ``(strategy, {runner kwargs})``.

    ``kwargs`` mix strategy hyperparameters and runner settings (:data:`STAGE_RUNNER_KEYS`); they are split here,
    so a misspelt hyperparameter fails now, naming the stage.
    """
    if isinstance(spec, Stage):
        return spec
    kwargs: Mapping[str, Any] = {}
    target = spec
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2 or not isinstance(spec[1], Mapping):
            raise InvalidConfigError(
                f"{owner}: a stage is a name, a Strategy, or a (name or Strategy, {{kwargs}}) pair; got {spec!r}"
            )
        target, kwargs = spec
    runner_kwargs = {k: v for k, v in kwargs.items() if k in STAGE_RUNNER_KEYS}
    strategy_kwargs = {k: v for k, v in kwargs.items() if k not in STAGE_RUNNER_KEYS}
    if isinstance(target, Strategy):
        if strategy_kwargs:
            raise InvalidConfigError(
                f"{owner}: stage {target.name!r} is an instance, so only runner settings {list(STAGE_RUNNER_KEYS)} "
                f"may go with it; got {sorted(strategy_kwargs)}"
            )
        strategy = target
    elif isinstance(target, str):
        cls = STRATEGIES.get(target)
        params = inspect.signature(cls.__init__).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            unknown = sorted(set(strategy_kwargs) - set(params))
            if unknown:
                known = [n for n in params if n != "self"] + list(STAGE_RUNNER_KEYS)
                raise InvalidConfigError(f"{owner}: stage {cls.name!r} got unknown hyperparameters {unknown}; it takes {known}")
        strategy = cls(**strategy_kwargs)
    else:
        raise InvalidConfigError(f"{owner}: a stage's strategy must be a registry name or a Strategy, got {target!r}")
    _check_runner_kwargs(owner, strategy.name, runner_kwargs)
    return Stage(strategy, runner_kwargs)


def _check_runner_kwargs(owner: str, name: str, runner_kwargs: Mapping[str, Any]) -> None:
    try:
        RunnerConfig(**runner_kwargs).validate()
    except InvalidConfigError as err:
        raise InvalidConfigError(f"{owner}: stage {name!r}: {err}") from None


def make_stages(specs: Iterable[Any], *, owner: str) -> list[Stage]:
    stages = [make_stage(spec, owner=owner) for spec in specs]
    if not stages:
        raise InvalidConfigError(f"{owner}: needs at least one strategy")
    return stages


def stage_config(base: "RunnerConfig", stage: Stage, overrides: Mapping[str, Any]) -> "RunnerConfig":
    """The runner config of one inner run (precedence in the module docstring)."""
    updates: dict[str, Any] = {}
    for key in PER_STRATEGY_KEYS:
        if key in stage.runner_kwargs:
            updates[key] = stage.runner_kwargs[key]
        elif overrides.get(key) is not None:
            updates[key] = overrides[key]
        else:
            updates[key] = getattr(stage.strategy, f"default_{key}")
    for key, value in stage.runner_kwargs.items():
        updates.setdefault(key, value)
    return replace(base, **updates).validate()


def run_stage(stage: Stage, ctx: UnlearnContext, runner: "LocalRunner") -> tuple["RunReport", "RunnerConfig", float]:
    """Run one inner strategy on ``ctx`` with a copy of ``runner``; returns (report, config used, seconds)."""
    if getattr(runner, "distributed", False):  # e.g. auto's run-time choice; construction checks the rest
        refuse_driver_only(stage.strategy, "a distributed runner (backend='ray_train')")
    stage.strategy.check_task(ctx.task)  # auto's run-time choice; stages known at construction were checked then
    overrides = ctx.state.get("runner_overrides", {})
    config = stage_config(runner.config, stage, overrides)
    inner = copy.copy(runner)  # same runner type and scaling (local or Ray Train), another config
    inner.config = config
    saved_state = ctx.state
    ctx.state = {"runner_overrides": dict(overrides)}
    seed_everything(ctx.seed)
    start = time.perf_counter()
    try:
        report = stage.strategy.unlearn(ctx, inner)
    finally:
        ctx.state = saved_state
    ctx.model.eval()
    return report, config, time.perf_counter() - start


def merge_reports(
    parts: Sequence[tuple[str, "RunReport", "RunnerConfig", float]],
) -> "MetaReport":
    """Sum the cost fields of several inner reports and keep each one (``stages``); history entries get ``stage``."""
    steps = sum(r.steps for _, r, _, _ in parts)
    epochs = sum(r.epochs for _, r, _, _ in parts)
    forget_samples = sum(r.forget_samples for _, r, _, _ in parts)
    retain_samples = sum(r.retain_samples for _, r, _, _ in parts)
    history: list[dict[str, float]] = []
    for i, (_, r, _, _) in enumerate(parts):
        history.extend({"stage": float(i), **entry} for entry in r.history)
    problems = [f"{name}: {r.stopped}" for name, r, _, _ in parts if r.stopped != "completed"]
    stages = [
        {"strategy": name, "seconds": seconds, "runner": asdict(cfg), **r.to_dict()} for name, r, cfg, seconds in parts
    ]
    return MetaReport(
        steps=steps,
        epochs=epochs,
        forget_samples=forget_samples,
        retain_samples=retain_samples,
        stopped="completed" if not problems else "; ".join(problems),
        history=history,
        stages=stages,
        seconds=sum(s for _, _, _, s in parts),
    )


def union_requirements(parts: Iterable[Iterable[Capability]]) -> frozenset[Capability]:
    """The capabilities any of ``parts`` needs: what a strategy running all of them reads."""
    return frozenset().union(*parts)


class _MetaBase(Strategy):
    """Base of strategies that run other strategies (they override :meth:`unlearn`, never :meth:`loss`).

    They pass their runner on to every inner run, so under Ray Train each stage trains in the workers; what they
    do themselves (order stages, average or score members) is bookkeeping in the calling process."""

    closed_loop_reason = "its stages carry their own runner settings (epochs per stage, members compared as run)"

    def inner_stages(self) -> list[Stage]:
        """The stages known at construction (``auto`` decides its one at run time: none)."""
        return []

    def requirements(self) -> frozenset[Capability]:
        """The union of this strategy's own ``requires`` and its stages' requirements (``auto``: its own only; the
        strategy it picks is checked when it picks it)."""
        return union_requirements([type(self).requires, *(s.requirements() for s in self.inner_stages())])

    def check_task(self, task: Task) -> None:
        """Its own requirements, then each stage's own check (so a stage's ``requires_one_of`` counts too)."""
        super().check_task(task)
        for stage in self.inner_stages():
            stage.strategy.check_task(task)

    def driver_only(self) -> str | None:
        for stage in self.inner_stages():
            reason = stage.strategy.driver_only()
            if reason:
                return f"its stage {stage.strategy.name!r}: {reason}"
        return None


@dataclass
class MetaReport:
    """The report of a meta strategy: the fields of :class:`~erasus_ray.runners.RunReport` (cost fields summed
    over the inner runs, ``history`` concatenated with a ``stage`` index) plus what the inner runs were.

    (A separate dataclass with the same fields rather than a subclass: written when ``RunReport`` lived in
    ``runners``, which imports ``strategies``; it now lives in :mod:`erasus_ray.runner_io`, so a subclass is possible.)

    Attributes:
        stages: one entry per inner run: strategy name, seconds, the runner config it used and its own report.
        seconds: wall-clock seconds of all inner runs together.
        choice: what the meta strategy decided and why (``auto``: the chosen strategy and the rule that fired;
            ``ensemble``: the mode, member scores and the selected member).
    """

    steps: int = 0
    epochs: int = 0
    forget_samples: int = 0
    retain_samples: int = 0
    stopped: str = "completed"
    history: list[dict[str, float]] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    choice: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
