"""What the joint-space VLM strategies share: a frozen copy of the model before unlearning, and the pairs' embeddings
under it (``Capability.JOINT_SPACE``)."""

from __future__ import annotations

import torch

from erasus_ray.data import Batch
from erasus_ray.strategies.base import UnlearnContext
from erasus_ray.strategies.scrub import frozen_copy

ORIGINAL = "joint_space_original"


def keep_original(ctx: UnlearnContext) -> None:
    """Store a frozen copy of the model as it is before unlearning (one extra copy of the weights)."""
    ctx.state[ORIGINAL] = frozen_copy(ctx.model)


def drop_original(ctx: UnlearnContext) -> None:
    ctx.state.pop(ORIGINAL, None)


def pair_cosine(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``[B]`` cosine similarity of each row's image and text (the embeddings are L2-normalised)."""
    return (image * text).sum(-1)


def pairs(ctx: UnlearnContext, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image, text)`` normalised embeddings of the batch's own pairs under the model being unlearned."""
    return ctx.task.pair_embeddings(ctx.model, batch.data)


@torch.no_grad()
def original_pairs(ctx: UnlearnContext, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The same under the frozen original (:func:`keep_original`)."""
    return ctx.task.pair_embeddings(ctx.state[ORIGINAL], batch.data)
