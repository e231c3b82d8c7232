"""Uniform random selection: the baseline every other selector must beat."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from erasus_ray.data import IdDataset
from erasus_ray.selectors.base import SELECTORS, Coreset, Selector
from erasus_ray.tasks import Capability, Task


@SELECTORS.register("random")
class RandomSelector(Selector):
    """Pick ``k`` forget ids uniformly at random (seeded), independent of the model.

    Cost: none beyond a permutation. The draw is made over ids sorted ascending, so it does not depend on the
    order of the user's loader.

    Example:
        >>> coreset = RandomSelector().select(model, forget_loader, fraction=0.1, seed=0)
    """

    #: model-free: any task.
    requires = frozenset({Capability.LOSS})

    distributed_merge = "central"
    central_reason = "no model pass: one seeded draw over all forget ids, nothing worth sharding"

    def _select(self, model: nn.Module, forget: IdDataset, task: Task, budget: int, seed: int, **context: Any) -> Coreset:
        rng = np.random.default_rng(seed)
        chosen = rng.permutation(len(forget))[:budget]
        return Coreset(ids=forget.ids[chosen].copy(), weights=np.full(budget, len(forget) / budget), scores=None)


@SELECTORS.register("full")
class FullSelector(Selector):
    """The whole forget set (no coreset): the reference every coreset is compared with."""

    #: model-free: any task.
    requires = frozenset({Capability.LOSS})

    distributed_merge = "central"
    central_reason = "no model pass: the whole forget set, nothing to select"

    def _select(self, model: nn.Module, forget: IdDataset, task: Task, budget: int, seed: int, **context: Any) -> Coreset:
        return Coreset.full(forget)
