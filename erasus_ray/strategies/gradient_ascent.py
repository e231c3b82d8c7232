"""Gradient ascent on the forget set (Golatkar et al., CVPR 2020 "Eternal Sunshine of the Spotless Net";
Thudi et al. 2022; the "NegGrad" baseline of Kurmanji et al., NeurIPS 2023)."""

from __future__ import annotations

from typing import Any

import torch

from erasus_ray.data import Batch
from erasus_ray.strategies.base import STRATEGIES, Strategy, UnlearnContext, weighted_mean
from erasus_ray.tasks import Capability


@STRATEGIES.register("gradient_ascent")
class GradientAscent(Strategy):
    """Maximise the loss on the forget coreset: ``loss = -mean_i l(x_i, y_i)`` over forget samples.

    No retain term, so it is cheap but unbounded: utility collapses if run too long. Use ``forget_target``
    (early stop) or ``grad_diff`` / ``npo`` when utility matters.

    Cost: one forward+backward per forget sample per epoch.

    Example:
        >>> ErasusUnlearner(model, strategy="gradient_ascent", selector="el2n", fraction=0.1).fit(forget_data=f, retain_data=r)
    """

    #: ascends the per-sample loss: any task.
    requires = frozenset({Capability.LOSS})

    default_lr = 1e-4
    default_epochs = 5

    def loss(self, ctx: UnlearnContext, forget: Batch | None, retain: Batch | None) -> tuple[torch.Tensor, dict[str, Any]]:
        forget_loss = weighted_mean(ctx.forward(forget).sample_loss(), forget)
        return -forget_loss, {"forget_loss": forget_loss.detach()}
