"""Greedy k-center (Sener & Savarese, ICLR 2018, "Active Learning for Convolutional Neural Networks: A Core-Set
Approach"; the greedy 2-approximation of Gonzalez 1985)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from erasus_ray.data import IdDataset
from erasus_ray.errors import InvalidConfigError
from erasus_ray.selectors._embeddings import (
    EMBEDDING_NEEDS,
    check_embedding,
    distances_to,
    embed,
    medoid_index,
    pairwise_distances,
    rows_of,
    score_map,
    to_numpy_ids,
)
from erasus_ray.selectors.base import SELECTORS, Coreset, Selector
from erasus_ray.tasks import Capability, Task


def greedy_k_center(dist_to: Callable[[int], torch.Tensor], n: int, k: int, first: int) -> tuple[list[int], torch.Tensor, float]:
    """Farthest-point greedy from ``first``: repeatedly add the point farthest from the chosen set.

    ``dist_to(j)`` returns the ``[n]`` distances to point ``j``. Returns ``(rows in selection order, scores,
    radius)``: a chosen row's score is its distance to the set when it was added (the first row gets the
    1-center radius ``max_i d(i, first)``, which equals the second pick's score); an unchosen row's score is its
    final distance to the set; ``radius`` is the k-center objective ``max_i min_{c in S} d(i, c)``.
    Ties go to the smallest row. Cost: ``k`` distance columns, ``O(n k)`` memory-free updates.
    """
    chosen = [int(first)]
    min_dist = dist_to(first).double().clone()
    scores = min_dist.clone()
    scores[first] = float(min_dist.max())
    min_dist[first] = 0.0
    for _ in range(1, k):
        masked = min_dist.clone()
        masked[chosen] = -1.0  # never re-pick (matters only when every point is covered, e.g. duplicates)
        j = int(torch.argmax(masked))  # first maximum: smallest row on ties
        scores[j] = min_dist[j]
        chosen.append(j)
        min_dist = torch.minimum(min_dist, dist_to(j).double())
        min_dist[j] = 0.0
    free = torch.ones(n, dtype=torch.bool, device=min_dist.device)
    free[chosen] = False
    scores[free] = min_dist[free]
    return chosen, scores, float(min_dist.max()) if n else 0.0


def geometric_coreset(forget: IdDataset, rows: list[int], budget: int, scores: torch.Tensor | None, **info: Any) -> Coreset:
    return Coreset(
        ids=to_numpy_ids(forget, rows),
        weights=np.full(budget, len(forget) / budget),
        scores=None if scores is None else score_map(forget, scores),
        info=info,
    )


@SELECTORS.register("k_center")
class KCenterSelector(Selector):
    """Greedy k-center on penultimate features (or last-layer gradient embeddings): each step adds the sample
    farthest from those already chosen, minimising the largest distance from any forget sample to its nearest
    chosen one (2-approximation of the optimal radius).

    Deterministic: the greedy starts from the medoid of the embedding (``start="medoid"``, minimum summed
    distance, ties by id) or from the smallest id (``start="first"``); ``seed`` is unused. See
    ``farthest_first`` for the same traversal from a seeded random start.

    ``Coreset.scores``: a sample's distance to the chosen set when it was added (unchosen: its final distance);
    ``info["objective"]``: the final covering radius.

    Cost: one forward pass; ``k`` distance columns (``O(n k d)``), plus ``O(n^2 d)`` chunked for the medoid.

    Example:
        >>> coreset = KCenterSelector().select(model, forget_loader, fraction=0.1)
        >>> coreset.info["objective"]  # covering radius in feature space
    """

    #: embedding='features' (default); 'gradient' also reads logits (see requirements()).
    requires = frozenset({Capability.FEATURES})

    def __init__(self, batch_size: int = 128, embedding: str = "features", start: str = "medoid", proj_dim: int | None = None) -> None:
        super().__init__(batch_size=batch_size)
        self.embedding = check_embedding(embedding)
        if start not in ("medoid", "first"):
            raise InvalidConfigError(f"start must be 'medoid' or 'first', got {start!r}")
        self.start = start
        self.proj_dim = proj_dim

    def requirements(self) -> frozenset[Capability]:
        """What its ``embedding`` reads (:data:`~erasus_ray.selectors._embeddings.EMBEDDING_NEEDS`)."""
        return EMBEDDING_NEEDS[self.embedding]

    def first_row(self, x: torch.Tensor, seed: int) -> int:
        return medoid_index(x) if self.start == "medoid" else 0

    def _select(self, model: nn.Module, forget: IdDataset, task: Task, budget: int, seed: int, **context: Any) -> Coreset:
        x = embed(model, forget, task, self.embedding, self.batch_size, seed=seed, proj_dim=self.proj_dim)
        first = self.first_row(x, seed)
        rows, scores, radius = greedy_k_center(lambda j: distances_to(x, j), len(x), budget, first)
        return geometric_coreset(forget, rows, budget, scores, objective=radius, start_id=int(forget.ids[first]), embedding=self.embedding)

    objective_sense = "min"

    def set_objective(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, **context: Any) -> Callable[[np.ndarray], float]:
        """The covering radius ``max_i min_{c in S} d(x_i, x_c)`` over every forget sample."""
        x = embed(model, forget, task, self.embedding, self.batch_size, seed=seed, proj_dim=self.proj_dim)
        return lambda ids: float(pairwise_distances(x, x[rows_of(forget, ids)]).min(1).values.max())
