"""``ErasusUnlearner``: select a coreset of the forget set, run a strategy on it, report what happened.

Data flows one way: forget ids -> selector -> coreset (ids, weights, scores) -> strategy run by a runner ->
unlearned model -> :class:`UnlearningResult` (JSON). Evaluation against the retrained model is
:func:`erasus_ray.evaluation.evaluate`.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from erasus_ray.control import ClosedLoopRunner, ControlConfig, GrowthPlan
from erasus_ray.control.controller import Controller
from erasus_ray.control.strength import StrengthSearch
from erasus_ray.data import IdDataset, as_id_dataset, check_finite_data, loader_batch_size, make_loader
from erasus_ray.data.ids import FULL_SCAN_LIMIT
from erasus_ray.checks import check_bool, check_int, check_real, check_seed, close_match_hint
from erasus_ray.errors import InvalidConfigError, InvalidDataError, TaskMismatchError
from erasus_ray.evaluation.verification import Measurement, Probe, ResolvedTarget, resolve_target
from erasus_ray.runners import LocalRunner, RunnerConfig, RunReport
from erasus_ray.selectors import SELECTORS, Coreset, Selector, get_selector, resolve_budget
from erasus_ray.settings import FLAT_KEYWORDS, NOT_FLAT, ExecutionConfig, field_names, merged_section, split_flat_keywords
from erasus_ray.strategies import STRATEGIES, Strategy, UnlearnContext, get_strategy
from erasus_ray.strategies.base import refuse_driver_only
from erasus_ray.strategies._meta import runner_requirements
from erasus_ray.tasks import Task, get_task, require
from erasus_ray.utils import Timer, clone_model, model_device, model_hash, seed_everything
from erasus_ray.utils.atomic import atomic_torch_save, atomic_write_text, remove_durably


@dataclass
class UnlearningResult:
    """The outcome of :meth:`ErasusUnlearner.fit`.

    Attributes:
        model: the unlearned model (a copy unless ``inplace=True``).
        coreset: the forget ids the strategy ran on, their weights and every forget id's score.
        timings: seconds for ``select``, ``unlearn`` and ``total``.
        config: everything needed to re-run it (strategy, selector, fraction, seed, runner settings).
        report: steps, samples touched, why it stopped, per-epoch logs.
        metrics: filled by callers that evaluate (e.g. the demo).
        verification: the forgetting criterion measured on the whole forget set (see ``verified``).
    """

    model: nn.Module
    coreset: Coreset
    timings: dict[str, float]
    config: dict[str, Any]
    report: RunReport
    model_hash_before: str = ""
    model_hash_after: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    #: what was measured on the whole forget set after the run (see :meth:`ErasusUnlearner.fit`): the target and why
    #: it was chosen, each criterion's value and bounds, pass/fail, the utility guard, steps, learning rates,
    #: coreset growth and guard events
    verification: dict[str, Any] = field(default_factory=dict)

    @property
    def verified(self) -> bool | None:
        """True / False: the target held / did not hold on the whole forget set (with the guard); None: no
        measurable target (no held-out set, not a whole class, no retrained model)."""
        return self.verification.get("passed")

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "verification": self.verification,
            "coreset": self.coreset.to_dict(),
            "timings": self.timings,
            "report": self.report.to_dict(),
            "model_hash_before": self.model_hash_before,
            "model_hash_after": self.model_hash_after,
            "metrics": self.metrics,
        }

    def to_json(self, path: str | Path | None = None, indent: int = 2) -> str:
        """The result as JSON text; with ``path``, also written there atomically (old or new file, never a part)."""
        text = json.dumps(self.to_dict(), indent=indent, default=_json_default)
        if path is not None:
            atomic_write_text(path, text)
        return text

    def save(self, folder: str | Path, results_name: str = "results.json", model_name: str = "model.pt") -> Path:
        """Publish the job's outputs in ``folder``: the model's state dict, then the results JSON that describes it.

        Order makes the pair consistent at every instant, whatever kills the process: the old results file is
        removed first, the model written (atomically), the results last (atomically, naming ``model_name`` and
        ``model_hash_after``). So a results file on disk always describes the model beside it; a crash in between
        leaves a model without results, never results without their model. Returns the results path.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        results_path = folder / results_name
        remove_durably(results_path)
        atomic_torch_save(self.model.state_dict(), folder / model_name)
        doc = {**self.to_dict(), "model_file": model_name}
        atomic_write_text(results_path, json.dumps(doc, indent=2, default=_json_default))
        return results_path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return repr(obj)


def _checkpointing_switch(model: nn.Module) -> tuple[Callable[[], None], Callable[[], None]] | None:
    """``(enable, disable)`` of a Hugging Face model's activation (gradient) checkpointing, or None."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        return (
            lambda: model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}),
            model.activation_checkpointing_disable,
        )
    if hasattr(model, "gradient_checkpointing_enable"):
        return (
            lambda: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}),
            model.gradient_checkpointing_disable,
        )
    return None


def require_checkpointing(model: nn.Module) -> None:
    """``gradient_checkpointing=True`` needs the model's switch: an :class:`InvalidConfigError` naming it otherwise."""
    if _checkpointing_switch(model) is None:
        raise InvalidConfigError(
            "gradient_checkpointing=True needs a model with activation_checkpointing_enable() / "
            f"gradient_checkpointing_enable() (a Hugging Face PreTrainedModel); {type(model).__name__} has neither"
        )


def check_checkpointing(model: nn.Module, enabled: Any) -> bool:
    """``enabled`` as a bool (None: off); True on a model without a checkpointing switch is an
    :class:`InvalidConfigError` naming ``gradient_checkpointing``."""
    enabled = False if enabled is None else check_bool("gradient_checkpointing", enabled)
    if enabled:
        require_checkpointing(model)
    return enabled


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Recompute activations in the backward pass (memory for compute) while unlearning; the returned model has
    checkpointing off again, as the caller gave it."""
    switch = _checkpointing_switch(model) if enabled else None
    if switch is None:
        yield
        return
    switch[0]()
    try:
        yield
    finally:
        switch[1]()


def check_arguments(model: Any, *, k: Any, fraction: Any, seed: Any, inplace: Any, selector_kwargs: Any) -> None:
    """The constructor's checks that need no data: each failure an :class:`InvalidConfigError` naming the argument."""
    if not isinstance(model, nn.Module):
        raise InvalidConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_int("k", k, low=1, none_ok=True)
    if not (isinstance(fraction, str) and fraction == "auto"):
        check_real("fraction", fraction, low=0.0, high=1.0, low_open=True, none_ok=True)
    check_seed("seed", seed)
    check_bool("inplace", inplace)
    if selector_kwargs is not None and not isinstance(selector_kwargs, dict):
        raise InvalidConfigError(f"selector_kwargs must be a dict or None, got {type(selector_kwargs).__name__}")


def _merged_section(section: str, given: Any, flat: dict[str, Any]) -> dict[str, Any]:
    """:func:`~erasus_ray.settings.merged_section`; the runner's ``seed`` is the unlearner's own ``seed``."""
    where = " (the run's seed is ErasusUnlearner's seed= argument)" if section == "runner" else ""
    return merged_section(section, given, flat, exclude=tuple(NOT_FLAT), hint=where)


def check_strategy_keywords(strategy: Strategy | str, kwargs: dict[str, Any]) -> None:
    """Keywords that are neither settings (:data:`erasus_ray.settings.FLAT_KEYWORDS`) nor hyperparameters of the
    named strategy: an :class:`InvalidConfigError` naming them, the closest accepted keyword and every accepted one.
    (A strategy instance, or one taking ``**kwargs``, checks its own arguments in :func:`get_strategy`.)"""
    if not kwargs or not isinstance(strategy, str):
        return
    params = inspect.signature(STRATEGIES.get(strategy)).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        own = [n for n in params if n != "self"]
        hint = close_match_hint(unknown[0], [*own, *FLAT_KEYWORDS])
        raise InvalidConfigError(
            f"strategy {STRATEGIES.get(strategy).name!r}: unknown keyword(s) {unknown}.{hint} accepted parameters: "
            f"the strategy's {own}; runner and execution settings {sorted(FLAT_KEYWORDS)}"
        )


def named_id_dataset(data: Any, name: str) -> IdDataset:
    """:func:`as_id_dataset`, its errors prefixed with the argument's name."""
    try:
        return as_id_dataset(data)
    except InvalidDataError as err:
        raise InvalidDataError(f"{name}: {err}") from None


def check_disjoint(forget: IdDataset, retain: IdDataset | None) -> None:
    """Forget and retain ids must not overlap, whichever dataset objects carry them: ids are the samples' identity."""
    if retain is None:
        return
    overlap = np.intersect1d(forget.ids, retain.ids)
    if len(overlap):
        raise InvalidDataError(
            f"{len(overlap)} id(s) are in both forget_data and retain_data: {overlap[:20].tolist()}"
        )


def _describe_batch(data: Any) -> str:
    if isinstance(data, torch.Tensor):
        return f"{data.dtype} {tuple(data.shape)}"
    if isinstance(data, dict):
        return "{" + ", ".join(f"{k}: {_describe_batch(v)}" for k, v in data.items()) + "}"
    if isinstance(data, (list, tuple)):
        return "(" + ", ".join(_describe_batch(v) for v in data) + ")"
    return type(data).__name__


def check_model_fits(model: nn.Module, task: Task, data: IdDataset, name: str = "forget_data") -> None:
    """One forward pass on the first two samples of ``data``: raises TaskMismatchError if the output does not fit
    the task, :class:`InvalidDataError` naming ``name`` if the samples cannot be collated or the model cannot run on
    them (wrong feature width, float64 or integer features for a float32 model), with the batch's dtypes and shapes."""
    param = next(model.parameters(), None)
    try:
        batch = next(iter(make_loader(data.subset(data.ids[:2]), task.collate, batch_size=2)))
    except TaskMismatchError:
        raise
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError) as err:
        raise InvalidDataError(f"{name}: its samples cannot be collated for task {task.name!r}: {err}") from err
    try:
        with torch.no_grad():
            task.forward(model, batch.to(model_device(model)).data)
    except TaskMismatchError:
        raise
    except (TypeError, ValueError, RuntimeError, IndexError) as err:
        expected = "" if param is None else f"; the model's parameters are {param.dtype}"
        raise InvalidDataError(
            f"{name}: the model cannot run on its samples (batch {_describe_batch(batch.data)}{expected}): {err}"
        ) from err


#: the default selector's candidates, in order: the first whose requirements the task meets is used
DEFAULT_SELECTORS = ("el2n", "loss")


def default_selector(task: Task) -> str:
    """The selector ``selector="default"`` means for ``task``: EL2N (Paul et al. 2021) where the task has the logits
    it reads, else the per-sample loss (which every task has)."""
    from erasus_ray.tasks import missing

    return next(n for n in DEFAULT_SELECTORS if not missing(task, SELECTORS.get(n).requires))


class ErasusUnlearner:
    """Coreset unlearning with one call.

    Args:
        model: the trained model to unlearn from.
        strategy: a registry name (see ``erasus_ray.strategies.STRATEGIES``) or a :class:`Strategy`.
        selector: a registry name, a :class:`Selector`, or None for the full forget set. ``"default"``: ``el2n``
            where the task has categorical predictions (capability ``logits``), else ``loss`` - the first of
            :data:`DEFAULT_SELECTORS` the task can feed, so the default never refuses a model family.
        fraction: ``"auto"`` (default): an adaptive coreset - the selector picks a small one and forget samples that
            still fail the target join it until the whole forget set passes (closed loop only; without a measurable
            target the full forget set is used). A number in (0, 1]: a fixed coreset of that fraction (1.0: the full
            forget set), still verified on the whole forget set.
        k: coreset size as a count (instead of ``fraction``).
        target: what "forgotten" means, measured on the whole forget set (see
            :func:`erasus_ray.evaluation.verification.resolve_target`): ``"auto"`` (default; ``gold`` when ``fit`` gets
            a retrained model, ``class`` when the forget set is whole classes, ``heldout`` when it gets
            ``heldout_data``, else no measurable target), ``"class"``, ``"heldout"``, ``"gold"``, ``"gold_exact"``
            (``gold`` on whole answers: every prediction unit of a sample right), or a dict of metric bounds. Without
            ``epochs``/``lr``/``forget_target`` the strategy runs in a closed loop until the target holds
            (:mod:`erasus_ray.control`); with any of them it runs that fixed budget or stopping rule (open loop) and is
            verified once.
        budget_steps, budget_seconds: the closed loop's budget (default 1000 runner steps, 600 s). (Not ``budget=``:
            the ``auto`` and ``certified_removal`` strategies already take a ``budget`` hyperparameter.)
        control: every closed-loop setting (:class:`~erasus_ray.control.ControlConfig`: guard tolerances,
            ``verify_every``, learning-rate growth, adaptive coreset start); ``budget_steps`` / ``budget_seconds``
            override its budget.
        task: a task adapter or ``"classification"`` / ``"causal_lm"`` / ``"auto"``.
        seed: seeds selection, shuffling and any noise; an integer in ``[0, 2**32 - 1]``.
        runner: how the strategy is executed: a :class:`~erasus_ray.runners.RunnerConfig` (every setting fixed, so
            an open-loop run of exactly those settings) or a mapping of some of its fields (the rest: the strategy's
            ``default_lr`` / ``default_epochs`` / ``default_optimizer``, the loader's batch size, the dataclass
            defaults). Its ``seed`` is replaced by ``seed``.
        execution: where it runs: an :class:`~erasus_ray.settings.ExecutionConfig` or a mapping of some of its
            fields (``backend`` local | ray_train, ``num_workers``, ``use_gpu``, ``max_failures``, ``distributed``
            none | ray | auto, ``device``). ``backend="ray_train"`` (``TorchTrainer`` with ``num_workers``
            data-parallel workers, ``max_failures`` restarts; see :class:`~erasus_ray.runners.ray_train.RayTrainRunner`)
            runs the same closed loop inside the workers (one TorchTrainer start; rank 0 verifies and decides, every
            rank follows; a checkpoint per verification window) and says ``mode="closed_loop"``; with explicit
            ``epochs``/``lr`` it is open-loop there as in process (checkpoints per epoch).
        inplace: modify ``model`` itself instead of a copy.
        pool_spec: a :class:`~erasus_ray.distributed.PoolSpec` or a path to a pool YAML (default: actors/scoring.yaml),
            or a started :class:`~erasus_ray.distributed.ScoringPool` to reuse (the caller closes it).
        selector_kwargs: constructor arguments of the selector.
        model_factory, recipe: how to build and train a fresh model (used by ``retrain``).
        **strategy_kwargs: flat shorthand for the settings - every field of ``RunnerConfig`` (``lr``, ``epochs``,
            ``optimizer``, ``batch_size``, ``retain_batch_size``, ``grad_clip``, ``precision``, ``forget_target``,
            ``max_steps``, ``progress``, ``gradient_checkpointing``) and of ``ExecutionConfig`` is a keyword
            (``erasus_ray.settings.FLAT_KEYWORDS``, derived from the fields); the rest are hyperparameters of the
            strategy (e.g. ``beta=0.1`` for NPO). An unknown keyword is an :class:`InvalidConfigError` listing the
            accepted ones. Without ``epochs`` / ``lr`` / ``forget_target`` (flat or in ``runner``) the run is closed-loop.

    Example:
        >>> result = ErasusUnlearner(model, strategy="grad_diff", selector="el2n", fraction=0.1).fit(
        ...     forget_data=forget_loader, retain_data=retain_loader)
        >>> result.coreset.ids, result.timings["total"]
        >>> ErasusUnlearner(model, lr=1e-3, epochs=3)  # the same settings as:
        >>> ErasusUnlearner(model, runner={"lr": 1e-3, "epochs": 3})
    """

    def __init__(
        self,
        model: nn.Module,
        strategy: Strategy | str = "grad_diff",
        selector: Selector | str | None = "default",
        fraction: float | str | None = "auto",
        *,
        k: int | None = None,
        target: str | dict[str, Any] = "auto",
        budget_steps: int | None = None,
        budget_seconds: float | None = None,
        control: Any = None,
        task: Task | str = "auto",
        seed: int = 0,
        runner: RunnerConfig | dict[str, Any] | None = None,
        execution: ExecutionConfig | dict[str, Any] | None = None,
        inplace: bool = False,
        selector_kwargs: dict[str, Any] | None = None,
        model_factory: Callable[[], nn.Module] | None = None,
        recipe: Any = None,
        pool_spec: Any = None,
        **strategy_kwargs: Any,
    ) -> None:
        check_arguments(model, k=k, fraction=None if k is not None else fraction, seed=seed, inplace=inplace,
                        selector_kwargs=selector_kwargs)
        flat, strategy_kwargs = split_flat_keywords(strategy_kwargs)
        check_strategy_keywords(strategy, strategy_kwargs)
        self.model = model
        self.strategy = get_strategy(strategy, **strategy_kwargs)
        if k is not None:
            fraction = None
        self.fraction = fraction
        self.k = k
        self.target = target
        self.control = _control_config(control, budget_steps, budget_seconds)
        self.task = get_task(task, model)
        if isinstance(selector, str) and selector == "default":
            selector = default_selector(self.task)
        self.selector = None if selector is None else get_selector(selector, **(selector_kwargs or {}))
        # requirements checked once, here, before any forward pass or training step
        self.strategy.check_task(self.task)
        if self.selector is not None:
            self.selector.check_task(self.task)
        self.seed = int(seed)
        # the runner settings the caller set (None: unset, resolved per fit from the strategy's defaults); checked
        # now, so an out-of-range value (lr=0, which runner_config's ``or`` would replace) fails at construction
        given = _merged_section("runner", runner, flat["runner"])
        self.runner_kwargs = {name: given.get(name) for name in field_names(RunnerConfig) if name not in NOT_FLAT}
        require(self.task, runner_requirements(self.runner_kwargs), algorithm="forget_target= (a forget-accuracy stopping rule)")
        self.execution = ExecutionConfig(**_merged_section("execution", execution, flat["execution"]))
        self.inplace = inplace
        self.device = self.execution.device
        self.gradient_checkpointing = check_checkpointing(model, self.runner_kwargs["gradient_checkpointing"])
        self.model_factory = model_factory
        self.recipe = recipe
        self.distributed = self.execution.distributed
        self.pool_spec = pool_spec
        if self.execution.backend == "ray_train":
            refuse_driver_only(self.strategy)  # would otherwise compute on the driver, not in the workers
        self.backend = self.execution.backend
        self.train_scaling = self.execution.train_scaling

    def runner_config(self, forget_data: Any, epochs: int | None) -> RunnerConfig:
        kw = dict(self.runner_kwargs)
        kw["epochs"] = epochs or kw["epochs"] or self.strategy.default_epochs
        kw["lr"] = kw["lr"] or self.strategy.default_lr
        kw["optimizer"] = kw["optimizer"] or self.strategy.default_optimizer
        kw["batch_size"] = kw["batch_size"] or loader_batch_size(forget_data, 32)
        return RunnerConfig(seed=self.seed, **{k: v for k, v in kw.items() if v is not None})

    def _coreset(self, model: nn.Module, forget: IdDataset, retain: IdDataset | None, *, adaptive: bool) -> Coreset:
        """The coreset the strategy starts from: the full forget set, a fixed ``fraction`` / ``k``, or (``adaptive``)
        the closed loop's small starting coreset (``ControlConfig.start_size``) with every forget id's score."""
        k, fraction = self.k, self.fraction
        if adaptive:
            k, fraction = self.control.start_size(len(forget)), None
        elif fraction == "auto":
            fraction = None  # no closed loop to grow a coreset: the full forget set
        full = self.selector is None or (k is None and (fraction is None or float(fraction) == 1.0))
        if full:
            return Coreset.full(forget)
        assert self.selector is not None
        if self._use_ray(len(forget)):
            from erasus_ray.distributed import PoolSpec, ScoringPool

            if isinstance(self.pool_spec, ScoringPool):  # the caller's warm pool: used, not closed
                return self.pool_spec.select(self.selector, model, forget, task=self.task, k=k, fraction=fraction, seed=self.seed, retain=retain)
            spec = self.pool_spec if isinstance(self.pool_spec, PoolSpec) else PoolSpec.load(self.pool_spec)
            with ScoringPool(spec) as pool:  # the actors' CPUs go back before the strategy (e.g. Ray Train) runs
                return pool.select(self.selector, model, forget, task=self.task, k=k, fraction=fraction, seed=self.seed, retain=retain)
        return self.selector.select(model, forget, task=self.task, k=k, fraction=fraction, seed=self.seed, retain=retain)

    def _context(self, model: nn.Module, forget: IdDataset, retain: IdDataset | None, chosen: Coreset, epochs: int | None) -> UnlearnContext:
        return UnlearnContext(
            model=model,
            task=self.task,
            forget=forget.subset(chosen.ids),
            retain=retain,
            device=model_device(model),
            seed=self.seed,
            full_forget=forget,
            model_factory=self.model_factory,
            recipe=self.recipe,
            forget_weights=chosen.weight_map(),
            # The runner settings the caller chose (not defaults), for strategies that run other strategies.
            state={"runner_overrides": {"lr": self.runner_kwargs["lr"], "epochs": epochs or self.runner_kwargs["epochs"],
                                        "optimizer": self.runner_kwargs["optimizer"]}},
        )

    def _closed_runner(self, config: RunnerConfig, resolved: ResolvedTarget, probe: Probe, original: Measurement | None,
                       start: Coreset, adaptive: bool) -> Any:
        """The closed-loop runner of one run, from the coreset ``start`` (grown from it where ``adaptive``)."""
        growth = GrowthPlan.from_coreset(start.scores, start.info.get("order"), adaptive)
        return self.make_runner(config, Controller(config, self.control, resolved.target, probe, growth, original=original))

    def _search_strength(self, pristine: nn.Module, forget: IdDataset, retain: IdDataset | None, start: Coreset,
                         adaptive: bool, config: RunnerConfig, resolved: ResolvedTarget, probe: Probe,
                         original: Measurement, first: tuple[nn.Module, RunReport, dict[str, Any], Coreset],
                         ) -> tuple[nn.Module, RunReport, dict[str, Any], Coreset]:
        """The closed loop over a strategy's declared strength knob (:attr:`Strategy.strength`): re-run it from the
        original weights at the setting :class:`~erasus_ray.control.strength.StrengthSearch` proposes - stronger while
        the guard holds and the target misses, gentler when the default already breaks the guard or a stronger
        setting missed by more, bisecting between a guard break and a guarded miss - up to
        ``ControlConfig.strength_tries`` times, until the target holds.

        A strategy that computes its update itself (Fisher noise, SSD dampening, UCE's edit) is verified once per
        try. One that takes runner steps after an edit the steps cannot deepen (Scissorhands' trim: the repair steps
        mend the other classes but never erase more) gets a whole closed-loop run per try, from ``start``; a try in
        which no window kept the guard (the loop returned the original, unedited weights) counts as a guard break.
        Returns the first passing run, else the guarded run closest to the target (the default's if none is
        guarded), with every attempt in the verification, and the coreset that run ended with. Cost: one run of the
        strategy and its verification(s) per try."""
        knob, factor = self.strategy.strength
        value = float(getattr(self.strategy, knob))
        search = StrengthSearch(factor)
        search.record(value, _kept_guard(first[2]), first[2].get("violation", float("inf")))
        attempts = [_strength_attempt(knob, value, first[2])]
        best, best_value = first, value
        for _ in range(self.control.strength_tries):
            value = search.next_value()
            if value is None:
                break
            tried = self._strength_try(knob, value, pristine, forget, retain, start, adaptive, config, resolved, probe, original)
            v = tried[2]
            attempts.append(_strength_attempt(knob, value, v))
            search.record(value, _kept_guard(v), v["violation"])
            if _kept_guard(v) and (v["violation"] < best[2]["violation"] or not _kept_guard(best[2])):
                best, best_value = tried, value
            if v["passed"]:
                break
        model, report, verification, chosen = best
        verification = {**verification, "mode": "strength_search", "runs": verification.get("mode"),
                        "strength": {"knob": knob, "factor": factor, "attempts": attempts, "used": best_value}}
        return model, report, verification, chosen

    def _strength_try(self, knob: str, value: float, pristine: nn.Module, forget: IdDataset, retain: IdDataset | None,
                      start: Coreset, adaptive: bool, config: RunnerConfig, resolved: ResolvedTarget, probe: Probe,
                      original: Measurement) -> tuple[nn.Module, RunReport, dict[str, Any], Coreset]:
        """One try of :meth:`_search_strength`: the strategy with ``knob=value`` on a copy of the original weights,
        under a fresh closed loop (verified once where the strategy does not take runner steps)."""
        # its own class, not the registry name: an instance of an unregistered subclass stays that subclass
        strategy = type(self.strategy)(**{**self.strategy.hparams(), knob: value})
        ctx = self._context(clone_model(pristine), forget, retain, start, None)
        runner = self._closed_runner(config, resolved, probe, original, start, adaptive)
        report = strategy.unlearn(ctx, runner)
        ctx.model.eval()
        verification, chosen = _run_verification(runner, resolved, probe, ctx.model, original, self.control, report,
                                                  start, adaptive, len(forget), open_loop=False)
        return ctx.model, report, verification, chosen

    def make_runner(self, config: RunnerConfig, controller: Controller | None = None) -> Any:
        """The runner of the backend; with a ``controller``, one that runs its closed loop (in process, or inside the
        Ray Train workers)."""
        if self.backend == "ray_train":
            from erasus_ray.runners.ray_train import RayTrainRunner

            return RayTrainRunner(config, closed_loop=controller, **self.train_scaling)
        if controller is None:
            return LocalRunner(config)
        return ClosedLoopRunner(config, controller.control, controller.target, controller.probe, controller.growth,
                                original=controller.original)

    def _use_ray(self, n_forget: int) -> bool:
        if self.distributed == "ray":
            return True
        if self.distributed == "auto":
            from erasus_ray.distributed import AUTO_THRESHOLD

            try:
                import ray
            except ImportError:
                return False
            return ray.is_initialized() or n_forget >= AUTO_THRESHOLD
        return False

    def checked_data(self, forget_data: Any, retain_data: Any, *, epochs: Any = None,
                     coreset: Any = None) -> tuple[IdDataset, IdDataset | None]:
        """``fit``'s arguments checked (see :meth:`fit`) and the data as id datasets (forget sorted by id)."""
        check_int("epochs", epochs, low=1, none_ok=True)
        if coreset is not None and not isinstance(coreset, Coreset):
            raise InvalidConfigError(f"coreset must be a Coreset or None, got {type(coreset).__name__}")
        forget = named_id_dataset(forget_data, "forget_data").sorted()
        if len(forget) == 0:
            raise InvalidDataError("forget_data: the forget set is empty: nothing to unlearn")
        if self.k is not None:
            resolve_budget(len(forget), k=self.k)
        retain = None if retain_data is None else named_id_dataset(retain_data, "retain_data")
        check_disjoint(forget, retain)
        if self.strategy.needs_retain and (retain is None or len(retain) == 0):
            raise InvalidDataError(f"strategy {self.strategy.name!r} needs retain_data")
        return forget, retain

    def check_data_runs(self, model: nn.Module, forget: IdDataset, retain: IdDataset | None) -> None:
        """The model (the copy being unlearned) runs on both sets' samples, and neither holds NaN/inf features."""
        check_model_fits(model, self.task, forget, "forget_data")
        if retain is not None and len(retain):
            check_model_fits(model, self.task, retain, "retain_data")
        check_finite_data(forget, self.task.collate, "forget_data")
        if retain is not None:
            check_finite_data(retain, self.task.collate, "retain_data", limit=FULL_SCAN_LIMIT)

    @torch.enable_grad()  # the caller may hold torch.no_grad(); unlearning needs gradients whatever it holds
    def fit(
        self,
        forget_data: Any,
        retain_data: Any = None,
        *,
        heldout_data: Any = None,
        gold: nn.Module | dict[str, float] | None = None,
        epochs: int | None = None,
        coreset: Coreset | None = None,
        gradient_checkpointing: bool | None = None,
    ) -> UnlearningResult:
        """Select a coreset of ``forget_data`` and unlearn it, keeping ``retain_data``; verify on the whole forget set.

        ``forget_data`` / ``retain_data`` / ``heldout_data``: a Dataset, Subset or DataLoader (over a Subset of the
        same base dataset, sample ids are the base indices). ``heldout_data``: samples the model was never trained
        on (e.g. a validation split) - the reference for the ``heldout`` target and for the utility guard; without it a
        forget set that is not a whole class has no measurable target unless ``gold`` (a model retrained without the
        forget set, or its metrics ``{"forget_acc": ..., "mia_svc_efficacy": ...}``) is given. ``coreset``: reuse an
        earlier selection instead of selecting again (kept fixed). ``gradient_checkpointing``: the constructor's
        setting of that name for this fit only (None: the constructor's); the seed passed it to ``fit``, so both work.

        Checked before any work, each failure an :class:`InvalidDataError` / :class:`InvalidConfigError` naming the
        argument: the forget set is non-empty and has no NaN/inf features (one pass of data loading over it), ``k``
        fits in it, forget and retain share no id (nor does the held-out set, where it shares their id space), the
        model runs on two samples of each, and the retain set has no NaN/inf features (a vectorised pass for a
        ``TensorDataset``, a pass of data loading up to ``erasus_ray.data.ids.FULL_SCAN_LIMIT`` samples; a larger
        retain set is checked batch by batch as the runner draws it, before the batch is used).
        """
        forget, retain = self.checked_data(forget_data, retain_data, epochs=epochs, coreset=coreset)
        checkpointing = (self.gradient_checkpointing if gradient_checkpointing is None
                         else check_checkpointing(self.model, gradient_checkpointing))
        heldout = None if heldout_data is None else _heldout(heldout_data, forget, retain)
        config = dataclasses.replace(self.runner_config(forget_data, epochs), gradient_checkpointing=checkpointing)

        model = self.model if self.inplace else clone_model(self.model)
        if self.device is not None:
            model.to(self.device)
        self.check_data_runs(model, forget, retain)
        if heldout is not None:
            check_model_fits(model, self.task, heldout, "heldout_data")
        probe = Probe(self.task, forget, retain, heldout, retain_samples=self.control.retain_samples,
                      heldout_samples=self.control.heldout_samples, seed=self.seed)
        resolved = resolve_target(self.target, task=self.task, forget=forget, retain=retain, heldout=heldout, gold=gold, probe=probe)
        # the caller's own stopping rule (epochs, lr, forget_target) means an open-loop run, verified afterwards
        open_loop = epochs is not None or any(self.runner_kwargs[k] is not None for k in ("epochs", "lr", "forget_target"))
        closed = resolved.target is not None and not open_loop and self.strategy.closed_loop_reason is None
        adaptive = closed and coreset is None and self.selector is not None and self.fraction == "auto" and self.k is None
        hash_before = model_hash(model)
        original = probe.measure(model) if resolved.target is not None else None
        seed_everything(self.seed)
        timer = Timer()
        with timer("total"):
            with timer("select"):
                chosen = coreset if coreset is not None else self._coreset(model, forget, retain, adaptive=adaptive)
            unknown = np.setdiff1d(chosen.ids, forget.ids)
            if len(unknown):
                raise InvalidDataError(f"coreset ids not in the forget set: {unknown[:20].tolist()}")
            ctx = self._context(model, forget, retain, chosen, epochs)
            start = chosen  # the coreset the loop starts from (a strength search's tries start from it again)
            if closed:
                runner: Any = self._closed_runner(config, resolved, probe, original, chosen, adaptive)
            else:
                runner = self.make_runner(config)
            search = closed and self.strategy.strength is not None
            pristine = clone_model(model) if search else None
            with timer("unlearn"):
                with activation_checkpointing(model, checkpointing):
                    report = self.strategy.unlearn(ctx, runner)
                model = ctx.model  # inference-time strategies (dexperts, activation_steering) return a wrapper around it
                model.eval()
                verification, chosen = _run_verification(runner if closed else None, resolved, probe, model, original,
                                                         self.control, report, start, adaptive, len(forget), open_loop)
                if verification["mode"] != "closed_loop" and self.strategy.closed_loop_reason and not open_loop:
                    verification["note"] = f"not closed-loop: {self.strategy.closed_loop_reason}"
                if search and not verification["passed"]:
                    model, report, verification, chosen = self._search_strength(
                        pristine, forget, retain, start, adaptive, config, resolved, probe, original,
                        (model, report, verification, chosen))
        hash_after = model_hash(model)
        stuck = (report.steps > 0 and hash_after == hash_before) or "non-finite" in report.stopped
        if verification.get("passed") is None and stuck:  # never a normal result: a failed verification, said aloud
            why = (f"{self.strategy.name} took {report.steps} good step(s) and " + ("left the weights unchanged"
                   if "non-finite" not in report.stopped else f"stopped on a non-finite value ({report.stopped})")
                   + "; nothing else measures whether it forgot (pass heldout_data= or gold= to verify the run)")
            warnings.warn(why, RuntimeWarning, stacklevel=2)
            verification = {**verification, "mode": "no_effect", "passed": False, "why": why}
        warn_if_weakly_verified(verification)
        described = {**self.describe(config, len(forget)), "gradient_checkpointing": checkpointing}
        if "strength" in verification:  # the setting of the model the search returned
            knob = verification["strength"]["knob"]
            described["strategy_params"] = {**described["strategy_params"], knob: verification["strength"]["used"]}
        return UnlearningResult(
            model=model,
            coreset=chosen,
            timings=dict(timer.seconds),
            config=described,
            report=report,
            model_hash_before=hash_before,
            model_hash_after=hash_after,
            verification=verification,
        )

    def describe(self, config: RunnerConfig | None = None, n_forget: int | None = None) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "strategy": self.strategy.name,
            "strategy_params": self.strategy.hparams(),
            "selector": None if self.selector is None else self.selector.name,
            "selector_params": None if self.selector is None else {k: v for k, v in vars(self.selector).items() if k != "checkpoints"},
            "fraction": self.fraction,
            "k": self.k,
            "target": self.target,
            "control": self.control.to_dict(),
            "n_forget": n_forget,
            "task": self.task.name,
            "seed": self.seed,
            "distributed": self.distributed,
            "backend": self.backend,
            "gradient_checkpointing": self.gradient_checkpointing,
            **({"scaling": self.train_scaling} if self.backend == "ray_train" else {}),
            "runner": None if config is None else asdict(config),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def _control_config(control: Any, budget_steps: Any, budget_seconds: Any) -> ControlConfig:
    if control is not None and not isinstance(control, ControlConfig):
        raise InvalidConfigError(f"control must be an erasus_ray.control.ControlConfig, got {type(control).__name__}")
    base = control or ControlConfig()
    overrides = {k: v for k, v in (("budget_steps", budget_steps), ("budget_seconds", budget_seconds)) if v is not None}
    return dataclasses.replace(base, **overrides).validate() if overrides else base.validate()


def _heldout(heldout_data: Any, forget: IdDataset, retain: IdDataset | None) -> IdDataset:
    """The held-out set as an :class:`IdDataset`; where it shares the training data's id space (the same base
    dataset), an id that is also a forget or retain id is an error: a member cannot be a reference non-member."""
    heldout = named_id_dataset(heldout_data, "heldout_data")
    if len(heldout) == 0:
        raise InvalidDataError("heldout_data is empty")
    for name, other in (("forget", forget), ("retain", retain)):
        if other is not None and heldout.base is other.base:
            overlap = np.intersect1d(heldout.ids, other.ids)
            if len(overlap):
                raise InvalidDataError(f"{len(overlap)} held-out id(s) are also {name} ids: {overlap[:20].tolist()}")
    return heldout


def warn_if_weakly_verified(verification: dict[str, Any]) -> bool:
    """Warn (``UserWarning``) when a run passed a statistical target that could not have failed it: the test's
    detectable loss-MIA AUC at this many forget / held-out samples (``verification["power"]``) is above its reference
    AUC (0.75). Why: on SmolLM2 (10 forget vs 10 held-out authors, detectable AUC 0.952) runs that passed their
    held-out target ended with TOFU forget quality 0.002-0.012 against the retrained model. Returns whether it warned."""
    power = verification.get("power")
    if not verification.get("passed") or not power or power.get("detectable", 0.0) <= power.get("reference", 1.0):
        return False
    warnings.warn(f"verified, but weakly: {power['statement']}; pass more held-out samples (or gold= a retrained "
                  "model) for a test that could have failed", UserWarning, stacklevel=3)
    return True


def _closed_loop_verification(runner: Any, resolved: ResolvedTarget, report: RunReport) -> dict[str, Any]:
    rec = dict(runner.record)
    verdict = rec.pop("verdict")
    rec.pop("coreset_ids", None)
    return {
        "mode": "closed_loop", **resolved.target.describe(), "why": resolved.why,
        "passed": bool(verdict["passed"] and rec["guard_ok"]), "criteria": verdict["criteria"], "violation": verdict["violation"],
        "overshoot": verdict["overshoot"], **({"power": verdict["power"]} if verdict.get("power") else {}),
        "budget": {"steps": runner.control.budget_steps, "seconds": runner.control.budget_seconds},
        "stopped": report.stopped, **rec,
    }


def _grown_coreset(start: Coreset, runner: ClosedLoopRunner, n_forget: int) -> Coreset:
    ids = np.asarray(runner.record["coreset_ids"], dtype=np.int64)
    info = {**start.info, "adaptive": True, "start_size": int(len(start.ids)), "growth": runner.record["coreset_growth"],
            "final_fraction": len(ids) / max(1, n_forget)}
    return Coreset(ids=ids, weights=np.full(len(ids), n_forget / max(1, len(ids))), scores=start.scores, selector=start.selector, info=info)


def _run_verification(runner: Any, resolved: ResolvedTarget, probe: Probe, model: nn.Module, original: Measurement | None,
                      control: ControlConfig, report: RunReport, start: Coreset, adaptive: bool, n_forget: int,
                      open_loop: bool) -> tuple[dict[str, Any], Coreset]:
    """A run's verification and the coreset it ended with: the closed loop's record (and its grown coreset) where
    ``runner`` (a closed-loop runner, else None) drove the run; else one measurement (open loop, or a strategy that
    computed its update without the runner) and ``start``."""
    if runner is not None and runner.ran:
        return _closed_loop_verification(runner, resolved, report), (_grown_coreset(start, runner, n_forget) if adaptive else start)
    return _verify_once(resolved, probe, model, original, control, report, open_loop), start


def _kept_guard(verification: dict[str, Any]) -> bool:
    """Whether a run kept the utility guard with weights of its own: a closed loop in which no window kept it returns
    the original, unedited weights (guarded, but not the strategy's) and counts as a guard break."""
    return bool(verification.get("guard_ok")) and not verification.get("returned_unedited")


def _strength_attempt(knob: str, value: float, verification: dict[str, Any]) -> dict[str, Any]:
    """One row of ``verification["strength"]["attempts"]``: the setting, its outcome and what was measured (the
    target's criteria and the guard's, by name), so a failed search says how close each setting came."""
    measured = {c["name"]: c["value"] for c in verification.get("criteria", []) + verification.get("guard", [])}
    unedited = {"returned_unedited": True} if verification.get("returned_unedited") else {}  # a guard break (_kept_guard)
    return {knob: value, "passed": verification["passed"], "guard_ok": verification.get("guard_ok"), **unedited, "measured": measured}


def _verify_once(resolved: ResolvedTarget, probe: Probe, model: nn.Module, original: Measurement | None, control: ControlConfig,
                 report: RunReport, open_loop: bool) -> dict[str, Any]:
    """One measurement after a run the closed loop did not drive (explicit ``epochs``/``lr``, Ray Train, or a
    strategy that computes its update itself)."""
    mode = "open_loop" if open_loop else "verified_once"
    if resolved.target is None or original is None:
        return {"mode": "unverified", "target": None, "why": resolved.why, "passed": None, "stopped": report.stopped}
    target = resolved.target
    target.prepare(original, None)
    now = probe.measure(model)
    verdict = target.verdict(now)
    guard = control.guard.check(now, original, target)
    guard_ok = all(c.passed for c in guard)
    return {
        "mode": mode, **target.describe(), "why": resolved.why, "passed": bool(verdict.passed and guard_ok),
        "criteria": [c.to_dict() for c in verdict.criteria], "violation": verdict.violation, "overshoot": verdict.overshoot,
        **({"power": verdict.power} if verdict.power else {}),
        "guard": [c.to_dict() for c in guard], "guard_ok": guard_ok, "steps": report.steps, "stopped": report.stopped,
    }



#: The seed's name for the one-call unlearner on vision-language, audio and video models: the same class, whose default
#: ``task="auto"`` picks the adapter from the model (CLIP: contrastive, Whisper: seq2seq, Wav2Vec2 / VideoMAE
#: classifiers: classification). CLIP then uses the in-batch loss; for zero-shot classes pass
#: ``task=ContrastiveTask.from_model(model, captions=class_captions)``.
MultimodalUnlearner = ErasusUnlearner
