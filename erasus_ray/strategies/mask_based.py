"""Unlearning by learning a binary weight mask (mask learning with a straight-through estimator as in Piggyback,
Mallya, Davis & Lazebnik, ECCV 2018; used to remove a behaviour by pruning learned masks as in Adversarial Neuron
Pruning, Wu & Wang, NeurIPS 2021)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from erasus_ray.strategies._composed import ComposedStrategy, freeze_except, unfreeze
from erasus_ray.strategies.base import STRATEGIES, UnlearnContext
from erasus_ray.strategies.lora_unlearning import _adaptable_modules
from erasus_ray.tasks import Capability


class BinaryMask(nn.Module):
    """``W -> W * m`` with ``m = 1[s > 0]`` in the forward pass and ``d m / d s = sigmoid'(s)`` in the backward
    (straight-through estimator), ``s`` the trainable mask logits."""

    def __init__(self, shape: torch.Size, init: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.full(shape, float(init), dtype=dtype))

    def mask(self) -> torch.Tensor:
        soft = torch.sigmoid(self.logits)
        # parenthesised: (soft - soft.detach()) is exactly 0 in value, so the forward mask is exactly binary
        return (self.logits > 0).to(soft.dtype) + (soft - soft.detach())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask()


@STRATEGIES.register("mask_based")
class MaskBased(ComposedStrategy):
    """Learn which weights to remove; never change a weight's value.

    Every Linear/Conv1D weight gets mask logits ``s`` (initialised to ``init``, i.e. everything kept); the weights
    themselves are frozen. The mask is trained with the unlearning ``objective`` (default ``grad_diff``: remove what
    supports the forget coreset while keeping the retain loss low) plus ``sparsity * mean(1 - sigmoid(s))``, which
    prefers removing as few weights as possible. The forward pass always uses the binary mask (straight-through
    gradients), so the final model - weights multiplied by the binary mask, then the mask folded in - is exactly
    the model that was trained: each weight is either unchanged or zero.

    How this differs from ``saliency_unlearning`` (SalUn): SalUn picks weights by gradient saliency once and then
    *fine-tunes their values* with random labels; here the values never change and the set of zeroed weights is
    itself optimised.

    Args:
        init: initial mask logit (> 0 keeps the weight). sparsity: weight of the removal penalty.
        target_modules: ``"all_linear"`` or module names / suffixes (as lora_unlearning's).
        objective / objective_params: the loss-based objective that trains the mask.

    Measured on digits (class 3, full forget set, seed 0, defaults): forget / retain / test accuracy
    0.000 / 0.994 / 0.867, Avg.Gap 0.2 pts (gold model 0.000 / 0.998 / 0.869, original 1.000 / 0.998 / 0.975, Avg.Gap 50.6 pts).

    Cost: the objective's cost, plus one mask-sized tensor of logits and its optimizer state per masked weight.

    Example:
        >>> ErasusUnlearner(model, strategy="mask_based", sparsity=0.1).fit(forget_data=f, retain_data=r)
    """

    #: weight masks on the model's own layers; requirements() adds its objective's.
    requires = frozenset({Capability.LOSS})

    default_lr = 1e-2
    default_epochs = 20

    def __init__(
        self,
        init: float = 0.05,
        sparsity: float = 0.1,
        target_modules: str | list[str] = "all_linear",
        objective: str = "grad_diff",
        objective_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.init = self.check_range("init", init, 0.0, 100.0, low_open=True)
        self.sparsity = self.check_range("sparsity", sparsity, 0.0, 1e6)
        self.target_modules = [target_modules] if isinstance(target_modules, str) and target_modules != "all_linear" else target_modules
        self._init_objective(objective, objective_params)

    def setup(self, ctx: UnlearnContext) -> None:
        super().setup(ctx)
        modules = _adaptable_modules(ctx.model, self.target_modules)
        freeze_except(ctx, set())
        masks = []
        for _, module in modules:
            mask = BinaryMask(module.weight.shape, self.init, module.weight.dtype).to(module.weight.device)
            parametrize.register_parametrization(module, "weight", mask)
            masks.append(mask)
        ctx.state["mask_modules"] = modules
        ctx.state["masks"] = masks

    def constrain(self, ctx: UnlearnContext, loss: torch.Tensor, logs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        masks = ctx.state["masks"]
        removed = torch.cat([(1 - torch.sigmoid(m.logits)).flatten() for m in masks]).mean()
        with torch.no_grad():
            zeroed = float(torch.cat([(m.logits <= 0).flatten() for m in masks]).float().mean())
        return loss + self.sparsity * removed, {**logs, "removed_soft": removed.detach(), "removed_fraction": zeroed}

    @torch.no_grad()
    def finish(self, ctx: UnlearnContext) -> None:
        super().finish(ctx)
        for _, module in ctx.state.pop("mask_modules", []):
            # leave_parametrized folds the (binary, in value) mask into the weight
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        ctx.state.pop("masks", None)
        unfreeze(ctx)
