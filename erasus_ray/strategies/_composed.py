"""Strategies that train with another strategy's objective under a structural constraint (adapters, frozen layers,
sparsity masks): the objective is composed, never copied."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from erasus_ray.data import Batch
from erasus_ray.errors import InvalidConfigError
from erasus_ray.strategies.base import STRATEGIES, StepLoss, Strategy, UnlearnContext
from erasus_ray.tasks import Capability


class ComposedStrategy(Strategy):
    """Delegates ``setup`` / ``loss`` / ``before_step`` / ``finish`` to a loss-based registry strategy
    (``objective`` with ``objective_params``); subclasses add their constraint around it."""

    def _init_objective(self, objective: str, objective_params: dict[str, Any] | None) -> None:
        if objective == self.name:
            raise InvalidConfigError(f"{self.name}: objective cannot be {objective!r} itself")
        inner = STRATEGIES.create(objective, **(objective_params or {}))
        if type(inner).unlearn is not Strategy.unlearn:
            raise InvalidConfigError(
                f"{self.name}: objective {objective!r} is not loss-based; choose e.g. grad_diff, npo, gradient_ascent"
            )
        self.objective = objective
        self.objective_params = dict(objective_params or {})
        self._inner = inner
        # the runner reads these from the strategy it drives
        self.needs_retain = inner.needs_retain  # type: ignore[misc]
        self.setup_scope = inner.setup_scope  # type: ignore[misc]

    def requirements(self) -> frozenset[Capability]:
        """Its own ``requires`` and the objective's: it runs the objective's loss."""
        return type(self).requires | self._inner.requirements()

    def hparams(self) -> dict[str, Any]:
        return {k: v for k, v in super().hparams().items() if k not in ("needs_retain", "setup_scope")}

    def setup(self, ctx: UnlearnContext) -> None:
        self._inner.setup(ctx)

    def loss(self, ctx: UnlearnContext, forget: Batch | None, retain: Batch | None) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.constrain(ctx, *self._inner.loss(ctx, forget, retain))

    def step_losses(self, ctx: UnlearnContext, forget: Batch | None, retain: Batch | None) -> Iterator[StepLoss]:
        # the objective's own sequence (e.g. SCRUB's max- then min-step), each loss under the constraint
        for loss, logs, *phase in self._inner.step_losses(ctx, forget, retain):
            yield (*self.constrain(ctx, loss, logs), *phase)

    def constrain(self, ctx: UnlearnContext, loss: torch.Tensor, logs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """A term the constraint adds to every objective loss (e.g. a mask's sparsity penalty); default: none."""
        return loss, logs

    def before_step(self, ctx: UnlearnContext) -> None:
        self._inner.before_step(ctx)

    def finish(self, ctx: UnlearnContext) -> None:
        self._inner.finish(ctx)


def freeze_except(ctx: UnlearnContext, trainable: set[int]) -> None:
    """Turn off ``requires_grad`` for every trainable parameter whose ``id`` is not in ``trainable``; remembered in
    ``ctx.state`` so :func:`unfreeze` restores exactly those."""
    frozen = []
    for p in ctx.model.parameters():
        if p.requires_grad and id(p) not in trainable:
            p.requires_grad_(False)
            frozen.append(p)
    ctx.state.setdefault("frozen_params", []).extend(frozen)


def unfreeze(ctx: UnlearnContext) -> None:
    for p in ctx.state.pop("frozen_params", []):
        p.requires_grad_(True)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own a weight matrix (Linear, Conv, GPT-2 Conv1D, Embedding), in registration order."""
    out = []
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() >= 2 and not isinstance(module, (nn.LayerNorm,)):
            out.append((name, module))
    return out
