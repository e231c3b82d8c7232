"""Farthest-first traversal from a random start (Gonzalez 1985; Rosenkrantz, Stearns & Lewis 1977), the
randomised-start form of greedy k-center used for coresets by Sener & Savarese (ICLR 2018)."""

from __future__ import annotations

import numpy as np
import torch

from erasus_ray.selectors.base import SELECTORS
from erasus_ray.selectors.k_center import KCenterSelector


@SELECTORS.register("farthest_first")
class FarthestFirstSelector(KCenterSelector):
    """Farthest-first traversal: the first sample is drawn uniformly at random (``seed``, over ids sorted
    ascending), then each step adds the sample farthest from those chosen.

    How it differs from ``k_center``: the traversal rule is the same, but ``k_center`` starts deterministically
    from the medoid (or the smallest id), so it returns one coreset regardless of ``seed``; ``farthest_first``
    starts from a seeded random sample, so different seeds give different (equally 2-approximate) coresets -
    useful for averaging over selections. Starting at a random point tends to put the first centre in the
    interior and the rest on the hull, while the medoid start spends the first pick on the densest region.

    Cost: one forward pass; ``k`` distance columns (``O(n k d)``), no ``n x n`` matrix.

    Example:
        >>> coreset = FarthestFirstSelector().select(model, forget_loader, k=20, seed=1)
        >>> coreset.info["start_id"]  # the random starting sample
    """

    def __init__(self, batch_size: int = 128, embedding: str = "features", proj_dim: int | None = None) -> None:
        super().__init__(batch_size=batch_size, embedding=embedding, start="first", proj_dim=proj_dim)

    def first_row(self, x: torch.Tensor, seed: int) -> int:
        return int(np.random.default_rng(seed).integers(len(x)))
