"""Contrastive unlearning in the joint image-text space: CLIPErase (Yang, Dai, Wang, Cheng, Tian & Zhang, ACL 2025,
"CLIPErase: Efficient Unlearning of Visual-Textual Associations in CLIP", arXiv:2410.23330) - a Forgetting Module that
pushes the forget image-text pairs apart, a Retention Module that keeps the retain pairs aligned, and a Consistency
Module that keeps each encoder's outputs close to the original model's."""

from __future__ import annotations

from typing import Any

import torch

from erasus_ray.data import Batch
from erasus_ray.strategies._joint import drop_original, keep_original, original_pairs, pair_cosine, pairs
from erasus_ray.strategies.base import STRATEGIES, Strategy, UnlearnContext, weighted_mean
from erasus_ray.tasks import Capability


@STRATEGIES.register("contrastive_unlearning")
class ContrastiveUnlearning(Strategy):
    """``loss = forget_weight * L_FM + retain_weight * L_RM + consistency_weight * L_CM`` (CLIPErase's three modules).

    * ``L_FM`` (forgetting): the mean cosine similarity of each forget image with its own text in the joint space,
      floored at ``floor`` - minimised, so forget pairs are pushed apart. The floor (default 0: orthogonal, what
      unrelated pairs of normalised embeddings average) stops the push once a pair is no more aligned than
      unrelated ones; CLIPErase's plain similarity has no floor and overshoots to anti-alignment on a tiny model.
    * ``L_RM`` (retention): the task's own objective on the retain batch (zero-shot cross-entropy against the
      caption set, or the in-batch InfoNCE), so retain pairs stay aligned.
    * ``L_CM`` (consistency): the squared distance between the retain pairs' image and text embeddings and those of
      the frozen original model, for each encoder separately.

    Args:
        forget_weight / retain_weight / consistency_weight: the three modules' weights.
        floor: the cosine below which a forget pair is no longer pushed.

    Measured on the tiny CLIP family forgetting the concept "3" (its 43 training pairs; 30 steps, Adam 3e-3, batch
    16; tests/test_strategies_vlm.py): forget-pair cosine 0.656 -> -0.224, forget zero-shot accuracy 0.977 -> 0,
    retain-pair cosine 0.679 -> 0.637, retain accuracy 0.941 -> 0.938 (consistency_weight 10: 0.687 / 0.978). On the
    clip benchmark's demo (closed loop, seed 0) Avg.Gap to the retrained model is 0.4 pts (original 48.5).

    Cost: per step, forward+backward of both towers on the forget pairs and on the retain batch (twice: the task
    objective and the own-pair embeddings) plus one forward of the frozen original; one extra copy of the model.

    Example:
        >>> ErasusUnlearner(clip, strategy="contrastive_unlearning", selector=None).fit(forget_data=f, retain_data=r)
    """

    requires = frozenset({Capability.JOINT_SPACE})

    needs_retain = True
    default_lr = 1e-3
    default_epochs = 20

    def __init__(self, forget_weight: float = 1.0, retain_weight: float = 1.0, consistency_weight: float = 1.0,
                 floor: float = 0.0) -> None:
        super().__init__()
        self.forget_weight = self.check_range("forget_weight", forget_weight, 0.0, 1e6, low_open=True)
        self.retain_weight = self.check_range("retain_weight", retain_weight, 0.0, 1e6)
        self.consistency_weight = self.check_range("consistency_weight", consistency_weight, 0.0, 1e6)
        self.floor = self.check_range("floor", floor, -1.0, 1.0)

    def setup(self, ctx: UnlearnContext) -> None:
        keep_original(ctx)

    def consistency(self, ctx: UnlearnContext, retain: Batch) -> torch.Tensor:
        """``[B]`` squared distance of each encoder's retain embedding from the original's, summed over encoders."""
        image, text = pairs(ctx, retain)
        image0, text0 = original_pairs(ctx, retain)
        return (image - image0).pow(2).sum(-1) + (text - text0).pow(2).sum(-1)

    def loss(self, ctx: UnlearnContext, forget: Batch | None, retain: Batch | None) -> tuple[torch.Tensor, dict[str, Any]]:
        forget_cos = weighted_mean(pair_cosine(*pairs(ctx, forget)).clamp_min(self.floor), forget)
        total, logs = self.forget_weight * forget_cos, {"forget_cosine": forget_cos.detach()}
        if retain is not None:
            retain_loss = ctx.forward(retain).sample_loss().mean()
            drift = self.consistency(ctx, retain).mean()
            total = total + self.retain_weight * retain_loss + self.consistency_weight * drift
            logs.update(retain_loss=retain_loss.detach(), consistency=drift.detach())
        return total, logs

    def finish(self, ctx: UnlearnContext) -> None:
        drop_original(ctx)
