"""Contextual diversity (Agarwal, Arora, Anand & Arora, ECCV 2020, "Contextual Diversity for Active Learning"):
k-center greedy under the symmetric KL divergence between predicted class distributions."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

import torch
from torch import nn

from erasus_ray.data import IdDataset
from erasus_ray.errors import InvalidConfigError
from erasus_ray.selectors._embeddings import _chunk_rows, output_distributions, rows_of, symmetric_kl_to
from erasus_ray.selectors.base import SELECTORS, Coreset, Selector
from erasus_ray.selectors.k_center import geometric_coreset, greedy_k_center
from erasus_ray.tasks import Capability, Task


def kl_medoid(p: torch.Tensor, eps: float = 1e-12) -> int:
    """Row minimising the summed symmetric KL to all rows (ties: smallest row), in column chunks."""
    n = len(p)
    step = _chunk_rows(n)
    sums = torch.cat([symmetric_kl_to(p, torch.arange(i, min(i + step, n)), eps).reshape(n, -1).sum(0) for i in range(0, n, step)])
    return int(torch.argmin(sums))


@SELECTORS.register("contextual_diversity")
class ContextualDiversitySelector(Selector):
    """Contextual diversity: pick forget samples whose predicted class distributions ("context": the confusion
    between classes the model expresses) are mutually most different, by k-center greedy under the pairwise
    contextual distance ``d(i, j) = 0.5 (KL(P_i || P_j) + KL(P_j || P_i))``.

    ``P_i`` is the softmax of a classifier's output; for a sample with several prediction units (an LM's answer
    tokens) it is the entropy-weighted mean of the units' softmax vectors, the paper's ``w_r`` weighting of regions.
    The paper additionally splits a sample's regions by predicted class; with one unit per sample that split only
    decides which of two samples' classes overlap, and (as in DeepCore's implementation) it is not applied.

    Probabilities are computed in float64 and floored at ``eps`` (a confident model's distributions differ mostly in
    their small entries). The greedy starts from the KL-medoid (or the smallest id with ``start="first"``); deterministic, ``seed``
    unused. ``Coreset.scores``: contextual distance to the chosen set when picked (unchosen: final distance);
    ``info["objective"]``: the final covering radius in that distance.

    Cost: one forward pass; ``k`` distance columns of ``O(n C)``, ``O(n^2 C)`` chunked for the medoid.

    Example:
        >>> coreset = ContextualDiversitySelector().select(model, forget_loader, fraction=0.1)
        >>> coreset.info["objective"]
    """

    #: symmetric KL between predictive distributions.
    requires = frozenset({Capability.LOGITS})

    def __init__(self, batch_size: int = 128, start: str = "medoid", eps: float = 1e-12) -> None:
        super().__init__(batch_size=batch_size)
        if start not in ("medoid", "first"):
            raise InvalidConfigError(f"start must be 'medoid' or 'first', got {start!r}")
        self.start = start
        self.eps = float(eps)

    def _select(self, model: nn.Module, forget: IdDataset, task: Task, budget: int, seed: int, **context: Any) -> Coreset:
        p = output_distributions(model, forget, task, self.batch_size)
        first = kl_medoid(p, self.eps) if self.start == "medoid" else 0
        rows, scores, radius = greedy_k_center(lambda j: symmetric_kl_to(p, j, self.eps), len(p), budget, first)
        return geometric_coreset(forget, rows, budget, scores, objective=radius, start_id=int(forget.ids[first]))

    objective_sense = "min"

    def set_objective(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, **context: Any) -> Callable[[np.ndarray], float]:
        """The covering radius in symmetric KL over every forget sample."""
        p = output_distributions(model, forget, task, self.batch_size)
        return lambda ids: float(
            symmetric_kl_to(p, torch.as_tensor(rows_of(forget, ids))).reshape(len(p), -1).min(1).values.max()
        )
