"""Fine-tuning on the retain set only (the "FT" baseline of Golatkar et al. 2020 and Jia et al., NeurIPS 2023)."""

from __future__ import annotations

from typing import Any

import torch

from erasus_ray.data import Batch
from erasus_ray.strategies.base import STRATEGIES, Strategy, UnlearnContext
from erasus_ray.tasks import Capability


@STRATEGIES.register("fine_tune")
class FineTune(Strategy):
    """Minimise the retain loss and rely on catastrophic forgetting of the forget set.

    The forget batches only pace the run (one retain step per forget step), so its cost matches the other
    strategies at the same coreset size; raise ``epochs`` for a longer fine-tune.

    Cost: one forward+backward on a retain batch per step.
    """

    #: the retain loss only.
    requires = frozenset({Capability.LOSS})

    needs_retain = True
    uses_forget = False
    default_lr = 1e-3
    default_epochs = 10

    def loss(self, ctx: UnlearnContext, forget: Batch | None, retain: Batch | None) -> tuple[torch.Tensor, dict[str, Any]]:
        retain_loss = ctx.forward(retain).sample_loss().mean()
        return retain_loss, {"retain_loss": retain_loss.detach()}
