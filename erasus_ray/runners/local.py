"""The in-process runner: executes a loss-based strategy with paired forget/retain steps.

The step logic (:class:`StepExecutor`) is separate from the loop that feeds it (:class:`LocalRunner`), so the
Ray Train and Flower runners reuse the same step on their own shards.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from erasus_ray.training import make_optimizer
from erasus_ray.data import Batch, check_finite_batch, make_loader
from erasus_ray.errors import InvalidConfigError, NonFiniteLossError, NonFiniteWeightsError
from erasus_ray.runner_io import RunnerConfig, RunReport  # re-exported: imported from here (and runners) before
from erasus_ray.strategies.base import Strategy, UnlearnContext


#: The phase of a loss that names none (see :meth:`~erasus_ray.strategies.Strategy.step_losses`).
MAIN_PHASE = "main"


def _cycle(loader: DataLoader, reseed: Callable[[int], None] | None = None) -> Iterator[Batch]:
    """The loader's batches, pass after pass (``reseed(k)`` before pass ``k``); ends at once on an empty loader."""
    epoch = 0
    while True:
        if reseed is not None:
            reseed(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            return
        epoch += 1


class StepExecutor:
    """One runner step of a strategy on a (forget batch, retain batch) pair: one optimizer step per loss the
    strategy yields (usually one). Where it runs is not its concern."""

    def __init__(
        self,
        strategy: Strategy,
        ctx: UnlearnContext,
        config: RunnerConfig,
        grad_sync: Callable[[list[torch.nn.Parameter]], None] | None = None,
    ) -> None:
        self.strategy = strategy
        self.grad_sync = grad_sync
        self.ctx = ctx
        self.config = config
        self.params = [p for p in ctx.model.parameters() if p.requires_grad]
        if not self.params:
            raise InvalidConfigError("the model has no trainable parameters")
        self.optimizer = make_optimizer(config.optimizer, self.params, config.lr)
        self.phase_optimizers: dict[str, torch.optim.Optimizer] = {}
        use_bf16 = config.precision == "bf16-mixed"
        self._autocast = (
            (lambda: torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16))
            if use_bf16
            else contextlib.nullcontext
        )

    def step(self, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        """One runner step: for each loss of :meth:`Strategy.step_losses` (usually one), compute it, check it,
        backpropagate, check the gradients and take an optimizer step (that of the loss's phase). Raises
        NonFiniteLossError *before* touching the weights if a loss or its gradient norm is NaN/inf (earlier
        optimizer steps of the same runner step stay applied: they were good). Logs: the strategy's, plus ``loss``
        (the sum of the step's losses)."""
        # NaN/inf inputs are the data's fault, not the run's: an InvalidDataError, not a non-finite-loss stop. Not in
        # data-parallel workers: one worker raising alone would leave the others waiting in the all-reduce (there the
        # synchronised gradient-norm check stops every worker alike).
        for batch, name in ((forget, "forget_data"), (retain, "retain_data")):
            if batch is not None and self.grad_sync is None:
                check_finite_batch(batch, name)
        ctx = self.ctx
        ctx.model.train()
        total, logs = 0.0, {}
        losses = self.strategy.step_losses(ctx, forget, retain)
        while True:
            with self._autocast():
                item = next(losses, None)
            if item is None:
                break
            loss, step_logs, *phase = item
            self._apply(loss, self.optimizer_for(phase[0] if phase else MAIN_PHASE))
            total += float(loss.detach())
            logs.update({k: float(v) for k, v in step_logs.items()})
        return {"loss": total, **logs}

    def optimizer_for(self, phase: str) -> torch.optim.Optimizer:
        """``self.optimizer`` for the main phase; another phase's own optimizer of the same kind, made on first use.

        Per-phase state matters for alternating objectives: with one shared Adam, SCRUB's max-step gradients
        enter the min-step's moment estimates and back, and on digits class 3 seed 2 the max-steps then end at
        forget accuracy 0.99 (separate states: 0.00)."""
        if phase == MAIN_PHASE:
            return self.optimizer
        if phase not in self.phase_optimizers:
            self.phase_optimizers[phase] = make_optimizer(self.config.optimizer, self.params, self.config.lr)
        return self.phase_optimizers[phase]

    def descend(self, loss: torch.Tensor, phase: str = MAIN_PHASE) -> None:
        """One checked optimizer step (that of ``phase``) on an extra ``loss`` outside the strategy's own, e.g. the
        closed loop's retain-descent step after a utility-guard trip."""
        self._apply(loss, self.optimizer_for(phase))

    def set_lr(self, lr: float) -> None:
        """Change every optimizer's learning rate, keeping its state (the closed loop's step-size search)."""
        self.config.lr = float(lr)
        for opt in (self.optimizer, *self.phase_optimizers.values()):
            for group in opt.param_groups:
                group["lr"] = float(lr)

    def optimizer_state(self) -> dict[str, Any]:
        """Every optimizer's state (for checkpoints)."""
        return {MAIN_PHASE: self.optimizer.state_dict(), **{k: o.state_dict() for k, o in self.phase_optimizers.items()}}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        for phase, value in state.items():
            self.optimizer_for(phase).load_state_dict(value)

    def _apply(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        # Data-parallel workers must all reach the gradient all-reduce, so there a NaN loss is caught by the
        # (synchronised) gradient-norm check below, which every worker then sees alike.
        if self.grad_sync is None and not torch.isfinite(loss):
            raise NonFiniteLossError(f"non-finite loss ({loss.item()})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_sync is not None:  # data-parallel workers average gradients here (see runners.ray_train)
            self.grad_sync(self.params)
        self.strategy.before_step(self.ctx)
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if not torch.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            what = "loss" if not torch.isfinite(loss) else "gradient norm"
            raise NonFiniteLossError(f"non-finite {what} ({(loss if what == 'loss' else norm).item()})")
        optimizer.step()
        if not all_finite(self.params):  # one read of the trainable weights per step: cheap next to the backward
            raise NonFiniteWeightsError(
                f"the weights became NaN/inf after an optimizer step (lr={self.config.lr}, optimizer="
                f"{self.config.optimizer!r}, grad_clip={self.config.grad_clip}); lower lr or set grad_clip"
            )


@torch.no_grad()
def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite; one host sync per device."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all(bool(torch.stack(flags).all()) for flags in by_device.values())


@torch.no_grad()
def coreset_accuracy(ctx: UnlearnContext, loader: DataLoader) -> float:
    ctx.model.eval()
    correct, total = 0.0, 0
    for batch in loader:
        out = ctx.forward(batch.to(ctx.device))
        acc = out.sample_accuracy()
        correct += float(acc.sum())
        total += acc.numel()
    return correct / max(total, 1)


class LocalRunner:
    """Runs a strategy in this process: epochs over the coreset, paired retain steps, early stop, NaN guard."""

    #: whether steps run in other processes (strategies that compute on the driver are refused there)
    distributed: bool = False

    def __init__(self, config: RunnerConfig | None = None) -> None:
        self.config = (config or RunnerConfig()).validate()

    def loaders(self, strategy: Strategy, ctx: UnlearnContext) -> tuple[DataLoader, DataLoader | None]:
        cfg = self.config
        forget_loader = make_loader(
            ctx.forget, ctx.task.collate, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, weights=ctx.forget_weights
        )
        retain_loader = None
        if strategy.needs_retain and ctx.retain is not None and len(ctx.retain):
            retain_loader = make_loader(
                ctx.retain, ctx.task.collate, batch_size=cfg.retain_batch_size or cfg.batch_size, shuffle=True, seed=cfg.seed + 1
            )
        return forget_loader, retain_loader

    def run(self, strategy: Strategy, ctx: UnlearnContext, *,
            on_epoch_end: Callable[[int, RunReport], None] | None = None) -> RunReport:
        """Set up, run the epochs (``on_epoch_end(epoch, report)`` after each, e.g. a sweep's per-epoch report),
        finish."""
        forget_loader, retain_loader = self.loaders(strategy, ctx)
        # setup first (as the Ray Train runner does): it may add trainable parameters (LoRA adapters, masks)
        # or freeze some, and the optimizer must see the result
        strategy.setup(ctx)
        executor = StepExecutor(strategy, ctx, self.config)
        report = self.run_epochs(strategy, ctx, executor, forget_loader, retain_loader, on_epoch_end=on_epoch_end)
        strategy.finish(ctx)
        ctx.model.eval()
        return report

    def run_epochs(
        self,
        strategy: Strategy,
        ctx: UnlearnContext,
        executor: StepExecutor,
        forget_loader: DataLoader,
        retain_loader: DataLoader | None,
        *,
        start_epoch: int = 0,
        report: RunReport | None = None,
        steps_per_epoch: int | None = None,
        on_epoch_end: Callable[[int, RunReport], None] | None = None,
    ) -> RunReport:
        """The epoch loop shared by every runner.

        Each epoch reseeds the loaders' shuffling with ``(seed, epoch)``, so a run resumed at epoch ``e`` sees the
        same forget order as an uninterrupted one; the retain stream, which cycles across epochs, is replayed
        (data loading only, no forward pass) through the ``e`` finished epochs, so the resumed run also pairs the
        same retain batches. ``steps_per_epoch`` (default: one pass over the forget loader) lets data-parallel
        workers with unequal shards take the same number of synchronised steps. Before every step the runner sets
        ``ctx.epoch``, ``ctx.step`` and ``ctx.total_steps``.
        """
        cfg = self.config
        report = report or RunReport()
        per_epoch = steps_per_epoch or len(forget_loader)
        retain_iter = _cycle(retain_loader) if retain_loader is not None else None
        total = cfg.epochs * per_epoch
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        ctx.total_steps = total

        def reseed(epoch: int) -> None:
            for loader, offset in ((forget_loader, 0), (retain_loader, 1)):
                generator = getattr(loader, "generator", None)
                if generator is not None:
                    generator.manual_seed(cfg.seed * 100_003 + epoch * 2 + offset)

        if retain_iter is not None:
            for epoch in range(start_epoch):  # replay what the finished epochs drew from the retain stream
                reseed(epoch)
                for _ in range(min(per_epoch, max(0, total - epoch * per_epoch))):
                    next(retain_iter)
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=min(report.steps, total), desc=f"unlearn[{strategy.name}]", leave=False, disable=None)
        try:
            for epoch in range(start_epoch, cfg.epochs):
                reseed(epoch)
                ctx.epoch = epoch
                sums: dict[str, float] = {}
                n = 0
                forget_iter = _cycle(forget_loader)
                for _ in range(per_epoch):
                    if cfg.max_steps is not None and report.steps >= cfg.max_steps:
                        break
                    forget = next(forget_iter)
                    retain = next(retain_iter) if retain_iter is not None else None
                    ctx.step = report.steps
                    logs = executor.step(forget.to(ctx.device), None if retain is None else retain.to(ctx.device))
                    report.steps += 1
                    report.forget_samples += len(forget)
                    report.retain_samples += 0 if retain is None else len(retain)
                    for k, v in logs.items():
                        sums[k] = sums.get(k, 0.0) + v
                    n += 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{logs['loss']:.3f}")
                report.epochs = epoch + 1
                entry = {"epoch": epoch + 1, **{k: v / max(n, 1) for k, v in sums.items()}}
                if cfg.forget_target is not None:
                    entry["coreset_acc"] = coreset_accuracy(ctx, forget_loader)
                report.history.append(entry)
                if cfg.forget_target is not None and entry["coreset_acc"] <= cfg.forget_target:
                    report.stopped = f"forget_target reached at epoch {epoch + 1}"
                elif cfg.max_steps is not None and report.steps >= cfg.max_steps:
                    report.stopped = f"max_steps={cfg.max_steps} reached"
                if on_epoch_end is not None:
                    on_epoch_end(epoch + 1, report)
                if report.stopped != "completed":
                    break
        except NonFiniteLossError as err:
            report.stopped = f"stopped at step {report.steps + 1}: {err}; kept the weights of the last good step"
            warnings.warn(f"{strategy.name}: {report.stopped}", RuntimeWarning, stacklevel=2)
        finally:
            if bar is not None:
                bar.close()
        return report
