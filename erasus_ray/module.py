"""User-defined unlearning logic: subclass :class:`UnlearningModule`, run it with :class:`UnlearningTrainer`.

The API shape is the seed package's (a Lightning-style module with ``forget_step`` / ``retain_step`` and a trainer
with ``epochs``, ``validate_every``, ``early_stopping_patience``). Underneath, the trainer is the library's own
runner: the module is wrapped as a loss-based :class:`~erasus_ray.strategies.Strategy` and driven by
:meth:`LocalRunner.run_epochs <erasus_ray.runners.LocalRunner.run_epochs>` and its :class:`StepExecutor`, so a
custom module gets the same id-based loaders (each forget batch of the coreset paired with one retain batch;
shuffling reseeded per epoch), coreset weights, gradient clipping, bf16 autocast, and the NaN guard that keeps the
last good weights, as every built-in strategy.

Hook points, in the order they fire (every :class:`Callback` method receives the trainer and the module)::

    on_fit_start(trainer, module)
    for each epoch e = 1..epochs:
        on_epoch_start(trainer, module, epoch=e)
        for each step: on_step_end(trainer, module, step=global step (1-based), logs=the step's logs)
        if e % validate_every == 0: on_validation_end(trainer, module, metrics)   # early stopping decided here
                                    # (metrics: val_forget_acc, val_forget_loss, val_retain_*, validation_step's)
        on_epoch_end(trainer, module, epoch=e, logs=the epoch's history entry)
    on_fit_end(trainer, module, result)

A callback may set ``trainer.should_stop = True``; the fit then ends after the current epoch.

Example:
    >>> class Ascent(UnlearningModule):
    ...     def __init__(self, model, lr=1e-3):
    ...         super().__init__(model)
    ...         self.save_hyperparameters(ignore=["model"])
    ...     def forget_step(self, batch, batch_idx):
    ...         loss = -self.sample_loss(batch).mean()
    ...         self.log("forget_loss", -loss)
    ...         return loss
    ...     def retain_step(self, batch, batch_idx):
    ...         return self.sample_loss(batch).mean()
    >>> trainer = UnlearningTrainer(epochs=10, validate_every=2, early_stopping_patience=3)
    >>> result = trainer.fit(Ascent(model), forget_loader, retain_loader)
    >>> result.history[-1]["val_forget_acc"], result.report.stopped
"""

from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from erasus_ray.checks import close_match_hint
from erasus_ray.data import Batch, IdDataset, as_id_dataset, make_loader
from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.runners.local import LocalRunner, RunnerConfig, RunReport, StepExecutor
from erasus_ray.selectors import Coreset, Selector, get_selector, resolve_budget
from erasus_ray.settings import FLAT_KEYWORDS, NOT_FLAT, ExecutionConfig, merged_section, split_flat_keywords
from erasus_ray.strategies.base import Strategy, UnlearnContext
from erasus_ray.tasks import Task, TaskOutput, get_task
from erasus_ray.training import make_optimizer
from erasus_ray.unlearner import UnlearningResult, activation_checkpointing, check_model_fits, require_checkpointing
from erasus_ray.utils import model_device, model_hash, seed_everything


class AttributeDict(dict):
    """A dict whose keys read as attributes (``module.hparams.lr``)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class UnlearningModule(nn.Module):
    """Base class of user-defined unlearning logic.

    Override:
        forget_step(batch, batch_idx) -> Tensor: the loss of one forget batch (required). To unlearn, make it
            *minimised* by forgetting, e.g. ``-cross_entropy`` (gradient ascent).
        retain_step(batch, batch_idx) -> Tensor | None: the loss of one retain batch, added to the forget loss of
            the same step. Not overriding it means no retain batches are drawn.
        configure_optimizers() -> optimizer | (optimizer, scheduler) | {"optimizer", "lr_scheduler"}: default Adam
            over the model's trainable parameters at ``hparams["lr"]`` (1e-3 if unset); a scheduler steps once per
            epoch.
        validation_step(batch, batch_idx) -> dict[str, float]: extra validation metrics, averaged over the
            validation batches (``val_data`` given to :meth:`UnlearningTrainer.fit`, else the forget coreset);
            runs under ``torch.no_grad()`` with the model in eval mode.

    Batches are :class:`~erasus_ray.data.Batch` objects: ``batch.ids`` (dataset ids), ``batch.data`` (the task's
    collated data, ``(x, y)`` for a classifier) and ``batch.weights`` (coreset weights or None).
    :meth:`task_output` / :meth:`sample_loss` read any batch through the task adapter, so a module written with
    them works for classifiers and causal LMs alike.
    """

    default_lr: float = 1e-3

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.hparams: AttributeDict = AttributeDict()
        self.task: Task | None = None  # set by the trainer
        self.trainer: "UnlearningTrainer | None" = None
        self._step_logs: dict[str, float] = {}

    # --- to override --------------------------------------------------------------------------------------
    def forget_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define forget_step(batch, batch_idx)")

    def retain_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        return None

    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, float] | None:
        return None

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return make_optimizer("adam", params, float(self.hparams.get("lr", self.default_lr)))

    # --- helpers ------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def task_output(self, batch: Batch) -> TaskOutput:
        """The task adapter's reading of the model's output on ``batch`` (logits, targets, per-sample losses)."""
        if self.task is None:
            raise InvalidConfigError("module.task is set by UnlearningTrainer.fit; call these helpers inside a fit")
        return self.task.forward(self.model, batch.data)

    def sample_loss(self, batch: Batch) -> torch.Tensor:
        """Per-sample loss of the batch (cross-entropy for a classifier, answer NLL for a causal LM)."""
        return self.task_output(batch).sample_loss()

    def log(self, name: str, value: float | torch.Tensor) -> None:
        """Record a value for this step; the trainer averages it per epoch into ``result.history``."""
        self._step_logs[name] = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)

    def save_hyperparameters(self, ignore: Iterable[str] = ()) -> None:
        """Store the calling ``__init__``'s arguments (except ``self`` and ``ignore``) in ``self.hparams``."""
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None
        if caller is None:
            return
        code = caller.f_code
        n_args = code.co_argcount + code.co_kwonlyargcount
        names = [n for n in code.co_varnames[:n_args] if n != "self" and n not in set(ignore)]
        self.hparams.update({n: caller.f_locals[n] for n in names if n in caller.f_locals})

    def _overrides(self, name: str) -> bool:
        return getattr(type(self), name) is not getattr(UnlearningModule, name)


class Callback:
    """Hooks into :class:`UnlearningTrainer.fit` (order in the module docstring). Override any subset."""

    def on_fit_start(self, trainer: "UnlearningTrainer", module: UnlearningModule) -> None: ...

    def on_epoch_start(self, trainer: "UnlearningTrainer", module: UnlearningModule, epoch: int) -> None: ...

    def on_step_end(self, trainer: "UnlearningTrainer", module: UnlearningModule, step: int, logs: dict[str, float]) -> None: ...

    def on_validation_end(self, trainer: "UnlearningTrainer", module: UnlearningModule, metrics: dict[str, float]) -> None: ...

    def on_epoch_end(self, trainer: "UnlearningTrainer", module: UnlearningModule, epoch: int, logs: dict[str, float]) -> None: ...

    def on_fit_end(self, trainer: "UnlearningTrainer", module: UnlearningModule, result: "TrainerResult") -> None: ...


class _ModuleStrategy(Strategy):
    """Adapts an :class:`UnlearningModule` to the runner's strategy contract (one paired step = one loss)."""

    name = "module"

    def __init__(self, module: UnlearningModule, use_retain: bool) -> None:
        super().__init__()
        self._module = module
        self.needs_retain = use_retain
        self._batch_idx = 0

    def loss(self, ctx: UnlearnContext, forget: Batch | None, retain: Batch | None) -> tuple[torch.Tensor, dict[str, float]]:
        module = self._module
        module._step_logs = {}
        loss = module.forget_step(forget, self._batch_idx)
        if not isinstance(loss, torch.Tensor):
            raise InvalidConfigError(f"{type(module).__name__}.forget_step must return a loss tensor, got {type(loss).__name__}")
        if retain is not None:
            retain_loss = module.retain_step(retain, self._batch_idx)
            if retain_loss is not None:
                loss = loss + retain_loss
        return loss, dict(module._step_logs)

    def hparams(self) -> dict[str, Any]:
        return dict(self._module.hparams)


class _HookedExecutor(StepExecutor):
    """The runner's step, plus the module's optimizer and the ``on_step_end`` hook."""

    def __init__(self, trainer: "UnlearningTrainer", module: UnlearningModule, strategy: _ModuleStrategy, ctx: UnlearnContext, config: RunnerConfig) -> None:
        super().__init__(strategy, ctx, config)
        self.trainer, self.module = trainer, module
        self.optimizer, self.scheduler = _unpack_optimizers(module.configure_optimizers())
        self.global_step = 0

    def step(self, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        logs = super().step(forget, retain)
        self.strategy._batch_idx += 1
        self.global_step += 1
        self.trainer._fire("on_step_end", self.module, step=self.global_step, logs=logs)
        return logs


def _unpack_optimizers(value: Any) -> tuple[torch.optim.Optimizer, Any]:
    if isinstance(value, torch.optim.Optimizer):
        return value, None
    if isinstance(value, dict) and "optimizer" in value:
        return value["optimizer"], value.get("lr_scheduler")
    if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], torch.optim.Optimizer):
        return value[0], value[1]
    raise InvalidConfigError(
        "configure_optimizers must return an optimizer, (optimizer, scheduler) or {'optimizer': ..., 'lr_scheduler': ...}"
    )


@dataclass
class TrainerResult(UnlearningResult):
    """:class:`~erasus_ray.UnlearningResult` plus the trainer's per-epoch ``history`` (train logs and, on
    validation epochs, the validation metrics) and the ``best`` monitored value (``{"epoch", "value"}``)."""

    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "history": self.history, "best": self.best}


_ON_THE_UNLEARNER = ("ErasusUnlearner's (UnlearningTrainer runs in this process: its callbacks, validation and early "
                      "stopping read the model between epochs)")
_ON_THE_MODULE = "the module's: configure_optimizers() (default: Adam at hparams['lr'], see save_hyperparameters)"
#: Runner / execution fields that are not the trainer's settings, and where each is set instead. Every other field of
#: :class:`~erasus_ray.runners.RunnerConfig` and :class:`~erasus_ray.settings.ExecutionConfig` is a flat keyword of
#: the trainer, as of :class:`~erasus_ray.ErasusUnlearner` (one spelling list: :data:`TRAINER_KEYWORDS`).
NOT_TRAINER_SETTINGS: dict[str, str] = {
    "lr": _ON_THE_MODULE, "optimizer": _ON_THE_MODULE, "backend": _ON_THE_UNLEARNER, "num_workers": _ON_THE_UNLEARNER,
    "use_gpu": _ON_THE_UNLEARNER, "max_failures": _ON_THE_UNLEARNER,
    "distributed": "ErasusUnlearner's (the trainer scores its coreset in this process)",
}
#: the trainer's flat keywords (keyword -> settings section): :data:`~erasus_ray.settings.FLAT_KEYWORDS` less
#: :data:`NOT_TRAINER_SETTINGS`.
TRAINER_KEYWORDS: dict[str, str] = {k: section for k, section in FLAT_KEYWORDS.items() if k not in NOT_TRAINER_SETTINGS}
#: the trainer's own defaults where they differ from the dataclass's (a settings dataclass given whole keeps its own)
TRAINER_DEFAULTS: dict[str, Any] = {"progress": False}
#: the built-in validation metrics' names before they got their ``val_`` prefix: still accepted as ``monitor``
MONITOR_ALIASES: dict[str, str] = {f"{s}_{m}": f"val_{s}_{m}" for s in ("forget", "retain") for m in ("acc", "loss")}


def _trainer_settings(section: str, given: Any, flat: dict[str, Any]) -> dict[str, Any]:
    """The trainer's ``section`` settings (:func:`~erasus_ray.settings.merged_section`): a field of
    :data:`NOT_TRAINER_SETTINGS` is refused with where it is set instead, as a flat keyword, a mapping key, or a
    settings dataclass's field away from its default."""
    refused = sorted(k for k in flat if k in NOT_TRAINER_SETTINGS)
    if isinstance(given, (RunnerConfig, ExecutionConfig)):
        defaults = type(given)()
        refused += [k for k in NOT_TRAINER_SETTINGS if hasattr(given, k) and getattr(given, k) != getattr(defaults, k)]
    elif isinstance(given, dict):
        refused += sorted(k for k in given if k in NOT_TRAINER_SETTINGS)
    if refused:
        raise InvalidConfigError(
            f"UnlearningTrainer: {section} setting(s) {refused} are not the trainer's; "
            + "; ".join(f"{k} is {NOT_TRAINER_SETTINGS[k]}" for k in refused)
        )
    exclude = tuple(NOT_FLAT | set(NOT_TRAINER_SETTINGS))
    hint = " (the run's seed is UnlearningTrainer's seed= argument)" if section == "runner" else ""
    return merged_section(section, given, flat, exclude=exclude, hint=hint)


def _check_trainer_keywords(rest: dict[str, Any]) -> None:
    """Keywords that are no setting of the trainer: an :class:`InvalidConfigError` naming them, the closest accepted
    keyword and every accepted one."""
    if rest:
        unknown = sorted(rest)
        params = inspect.signature(UnlearningTrainer).parameters.values()
        accepted = sorted({p.name for p in params if p.kind is not p.VAR_KEYWORD} | set(TRAINER_KEYWORDS))
        raise InvalidConfigError(
            f"UnlearningTrainer: unknown keyword(s) {unknown}.{close_match_hint(unknown[0], accepted)} Accepted: {accepted}"
        )


class UnlearningTrainer:
    """Runs an :class:`UnlearningModule` over the forget coreset (paired with retain batches), validates, stops early.

    Args:
        epochs: passes over the forget coreset (default 10, :class:`~erasus_ray.runners.RunnerConfig`'s).
        validate_every: validate after every ``validate_every``-th epoch (None: never).
        early_stopping_patience: stop after this many validations in a row without improvement of ``monitor``
            (None: no early stopping). Needs ``validate_every``.
        monitor: the validation metric to watch. Built in: ``val_forget_acc`` / ``val_forget_loss`` (on up to
            ``val_max_samples`` ids of the whole forget set) and ``val_retain_acc`` / ``val_retain_loss`` (same,
            retain set); plus whatever ``validation_step`` returns, under the names it gives. The built-in names
            carry ``val_`` so that they never overwrite what the module logs in training with :meth:`UnlearningModule.log`
            (a module's own ``forget_loss`` keeps its value in ``history`` on validation epochs); their former names
            ``forget_acc`` ... are still accepted as ``monitor`` (:data:`MONITOR_ALIASES`) when ``validation_step``
            returns no metric of that name.
        mode: ``"min"`` or ``"max"``: which direction is an improvement (``val_forget_acc`` falls as it unlearns).
        min_delta: an improvement must beat the best value by more than this.
        restore_best: load the weights of the best validation at the end.
        callbacks: :class:`Callback` instances, called in list order.
        runner: how the loop runs: a :class:`~erasus_ray.runners.RunnerConfig` (every field fixed) or a mapping of
            some of its fields. Not ``lr`` / ``optimizer``: the module's ``configure_optimizers`` sets them.
        execution: an :class:`~erasus_ray.settings.ExecutionConfig` or a mapping; the trainer takes its ``device``
            (the model is moved there before the fit). Ray Train and the Ray scoring pool (``backend``,
            ``num_workers``, ``use_gpu``, ``max_failures``, ``distributed``) are :class:`~erasus_ray.ErasusUnlearner`'s.
        **settings: the same fields as flat keywords (:data:`TRAINER_KEYWORDS`, derived from the dataclasses as
            :class:`~erasus_ray.ErasusUnlearner`'s are): ``batch_size``, ``retain_batch_size``, ``grad_clip``,
            ``precision``, ``max_steps``, ``forget_target``, ``progress`` (default False here),
            ``gradient_checkpointing`` (a Hugging Face model's switch, on during the fit), ``device``. An unknown
            keyword, a setting given both flat and in ``runner=`` / ``execution=``, or one of
            :data:`NOT_TRAINER_SETTINGS` is an :class:`InvalidConfigError` naming it (and the accepted keywords).
        selector, fraction, k, selector_kwargs: select a coreset of the forget set first (default: the whole set).
        val_max_samples: cap on the samples the built-in validation metrics read per set.
        seed: seeds selection, shuffling and the validation subsample.

    Example:
        >>> UnlearningTrainer(epochs=5, batch_size=16, grad_clip=1.0)          # flat shorthand
        >>> UnlearningTrainer(runner={"epochs": 5, "batch_size": 16, "grad_clip": 1.0})   # the same settings

    Cost: that of the module's steps (one forward+backward per forget batch, plus per retain batch if it defines
    ``retain_step``), plus one forward pass over at most ``2 * val_max_samples`` samples per validation.
    """

    def __init__(
        self,
        epochs: int | None = None,
        validate_every: int | None = 1,
        early_stopping_patience: int | None = None,
        monitor: str = "val_forget_acc",
        mode: str = "min",
        min_delta: float = 0.0,
        restore_best: bool = False,
        callbacks: Sequence[Callback] = (),
        *,
        runner: RunnerConfig | dict[str, Any] | None = None,
        execution: ExecutionConfig | dict[str, Any] | None = None,
        selector: Selector | str | None = None,
        fraction: float | None = None,
        k: int | None = None,
        selector_kwargs: dict[str, Any] | None = None,
        val_max_samples: int = 512,
        seed: int = 0,
        **settings: Any,
    ) -> None:
        flat, rest = split_flat_keywords({"epochs": epochs, **settings})
        _check_trainer_keywords(rest)
        given = _trainer_settings("runner", runner, flat["runner"])
        if not isinstance(runner, RunnerConfig):
            given = {**TRAINER_DEFAULTS, **given}
        # lr / optimizer are the module's business (configure_optimizers); the config carries the loop settings
        self.config = RunnerConfig(**given, seed=seed).validate()
        self.execution = ExecutionConfig(**_trainer_settings("execution", execution, flat["execution"]))
        self.device = self.execution.device
        if validate_every is not None and (isinstance(validate_every, bool) or not isinstance(validate_every, int) or validate_every < 1):
            raise InvalidConfigError(f"validate_every must be a positive integer or None, got {validate_every!r}")
        if early_stopping_patience is not None:
            if isinstance(early_stopping_patience, bool) or not isinstance(early_stopping_patience, int) or early_stopping_patience < 1:
                raise InvalidConfigError(f"early_stopping_patience must be a positive integer or None, got {early_stopping_patience!r}")
            if validate_every is None:
                raise InvalidConfigError("early_stopping_patience needs validate_every (early stopping reads validation metrics)")
        if mode not in ("min", "max"):
            raise InvalidConfigError(f"mode must be 'min' or 'max', got {mode!r}")
        if not (min_delta >= 0 and np.isfinite(min_delta)):
            raise InvalidConfigError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        if int(val_max_samples) != val_max_samples or val_max_samples < 1:
            raise InvalidConfigError(f"val_max_samples must be a positive integer, got {val_max_samples!r}")
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise InvalidConfigError(f"callbacks must be Callback instances, got {type(cb).__name__}")
        self.epochs = self.config.epochs
        self.validate_every = validate_every
        self.early_stopping_patience = early_stopping_patience
        self.monitor = monitor
        self.mode = mode
        self.min_delta = float(min_delta)
        self.restore_best = restore_best
        self.callbacks = list(callbacks)
        self.selector = None if selector is None else get_selector(selector, **(selector_kwargs or {}))
        if k is not None and fraction is not None:
            raise InvalidConfigError("pass k or fraction, not both")
        if fraction is not None:
            resolve_budget(1, fraction=fraction)
        self.fraction, self.k = fraction, k
        self.val_max_samples = int(val_max_samples)
        self.seed = self.config.seed
        self.should_stop = False
        self.current_epoch = 0
        self.global_step = 0

    # --- hooks ------------------------------------------------------------------------------------------------
    def _fire(self, hook: str, module: UnlearningModule, **kwargs: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, module, **kwargs)

    # --- validation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, module: UnlearningModule, ctx: UnlearnContext, val_data: IdDataset | None) -> dict[str, float]:
        """Built-in metrics (``val_forget_acc`` / ``val_forget_loss`` / ``val_retain_acc`` / ``val_retain_loss`` on a
        seeded subsample) plus ``validation_step``'s, under its own names."""
        model, task = module.model, ctx.task
        was_training = model.training
        model.eval()
        metrics: dict[str, float] = {}
        full = ctx.full_forget if ctx.full_forget is not None else ctx.forget
        for prefix, data in (("forget", full), ("retain", ctx.retain)):
            if data is None or len(data) == 0:
                continue
            ids = self._val_ids(data, prefix)
            acc_sum, loss_sum, n = 0.0, 0.0, 0
            for batch in make_loader(data.subset(ids), task.collate, batch_size=256):
                out = task.forward(model, batch.to(ctx.device).data)
                acc_sum += float(out.sample_accuracy().sum())
                loss_sum += float(out.sample_loss().sum())
                n += len(batch)
            metrics[f"val_{prefix}_acc"], metrics[f"val_{prefix}_loss"] = acc_sum / n, loss_sum / n
        if module._overrides("validation_step"):
            source = val_data if val_data is not None else ctx.forget
            sums: dict[str, float] = {}
            n_batches = 0
            for i, batch in enumerate(make_loader(source, task.collate, batch_size=self.config.batch_size)):
                out = module.validation_step(batch.to(ctx.device), i) or {}
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + (float(value.detach()) if isinstance(value, torch.Tensor) else float(value))
                n_batches += 1
            metrics.update({k: v / max(n_batches, 1) for k, v in sums.items()})
        model.train(was_training)
        return metrics

    def _val_ids(self, data: IdDataset, which: str) -> np.ndarray:
        ids = np.sort(data.ids)
        if len(ids) <= self.val_max_samples:
            return ids
        rng = np.random.default_rng([self.seed, 0 if which == "forget" else 1])
        return np.sort(rng.choice(ids, size=self.val_max_samples, replace=False))

    def _monitored(self, metrics: dict[str, float]) -> str:
        """The validation metric ``monitor`` names: itself, else its ``val_`` name (:data:`MONITOR_ALIASES`)."""
        return self.monitor if self.monitor in metrics else MONITOR_ALIASES.get(self.monitor, self.monitor)

    def _improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value < best - self.min_delta if self.mode == "min" else value > best + self.min_delta

    # --- the fit ----------------------------------------------------------------------------------------------
    def fit(
        self,
        module: UnlearningModule,
        forget_data: Any,
        retain_data: Any = None,
        *,
        val_data: Any = None,
        task: Task | str = "auto",
        coreset: Coreset | None = None,
    ) -> TrainerResult:
        """Unlearn ``forget_data`` with ``module`` (modified in place), keeping ``retain_data``.

        ``forget_data`` / ``retain_data`` / ``val_data``: a Dataset, Subset or DataLoader (ids as in
        :class:`~erasus_ray.ErasusUnlearner`). ``coreset``: run on these forget ids instead of selecting.
        """
        if not isinstance(module, UnlearningModule):
            raise InvalidConfigError(f"fit needs an UnlearningModule, got {type(module).__name__}")
        if not module._overrides("forget_step"):
            raise InvalidConfigError(f"{type(module).__name__} must define forget_step(batch, batch_idx)")
        forget = as_id_dataset(forget_data).sorted()
        if len(forget) == 0:
            raise InvalidDataError("the forget set is empty: nothing to unlearn")
        retain = None if retain_data is None else as_id_dataset(retain_data)
        if retain is not None and retain.base is forget.base:
            overlap = np.intersect1d(forget.ids, retain.ids)
            if len(overlap):
                raise InvalidDataError(f"{len(overlap)} id(s) are in both the forget and the retain set: {overlap[:20].tolist()}")
        use_retain = module._overrides("retain_step") and retain is not None and len(retain) > 0
        if module._overrides("retain_step") and not use_retain:
            raise InvalidDataError(f"{type(module).__name__} defines retain_step but no retain_data was given")
        val = None if val_data is None else as_id_dataset(val_data)
        model = module.model
        if self.config.gradient_checkpointing:
            require_checkpointing(model)
        if self.device is not None:
            model.to(self.device)
        module.task = get_task(task, model)
        module.trainer = self
        check_model_fits(model, module.task, forget)
        hash_before = model_hash(model)
        seed_everything(self.seed)
        self.should_stop, self.current_epoch, self.global_step = False, 0, 0
        timings: dict[str, float] = {}
        start = time.perf_counter()
        if coreset is None:
            if self.selector is None or (self.k is None and self.fraction in (None, 1.0)):
                coreset = Coreset.full(forget)
            else:
                coreset = self.selector.select(
                    model, forget, task=module.task, k=self.k, fraction=self.fraction, seed=self.seed, retain=retain
                )
        unknown = np.setdiff1d(coreset.ids, forget.ids)
        if len(unknown):
            raise InvalidDataError(f"coreset ids not in the forget set: {unknown[:20].tolist()}")
        timings["select"] = time.perf_counter() - start
        ctx = UnlearnContext(
            model=model, task=module.task, forget=forget.subset(coreset.ids), retain=retain, device=model_device(model),
            seed=self.seed, full_forget=forget, forget_weights=coreset.weight_map(),
        )
        strategy = _ModuleStrategy(module, use_retain)
        runner = LocalRunner(self.config)
        forget_loader, retain_loader = runner.loaders(strategy, ctx)
        executor = _HookedExecutor(self, module, strategy, ctx, self.config)
        report = RunReport()
        history: list[dict[str, float]] = []
        best_value: float | None = None
        best: dict[str, float] = {}
        best_state: dict[str, torch.Tensor] | None = None
        waited = 0
        unlearn_start = time.perf_counter()
        self._fire("on_fit_start", module)
        for epoch in range(self.epochs):
            self.current_epoch = epoch + 1
            self._fire("on_epoch_start", module, epoch=epoch + 1)
            strategy._batch_idx = 0
            one_epoch = LocalRunner(replace(self.config, epochs=epoch + 1))
            with activation_checkpointing(model, self.config.gradient_checkpointing):
                one_epoch.run_epochs(strategy, ctx, executor, forget_loader, retain_loader, start_epoch=epoch, report=report)
            self.global_step = executor.global_step
            entry = report.history[-1] if len(report.history) == len(history) + 1 else {"epoch": float(epoch + 1)}
            if executor.scheduler is not None:
                executor.scheduler.step()
            if self.validate_every is not None and (epoch + 1) % self.validate_every == 0:
                metrics = self.validate(module, ctx, val)
                entry.update(metrics)
                self._fire("on_validation_end", module, metrics=metrics)
                monitor = self._monitored(metrics)
                if monitor in metrics:
                    value = metrics[monitor]
                    if self._improved(value, best_value):
                        best_value, waited = value, 0
                        best = {"epoch": float(epoch + 1), "value": value}
                        if self.restore_best:
                            best_state = copy.deepcopy(model.state_dict())
                    else:
                        waited += 1
                    if self.early_stopping_patience is not None and waited >= self.early_stopping_patience:
                        report.stopped = (
                            f"early stopping at epoch {epoch + 1}: {self.monitor} did not improve for {waited} "
                            f"validation(s) (best {best_value:.4g} at epoch {int(best['epoch'])})"
                        )
                elif self.early_stopping_patience is not None:
                    raise InvalidConfigError(f"monitor {self.monitor!r} is not among the validation metrics {sorted(metrics)}")
            history.append(entry)
            self._fire("on_epoch_end", module, epoch=epoch + 1, logs=entry)
            if self.should_stop and report.stopped == "completed":
                report.stopped = f"stopped by a callback at epoch {epoch + 1}"
            if report.stopped != "completed":
                break
        if self.restore_best and best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        timings["unlearn"] = time.perf_counter() - unlearn_start
        timings["total"] = time.perf_counter() - start
        result = TrainerResult(
            model=model,
            coreset=coreset,
            timings=timings,
            config=self.describe(module, len(forget)),
            report=report,
            model_hash_before=hash_before,
            model_hash_after=model_hash(model),
            history=history,
            best=best,
        )
        self._fire("on_fit_end", module, result=result)
        return result

    def describe(self, module: UnlearningModule, n_forget: int | None = None) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "module": type(module).__name__,
            "module_params": dict(module.hparams),
            "selector": None if self.selector is None else self.selector.name,
            "fraction": self.fraction,
            "k": self.k,
            "n_forget": n_forget,
            "task": None if module.task is None else module.task.name,
            "seed": self.seed,
            "validate_every": self.validate_every,
            "early_stopping_patience": self.early_stopping_patience,
            "monitor": self.monitor,
            "mode": self.mode,
            "runner": asdict(self.config),
        }


__all__ = ["AttributeDict", "Callback", "MONITOR_ALIASES", "NOT_TRAINER_SETTINGS", "TRAINER_KEYWORDS", "TrainerResult", "UnlearningModule",
           "UnlearningTrainer"]
