"""k-means++ seeding (Arthur & Vassilvitskii, SODA 2007, "k-means++: The Advantages of Careful Seeding"); the
D^2 sampling that BADGE (Ash et al., ICLR 2020) applies to gradient embeddings."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from erasus_ray.data import IdDataset
from erasus_ray.selectors._embeddings import EMBEDDING_NEEDS, check_embedding, distances_to, embed, pairwise_distances, rows_of
from erasus_ray.selectors.base import SELECTORS, Coreset, Selector
from erasus_ray.selectors.k_center import geometric_coreset
from erasus_ray.tasks import Capability, Task


def kmeans_pp_seeding(x: torch.Tensor, k: int, rng: np.random.Generator) -> tuple[list[int], torch.Tensor, float]:
    """``k`` rows by D^2 sampling: the first uniformly, each next with probability ``D(x)^2 / sum D^2`` where ``D``
    is the distance to the nearest chosen row. Returns ``(rows, scores, potential)``: a chosen row's score is its
    ``D^2`` when drawn (first: ``inf`` is avoided by using the largest ``D^2`` to it), an unchosen row's its final
    ``D^2``; ``potential`` is the k-means cost ``sum_i D(x_i)^2`` of the seeds. If every remaining point coincides
    with a chosen one (``sum D^2 = 0``) the next is drawn uniformly among the unchosen."""
    n = len(x)
    first = int(rng.integers(n))
    chosen = [first]
    d2 = distances_to(x, first).pow(2)
    scores = d2.clone()
    scores[first] = float(d2.max())
    d2[first] = 0.0
    for _ in range(1, k):
        p = d2.cpu().numpy().astype(np.float64)
        p[chosen] = 0.0
        total = p.sum()
        if total > 0:
            j = int(rng.choice(n, p=p / total))
        else:
            free = np.setdiff1d(np.arange(n), chosen)
            j = int(rng.choice(free))
        scores[j] = d2[j]
        chosen.append(j)
        d2 = torch.minimum(d2, distances_to(x, j).pow(2))
        d2[j] = 0.0
    free = torch.ones(n, dtype=torch.bool, device=d2.device)
    free[chosen] = False
    scores[free] = d2[free]
    return chosen, scores, float(d2.sum())


@SELECTORS.register("kmeans_pp")
class KMeansPPSelector(Selector):
    """The k-means++ seeds of the forget set's penultimate features (or, as in BADGE, last-layer gradient
    embeddings): spread-out samples chosen with probability proportional to their squared distance from the
    seeds so far - an ``O(log k)``-approximation of the k-means cost in expectation.

    Randomised: the draws use ``numpy.random.default_rng(seed)`` over ids sorted ascending, so a seed fixes the
    coreset and different seeds give different ones. ``Coreset.scores``: ``D^2`` at the time of the draw (unchosen:
    final ``D^2``); ``info["objective"]``: the k-means potential of the seeds.

    Cost: one forward pass; ``k`` distance columns (``O(n k d)``), no ``n x n`` matrix.

    Example:
        >>> coreset = KMeansPPSelector(embedding="gradient").select(model, forget_loader, k=20, seed=0)  # BADGE-style
        >>> coreset.info["objective"]
    """

    #: embedding='features' (default); 'gradient' also reads logits (see requirements()).
    requires = frozenset({Capability.FEATURES})

    def __init__(self, batch_size: int = 128, embedding: str = "features", proj_dim: int | None = None) -> None:
        super().__init__(batch_size=batch_size)
        self.embedding = check_embedding(embedding)
        self.proj_dim = proj_dim

    def requirements(self) -> frozenset[Capability]:
        """What its ``embedding`` reads (:data:`~erasus_ray.selectors._embeddings.EMBEDDING_NEEDS`)."""
        return EMBEDDING_NEEDS[self.embedding]

    def _select(self, model: nn.Module, forget: IdDataset, task: Task, budget: int, seed: int, **context: Any) -> Coreset:
        x = embed(model, forget, task, self.embedding, self.batch_size, seed=seed, proj_dim=self.proj_dim)
        rows, scores, potential = kmeans_pp_seeding(x, budget, np.random.default_rng(seed))
        return geometric_coreset(forget, rows, budget, scores, objective=potential, embedding=self.embedding)

    objective_sense = "min"

    def set_objective(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, **context: Any) -> Callable[[np.ndarray], float]:
        """The k-means potential ``sum_i min_{c in S} ||x_i - x_c||^2`` over every forget sample."""
        x = embed(model, forget, task, self.embedding, self.batch_size, seed=seed, proj_dim=self.proj_dim)
        return lambda ids: float(pairwise_distances(x, x[rows_of(forget, ids)], squared=True).min(1).values.sum())
