"""``ensemble``: run several strategies from the same starting weights, then average the results (a "model soup",
Wortsman et al., ICML 2022) or keep the best one on a validation metric."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from erasus_ray.data import make_loader
from erasus_ray.errors import InvalidConfigError
from erasus_ray.strategies._meta import MetaReport, Stage, _MetaBase, make_stages, merge_reports, run_stage
from erasus_ray.strategies.base import STRATEGIES, UnlearnContext
from erasus_ray.tasks import Capability

if TYPE_CHECKING:
    from erasus_ray.runners.local import LocalRunner

#: What the built-in validation metrics read (per-sample accuracy).
SELECT_METRIC_NEEDS = frozenset({Capability.LOGITS})

#: Validation metric of ``mode="select"``: ``(model, ctx) -> float``, higher is better.
Metric = Callable[[nn.Module, UnlearnContext], float]


@torch.no_grad()
def accuracy_on(model: nn.Module, ctx: UnlearnContext, ids: np.ndarray, which: str) -> float:
    """Mean per-sample accuracy of ``model`` on ``ids`` of the forget (full forget set) or retain data."""
    data = (ctx.full_forget if ctx.full_forget is not None else ctx.forget) if which == "forget" else ctx.retain
    if data is None or len(ids) == 0:
        return float("nan")
    model.eval()
    correct, total = 0.0, 0
    for batch in make_loader(data.subset(ids), ctx.task.collate, batch_size=256):
        acc = ctx.task.forward(model, batch.to(ctx.device).data).sample_accuracy()
        correct += float(acc.sum())
        total += acc.numel()
    return correct / max(total, 1)


def _validation_ids(ctx: UnlearnContext, val_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``val_size`` forget ids (from the full forget set) and retain ids, drawn with the run's seed."""
    rng = np.random.default_rng(ctx.seed)
    forget = (ctx.full_forget if ctx.full_forget is not None else ctx.forget).ids
    retain = np.empty(0, dtype=np.int64) if ctx.retain is None else ctx.retain.ids
    pick = lambda ids: np.sort(rng.choice(np.sort(ids), size=min(val_size, len(ids)), replace=False)) if len(ids) else ids
    return pick(forget), pick(retain)


def retain_minus_forget(model: nn.Module, ctx: UnlearnContext) -> float:
    """Retain accuracy minus forget accuracy on the validation ids (see :class:`Ensemble`)."""
    f_ids, r_ids = ctx.state["ensemble_val_ids"]
    retain = accuracy_on(model, ctx, r_ids, "retain")
    forget = accuracy_on(model, ctx, f_ids, "forget")
    return (0.0 if np.isnan(retain) else retain) - forget


def retain_acc(model: nn.Module, ctx: UnlearnContext) -> float:
    _, r_ids = ctx.state["ensemble_val_ids"]
    return accuracy_on(model, ctx, r_ids, "retain")


def forget_drop(model: nn.Module, ctx: UnlearnContext) -> float:
    f_ids, _ = ctx.state["ensemble_val_ids"]
    return -accuracy_on(model, ctx, f_ids, "forget")


METRICS: dict[str, Metric] = {"retain_minus_forget": retain_minus_forget, "retain_acc": retain_acc, "forget_drop": forget_drop}


def average_states(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of floating-point tensors; other tensors (e.g. BatchNorm's ``num_batches_tracked``) are taken
    from the first state."""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    w = w / w.sum()
    out: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            acc = sum(wi * s[key].to(torch.float64) for wi, s in zip(w.tolist(), states))
            out[key] = acc.to(first.dtype)
        else:
            out[key] = first.clone()
    return out


@STRATEGIES.register("ensemble")
class Ensemble(_MetaBase):
    """Run every member strategy from the same starting weights, then combine the unlearned models.

    ``mode="average"`` loads the (weighted) mean of the members' weights - the uniform "model soup" of Wortsman
    et al., ICML 2022, "Model soups: averaging weights of multiple fine-tuned models improves accuracy without
    increasing inference time". It is the closest published idea: soups average models fine-tuned from *one*
    starting point, which stay in one linearly connected basin (Frankle et al., ICML 2020), and the members here
    are exactly that - short unlearning runs from the same trained weights. Averaging can dilute forgetting when
    members disagree, so check the forget metric (the tests and the measurement below do). ``mode="select"``
    keeps the member with the best validation metric (the soups paper's "best individual model" baseline).

    Args:
        members: strategies as in :class:`~erasus_ray.strategies.pipeline.StrategyPipeline` (names, ``(name,
            {kwargs})`` pairs with hyperparameters and runner settings, or instances). Default ``("grad_diff",
            "npo")``. Measured on digits (seed 0, full forget set; forget / retain / test accuracy): class 3
            removed, average 0.000 / 0.988 / 0.861 and select (picks grad_diff) 0.000 / 0.994 / 0.861, gold 0.000 /
            0.998 / 0.869; random 10%, average 0.632 / 0.840 / 0.808 and select (picks npo) 0.486 / 0.680 / 0.628,
            gold 0.972 / 0.998 / 0.967 - on random forgetting both members overshoot (grad_diff alone: 0.792 /
            0.957 / 0.906), and so does their soup.
        mode: ``"average"`` or ``"select"``.
        weights: per-member weights of the average (default equal).
        metric: for ``select``: ``"retain_minus_forget"`` (default: retain accuracy minus forget accuracy - right
            when the gold model's forget accuracy is near 0, e.g. a removed class; for a random forget set, whose
            gold accuracy is near test accuracy, pass your own), ``"retain_acc"``, ``"forget_drop"``, or a
            callable ``(model, ctx) -> float`` (higher is better; ``ctx.state["ensemble_val_ids"]`` holds the
            forget and retain validation ids).
        val_size: at most this many forget and retain samples are scored per member in ``select`` mode, drawn
            with the run's seed.

    Cost: the sum of the members' runs, plus (select) one forward pass over ``2 * val_size`` samples per member.
    Members run one after another on copies of the starting model; memory holds one extra model per member.

    Example:
        >>> result = ErasusUnlearner(model, strategy="ensemble", members=["grad_diff", "npo"], selector=None).fit(
        ...     forget_data=f, retain_data=r)
        >>> result.report.choice["mode"], [s["strategy"] for s in result.report.stages]
        ('average', ['grad_diff', 'npo'])
    """

    #: nothing of its own: requirements() is the union of its members' (and logits for mode='select').
    requires = frozenset({Capability.LOSS})

    def __init__(
        self,
        members: Sequence[Any] = ("grad_diff", "npo"),
        mode: str = "average",
        weights: Sequence[float] | None = None,
        metric: str | Metric = "retain_minus_forget",
        val_size: int = 512,
    ) -> None:
        super().__init__()
        if isinstance(members, (str, bytes)):
            raise InvalidConfigError("ensemble: members must be a list of strategies, not one name")
        self._members: list[Stage] = make_stages(members, owner="ensemble")
        if mode not in ("average", "select"):
            raise InvalidConfigError(f"ensemble: mode must be 'average' or 'select', got {mode!r}")
        self.mode = mode
        if weights is not None:
            weights = [float(w) for w in weights]
            if len(weights) != len(self._members):
                raise InvalidConfigError(f"ensemble: {len(weights)} weights for {len(self._members)} members")
            if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
                raise InvalidConfigError(f"ensemble: weights must be non-negative and not all zero, got {weights}")
        self.weights = weights
        if isinstance(metric, str) and metric not in METRICS:
            raise InvalidConfigError(f"ensemble: metric must be one of {sorted(METRICS)} or a callable, got {metric!r}")
        if not isinstance(metric, str) and not callable(metric):
            raise InvalidConfigError(f"ensemble: metric must be a name or a callable, got {metric!r}")
        self.metric = metric
        if int(val_size) != val_size or val_size < 1:
            raise InvalidConfigError(f"ensemble: val_size must be a positive integer, got {val_size!r}")
        self.val_size = int(val_size)
        inner = [m.strategy for m in self._members]
        self.needs_retain = any(s.needs_retain for s in inner)
        self.uses_forget = any(s.uses_forget for s in inner)

    @property
    def members(self) -> list[Stage]:
        return list(self._members)

    def inner_stages(self) -> list[Stage]:
        return list(self._members)

    def requirements(self) -> frozenset[Capability]:
        """The members' requirements; ``mode="select"`` with a built-in metric also reads accuracies (logits)."""
        scored = self.mode == "select" and isinstance(self.metric, str)
        return super().requirements() | (SELECT_METRIC_NEEDS if scored else frozenset())

    def hparams(self) -> dict[str, Any]:
        return {
            "members": [m.describe() for m in self._members],
            "mode": self.mode,
            "weights": self.weights,
            "metric": self.metric if isinstance(self.metric, str) else getattr(self.metric, "__name__", repr(self.metric)),
            "val_size": self.val_size,
        }

    def unlearn(self, ctx: UnlearnContext, runner: "LocalRunner") -> MetaReport:
        start_model = ctx.model
        start_state = copy.deepcopy(start_model.state_dict())
        parts, states = [], []
        for member in self._members:
            ctx.model = start_model
            start_model.load_state_dict(start_state)
            report, config, seconds = run_stage(member, ctx, runner)
            if ctx.model is not start_model:  # inference-time strategies (dexperts, steering) wrap the model
                ctx.model = start_model
                start_model.load_state_dict(start_state)
                raise InvalidConfigError(
                    f"ensemble: member {member.strategy.name!r} replaces the model with a wrapper at inference time; "
                    "its weights cannot be averaged or compared with the other members'"
                )
            parts.append((member.strategy.name, report, config, seconds))
            states.append(copy.deepcopy(start_model.state_dict()))
        merged = merge_reports(parts)
        if self.mode == "average":
            weights = self.weights or [1.0] * len(states)
            start_model.load_state_dict(average_states(states, weights))
            merged.choice = {"mode": "average", "weights": [float(w) for w in weights]}
        else:
            metric = METRICS[self.metric] if isinstance(self.metric, str) else self.metric
            ctx.state["ensemble_val_ids"] = _validation_ids(ctx, self.val_size)
            scores = []
            for state in states:
                start_model.load_state_dict(state)
                scores.append(float(metric(start_model, ctx)))
            best = int(np.nanargmax(scores)) if not all(np.isnan(scores)) else 0
            start_model.load_state_dict(states[best])
            merged.choice = {
                "mode": "select",
                "metric": self.hparams()["metric"],
                "scores": {f"{i}:{p[0]}": s for i, (p, s) in enumerate(zip(parts, scores))},
                "selected": best,
                "selected_strategy": parts[best][0],
            }
        start_model.eval()
        return merged
