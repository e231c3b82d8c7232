"""Unlearning in one modality's tower with the other frozen (the vision-text split). The closest published method:
Kravets & Namboodiri, TMLR 2025, "Zero-shot CLIP Class Forgetting via Text-image Space Adaptation", who forget a
CLIP class by adapting the text side of the shared space alone, the visual encoder untouched (which is why it works
"regardless of the visual encoder"). No single paper defines the split as a general method; this is that
restriction made a constraint around any loss-based objective, in either direction."""

from __future__ import annotations

from typing import Any


from erasus_ray.data import make_loader
from erasus_ray.errors import InvalidConfigError
from erasus_ray.strategies._composed import ComposedStrategy, freeze_except, unfreeze
from erasus_ray.strategies.base import STRATEGIES, UnlearnContext
from erasus_ray.tasks import Capability

TOWERS = ("vision", "text")


def tower_names(ctx: UnlearnContext, batch_size: int = 8) -> dict[str, list[str]]:
    """The task's ``{"vision": names, "text": names}`` for ``ctx.model``, found on the first forget batch."""
    size = max(1, min(batch_size, len(ctx.forget)))
    batch = next(iter(make_loader(ctx.forget, ctx.task.collate, batch_size=size))).to(ctx.device)
    return ctx.task.tower_parameters(ctx.model, batch.data)


@STRATEGIES.register("vision_text_split")
class VisionTextSplit(ComposedStrategy):
    """Run ``objective`` on the parameters of one tower (``tower``: ``"vision"`` or ``"text"``); every parameter of
    the other tower - and any parameter in neither, e.g. CLIP's ``logit_scale`` - stays frozen, bit-identical.

    The towers come from the task (``Capability.TOWERS``): a two-tower model's are read off the autograd graph of its
    image and text embeddings, a generative VLM's are its vision tower + projector and its language model. Unlearning
    the text tower re-points the class captions away from their images without touching what the image tower
    computes (Kravets & Namboodiri's setting); unlearning the vision tower moves the images instead and leaves the
    text tower usable for other images.

    Measured on the tiny CLIP family forgetting the concept "3" (43 pairs; grad_diff, 30 steps, Adam 3e-3, batch 16):
    text tower - forget zero-shot accuracy 0.977 -> 0, retain 0.941 -> 0.969; vision tower - 0.977 -> 0, retain
    0.936. On the tiny Llava's 16 random forget questions (exchangeable with the retain ones; vision tower, 30 steps,
    Adam 3e-3, batch 8) answer accuracy falls alike: forget 0.875 -> 0.188, retain 0.888 -> 0.396.

    Args:
        tower: the tower that is unlearned.
        objective / objective_params: the loss-based strategy run on it (default ``grad_diff``).

    Cost: the objective's, with backward passes only into the unlearned tower.

    Example:
        >>> ErasusUnlearner(clip, strategy="vision_text_split", tower="text").fit(forget_data=f, retain_data=r)
    """

    requires = frozenset({Capability.TOWERS})

    default_lr = 1e-3
    default_epochs = 20

    def __init__(self, tower: str = "text", objective: str = "grad_diff",
                 objective_params: dict[str, Any] | None = None) -> None:
        super().__init__()
        if tower not in TOWERS:
            raise InvalidConfigError(f"{self.name}: tower must be one of {TOWERS}, got {tower!r}")
        self.tower = tower
        self._init_objective(objective, objective_params)
        self.uses_forget = self._inner.uses_forget  # type: ignore[misc]

    def setup(self, ctx: UnlearnContext) -> None:
        names = tower_names(ctx)[self.tower]
        if not names:
            raise InvalidConfigError(f"{self.name}: the task found no trainable parameter in the {self.tower} tower")
        params = dict(ctx.model.named_parameters())
        freeze_except(ctx, {id(params[n]) for n in names})
        ctx.state["vision_text_split_trained"] = names
        super().setup(ctx)

    def finish(self, ctx: UnlearnContext) -> None:
        super().finish(ctx)
        unfreeze(ctx)
