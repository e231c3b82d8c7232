"""Amnesiac unlearning (Graves, Nagisetty & Ganesh, AAAI 2021, "Amnesiac Machine Learning"): undo the parameter
updates of every training batch that held a forget sample; without a training log, the paper's
unlearning-by-relabelling variant."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch
from torch import nn

from erasus_ray.data import Batch, as_id_dataset, make_loader
from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.strategies.base import STRATEGIES, Strategy, UnlearnContext, weighted_mean
from erasus_ray.strategies.random_label import wrong_targets
from erasus_ray.tasks import Capability, Task, TaskOutput
from erasus_ray.training import TrainRecipe, make_optimizer
from erasus_ray.utils import model_device, model_hash, seed_everything

if TYPE_CHECKING:
    from erasus_ray.runners.local import LocalRunner, RunReport


@dataclass
class AmnesiacLog:
    """Per-batch parameter updates recorded during training, with the ids of every batch.

    Attributes:
        param_names / shapes: the trainable parameters the updates are for (checked against the model).
        batch_ids: the ids of every training batch, in training order.
        updates: for each batch, ``{name: theta_after - theta_before}``, or None where the batch held no watched id.
        watch_ids: ids whose batches were recorded (None: every batch).
        final_hash: :func:`~erasus_ray.utils.model_hash` of the model when training ended.
    """

    param_names: list[str]
    shapes: list[tuple[int, ...]]
    batch_ids: list[np.ndarray] = field(default_factory=list)
    updates: list[dict[str, torch.Tensor] | None] = field(default_factory=list)
    watch_ids: np.ndarray | None = None
    final_hash: str = ""

    def batches_with(self, ids: Iterable[int]) -> list[int]:
        """Positions of the batches that contain any of ``ids``."""
        wanted = np.asarray(list(ids), dtype=np.int64)
        return [t for t, b in enumerate(self.batch_ids) if np.isin(b, wanted).any()]

    def __repr__(self) -> str:  # the log is a strategy hyperparameter: keep configs and JSON readable
        recorded = sum(u is not None for u in self.updates)
        return f"AmnesiacLog(batches={len(self.batch_ids)}, recorded={recorded}, params={len(self.param_names)})"


class AmnesiacRecorder:
    """Records what each optimizer step changed: call :meth:`before_step` before ``optimizer.step()`` (or before the
    batch) and :meth:`after_step` with the batch's ids after it; :meth:`finish` closes the log.

    ``watch_ids``: record the update only for batches that contain one of these ids (the paper's practical setting:
    keep the updates of batches with data that may have to be forgotten); None records every batch.
    Memory: one parameter-sized tensor per recorded batch.
    """

    def __init__(self, model: nn.Module, watch_ids: Iterable[int] | None = None) -> None:
        self.model = model
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.watch = None if watch_ids is None else np.unique(np.asarray(list(watch_ids), dtype=np.int64))
        self.log = AmnesiacLog(
            param_names=list(self.params), shapes=[tuple(p.shape) for p in self.params.values()], watch_ids=self.watch
        )
        self._before: dict[str, torch.Tensor] | None = None

    def _watched(self, ids: np.ndarray) -> bool:
        return self.watch is None or bool(np.isin(ids, self.watch).any())

    def before_step(self, batch_ids: Iterable[int] | torch.Tensor | None = None) -> None:
        ids = None if batch_ids is None else _as_ids(batch_ids)
        if ids is None or self._watched(ids):
            self._before = {n: p.detach().clone() for n, p in self.params.items()}
        else:
            self._before = None

    def after_step(self, batch_ids: Iterable[int] | torch.Tensor) -> None:
        ids = _as_ids(batch_ids)
        self.log.batch_ids.append(ids)
        if self._watched(ids):
            if self._before is None:
                raise InvalidConfigError("AmnesiacRecorder.after_step without before_step for a watched batch")
            self.log.updates.append({n: (p.detach() - self._before[n]).cpu() for n, p in self.params.items()})
        else:
            self.log.updates.append(None)
        self._before = None

    def finish(self) -> AmnesiacLog:
        self.log.final_hash = model_hash(self.model)
        return self.log


def _as_ids(ids: Iterable[int] | torch.Tensor) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        return ids.detach().cpu().numpy().astype(np.int64).reshape(-1)
    return np.asarray(list(ids), dtype=np.int64).reshape(-1)


def train_with_amnesiac_log(
    model: nn.Module, dataset: Any, task: Task, recipe: TrainRecipe, *, watch_ids: Iterable[int] | None = None
) -> AmnesiacLog:
    """Train ``model`` in place exactly as :func:`erasus_ray.training.train_model` does (same seeding, loader and
    optimizer, so the same weights) while recording an :class:`AmnesiacLog`."""
    data = as_id_dataset(dataset)
    seed_everything(recipe.seed)
    device = model_device(model)
    loader = make_loader(data, task.collate, batch_size=recipe.batch_size, shuffle=True, seed=recipe.seed)
    opt = make_optimizer(recipe.optimizer, [p for p in model.parameters() if p.requires_grad], recipe.lr, recipe.weight_decay)
    recorder = AmnesiacRecorder(model, watch_ids)
    model.train()
    for _ in range(recipe.epochs):
        for batch in loader:
            batch = batch.to(device)
            loss = task.forward(model, batch.data).sample_loss().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            recorder.before_step(batch.ids)
            opt.step()
            recorder.after_step(batch.ids)
    model.eval()
    return recorder.finish()


@STRATEGIES.register("amnesiac")
class Amnesiac(Strategy):
    """Subtract the recorded updates of every batch that held a forget id, then optionally fine-tune on retain.

    With ``log`` (an :class:`AmnesiacLog` from :func:`train_with_amnesiac_log` or an :class:`AmnesiacRecorder`):
    ``theta <- theta - sum_{t : B_t contains a forget id} Delta_t`` (the paper's amnesiac unlearning), then
    ``finetune_epochs`` epochs of plain training on the retain set (Adam, ``finetune_lr``, batch
    ``finetune_batch_size``, seeded) to repair what the removed updates also carried - the paper follows amnesiac
    unlearning with "a small amount of retraining". Later updates built on the removed ones are kept; the paper
    accepts that approximation. The log must match the model (same trainable parameter names and shapes, and, with
    ``strict``, the model must be the one the log ended with), and every batch holding a forget id must have been
    recorded; otherwise :class:`InvalidDataError`.

    Without a log: the paper's other variant, unlearning by relabelling - fine-tune the forget samples toward fixed
    random wrong labels (drawn once per sample from the seed) while fitting the retain set,
    ``loss = CE(f(x_f), y~) + alpha * CE(f(x_r), y_r)``, run by the runner (``lr`` / ``epochs``). The fallback is
    named in a ``UserWarning`` and in ``report.info["variant"]``.

    Choices: the whole forget set is used with a log (every batch with a forget id must go), the coreset for the
    relabelling fallback; defaults of the fallback are those of ``random_label`` (lr 1e-3, 30 epochs, alpha 10).

    Measured on digits (30-epoch recipe, batch 64; gold model forget/retain/test 0.000/0.998/0.869 for class 3):
    class 3 is in every one of the 690 batches, so subtraction undoes all of training (forget/retain 0.000/0.139,
    the paper's caveat: amnesiac unlearning suits data confined to few batches) and the default 5-epoch fine-tune
    brings retain/test back to 0.957/0.844 (2 epochs: 0.893/0.786). A random 10% is in 687 of 690 batches: the same
    happens (forget/retain/test 0.917/0.951/0.931 after the fine-tune; gold 0.972/0.998/0.967). The relabelling
    fallback on class 3: 0.000/0.996/0.867.

    Cost: one parameter-sized subtraction per affected batch, plus the fine-tune (``finetune_epochs`` x retain).
    Recording costs one parameter copy per recorded batch in memory.

    Example:
        >>> log = train_with_amnesiac_log(model, train, task, recipe)
        >>> ErasusUnlearner(model, strategy="amnesiac", selector=None, log=log).fit(forget_data=f, retain_data=r)
    """

    #: relabels forget units with wrong targets (logits over classes/tokens).
    requires = frozenset({Capability.LOGITS})

    needs_retain = True
    default_lr = 1e-3
    default_epochs = 30

    def __init__(
        self,
        log: AmnesiacLog | AmnesiacRecorder | None = None,
        finetune_epochs: int = 5,
        finetune_lr: float = 1e-3,
        finetune_batch_size: int = 64,
        alpha: float = 10.0,
        strict: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(log, AmnesiacRecorder):
            log = log.log
        if log is not None and not isinstance(log, AmnesiacLog):
            raise InvalidConfigError(f"{self.name}: log must be an AmnesiacLog or AmnesiacRecorder, got {type(log).__name__}")
        self.log = log
        if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
            raise InvalidConfigError(f"{self.name}: finetune_epochs must be an integer >= 0, got {finetune_epochs!r}")
        self.finetune_epochs = finetune_epochs
        self.finetune_lr = self.check_range("finetune_lr", finetune_lr, 0.0, 10.0, low_open=True)
        self.finetune_batch_size = int(self.check_range("finetune_batch_size", finetune_batch_size, 1, 1e9))
        self.alpha = self.check_range("alpha", alpha, 0.0, 1e6)
        self.strict = bool(strict)

    def driver_only(self) -> str | None:
        if self.log is None:
            return None  # the relabelling fallback is a loss the runner drives
        return "with a training log the logged updates are subtracted and the retain fine-tuning runs in the calling process"

    # --- with a training log -------------------------------------------------------------------------------
    def check_log(self, model: nn.Module, log: AmnesiacLog) -> dict[str, nn.Parameter]:
        """The model's trainable parameters, after checking that the log was recorded for this model."""
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        shapes = {n: tuple(p.shape) for n, p in params.items()}
        logged = dict(zip(log.param_names, log.shapes))
        if shapes != logged:
            missing, extra = sorted(set(logged) - set(shapes)), sorted(set(shapes) - set(logged))
            wrong = sorted(n for n in set(shapes) & set(logged) if shapes[n] != logged[n])
            raise InvalidDataError(
                f"amnesiac log does not match the model: parameters in the log but not the model {missing[:5]}, "
                f"in the model but not the log {extra[:5]}, different shapes {wrong[:5]}"
            )
        if len(log.updates) != len(log.batch_ids):
            raise InvalidDataError(f"amnesiac log is corrupt: {len(log.batch_ids)} batches but {len(log.updates)} update slots")
        if self.strict and log.final_hash and model_hash(model) != log.final_hash:
            raise InvalidDataError(
                "amnesiac log was recorded for a different model state (its final hash differs from this model's); "
                "the updates can only be subtracted from the model the log ended with (strict=False to override)"
            )
        return params

    @torch.no_grad()
    def subtract(self, model: nn.Module, log: AmnesiacLog, forget_ids: Iterable[int]) -> list[int]:
        """``theta -= sum of the updates of the batches holding a forget id``; returns those batch positions."""
        params = self.check_log(model, log)
        affected = log.batches_with(forget_ids)
        unrecorded = [t for t in affected if log.updates[t] is None]
        if unrecorded:
            raise InvalidDataError(
                f"amnesiac log did not record {len(unrecorded)} batch(es) that hold forget ids (e.g. batch {unrecorded[0]}); "
                "record with watch_ids covering every id that may be deleted"
            )
        for name, p in params.items():
            total = torch.zeros_like(p, device="cpu")
            for t in affected:
                total += log.updates[t][name]  # type: ignore[index]
            p.sub_(total.to(p.device, p.dtype))
        return affected

    def finetune(self, ctx: UnlearnContext) -> int:
        """``finetune_epochs`` epochs of plain training on the retain set; returns the steps taken."""
        if self.finetune_epochs == 0 or ctx.retain is None or len(ctx.retain) == 0:
            return 0
        model = ctx.model
        loader = make_loader(ctx.retain, ctx.task.collate, batch_size=self.finetune_batch_size, shuffle=True, seed=ctx.seed)
        opt = make_optimizer("adam", [p for p in model.parameters() if p.requires_grad], self.finetune_lr)
        steps = 0
        model.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            for _ in range(self.finetune_epochs):
                for batch in loader:
                    batch = batch.to(ctx.device)
                    loss = ctx.forward(batch).sample_loss().mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    steps += 1
        model.eval()
        return steps

    # --- without: relabelling -----------------------------------------------------------------------------------
    def setup(self, ctx: UnlearnContext) -> None:
        ctx.state["amnesiac_offsets"] = {}

    def loss(self, ctx: UnlearnContext, forget: Batch | None, retain: Batch | None) -> tuple[torch.Tensor, dict[str, Any]]:
        assert forget is not None
        out = ctx.forward(forget)
        wrong = wrong_targets(out, forget.ids, ctx.seed, ctx.state.get("amnesiac_offsets"))
        relabel_loss = weighted_mean(TaskOutput(out.logits, wrong, out.owner, out.batch_size).sample_loss(), forget)
        retain_loss = ctx.forward(retain).sample_loss().mean() if retain is not None and self.alpha > 0 else relabel_loss.new_zeros(())
        logs = {"relabel_loss": relabel_loss.detach(), "forget_loss": weighted_mean(out.sample_loss(), forget).detach(), "retain_loss": retain_loss.detach()}
        return relabel_loss + self.alpha * retain_loss, logs

    def finish(self, ctx: UnlearnContext) -> None:
        ctx.state.pop("amnesiac_offsets", None)

    def unlearn(self, ctx: UnlearnContext, runner: "LocalRunner") -> "RunReport":
        from erasus_ray.runners.local import RunReport

        if self.log is None:
            warnings.warn(
                "amnesiac: no training log given (log=...), so the paper's unlearning-by-relabelling variant runs "
                "instead of update subtraction",
                UserWarning,
                stacklevel=2,
            )
            report = runner.run(self, ctx)
            report.info["variant"] = "relabel_fallback"
            report.info["reason"] = "no training log: random wrong labels on the forget set + retain steps"
            return report
        forget = ctx.full_forget if ctx.full_forget is not None else ctx.forget
        affected = self.subtract(ctx.model, self.log, forget.ids)
        steps = self.finetune(ctx)
        ctx.model.eval()
        n_retain = 0 if ctx.retain is None else len(ctx.retain)
        return RunReport(
            steps=len(affected) + steps,
            epochs=self.finetune_epochs if steps else 0,
            forget_samples=0,
            retain_samples=self.finetune_epochs * n_retain if steps else 0,
            info={
                "variant": "update_subtraction",
                "batches_subtracted": len(affected),
                "batches_logged": len(self.log.batch_ids),
                "finetune_steps": steps,
            },
        )
