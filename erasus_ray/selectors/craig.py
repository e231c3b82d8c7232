"""CRAIG (Mirzasoleiman, Bilmes & Leskovec, ICML 2020, "Coresets for Data-efficient Training of Machine Learning
Models"): facility location on gradient embeddings, each medoid weighted by the size of its cluster."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from erasus_ray.data import IdDataset
from erasus_ray.errors import InvalidConfigError
from erasus_ray.selectors._embeddings import EMBEDDING_NEEDS, Similarity, check_embedding, embed, rows_of, score_map, to_numpy_ids
from erasus_ray.selectors.base import SELECTORS, Coreset, Selector
from erasus_ray.selectors.submodular import OPTIMIZERS, FacilityLocation, greedy_scores, maximize
from erasus_ray.tasks import Capability, Task


def cluster_sizes(sim: Similarity, rows: list[int]) -> np.ndarray:
    """For each chosen row (in selection order), how many rows are most similar to it among the chosen
    (ties: the chosen row with the smaller index). Sums to ``n``."""
    order = np.argsort(rows, kind="stable")  # chosen rows by index, so argmax's first maximum is the smaller row
    by_index = np.asarray(rows)[order]
    nearest = torch.argmax(sim.rows(by_index), dim=0).cpu().numpy()  # [k, n]: first maximum (smaller row) on ties
    counts_by_index = np.bincount(nearest, minlength=len(rows))
    sizes = np.empty(len(rows), dtype=np.int64)
    sizes[order] = counts_by_index
    return sizes


@SELECTORS.register("craig")
class CraigSelector(Selector):
    """CRAIG: greedily maximise facility location ``sum_i max_{j in S} (d_max - ||g_i - g_j||)`` over the
    forget samples' last-layer gradient embeddings ``g_i = (softmax - onehot) (x) features`` - the medoids
    whose weighted sum best approximates the full gradient (the paper's bound on the gradient error) - and weight
    each medoid by the number of samples closest to it. ``Coreset.weights`` are those cluster sizes (they sum to
    ``n``; ties go to the smaller id, so an exact duplicate of an earlier medoid, picked only once everything is
    covered, gets weight 0), so a weighted step on the coreset approximates a step on the whole forget set. Under
    the Ray pool's GreeDi merge the final weights count the shard union, not the whole forget set.

    ``optimizer="lazy"`` (default, as in the paper), ``"naive"`` or ``"stochastic"`` (``epsilon``, ``seed``).
    ``Coreset.scores``: facility-location marginal gains (see ``submodular``); ``info["objective"]``: ``F(S)``.
    The paper also runs CRAIG per class; here the forget set is one ground set (the task decides nothing).

    Cost: one forward pass (gradients in closed form, no backward); an ``n x n`` similarity (float64, on demand
    beyond ``max_dense``); lazy greedy.

    Example:
        >>> coreset = CraigSelector().select(model, forget_loader, fraction=0.1)
        >>> coreset.weights.sum() == len(forget)  # cluster sizes
    """

    #: embedding='gradient' (default): last-layer gradients (softmax error x features); 'features': features only.
    requires = frozenset({Capability.LOGITS, Capability.FEATURES})

    def __init__(
        self,
        batch_size: int = 128,
        embedding: str = "gradient",
        optimizer: str = "lazy",
        epsilon: float = 0.01,
        max_dense: int = 5000,
        proj_dim: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size)
        self.embedding = check_embedding(embedding)
        if optimizer not in OPTIMIZERS:
            raise InvalidConfigError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.optimizer = optimizer
        self.epsilon = float(epsilon)
        self.max_dense = int(max_dense)
        self.proj_dim = proj_dim

    def requirements(self) -> frozenset[Capability]:
        """What its ``embedding`` reads (:data:`~erasus_ray.selectors._embeddings.EMBEDDING_NEEDS`)."""
        return EMBEDDING_NEEDS[self.embedding]

    def _select(self, model: nn.Module, forget: IdDataset, task: Task, budget: int, seed: int, **context: Any) -> Coreset:
        x = embed(model, forget, task, self.embedding, self.batch_size, seed=seed, proj_dim=self.proj_dim)
        sim = Similarity(x, "euclidean", max_dense=self.max_dense)
        fn = FacilityLocation(sim)
        rows, gains, evals = maximize(fn, budget, self.optimizer, epsilon=self.epsilon, seed=seed)
        sizes = cluster_sizes(sim, rows)
        return Coreset(
            ids=to_numpy_ids(forget, rows),
            weights=sizes.astype(np.float64),
            scores=score_map(forget, greedy_scores(fn, rows, gains)),
            info={"objective": fn.value, "gains": gains, "evaluations": evals, "optimizer": self.optimizer, "embedding": self.embedding},
        )

    objective_sense = "max"

    def set_objective(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, **context: Any) -> Callable[[np.ndarray], float]:
        """Facility location ``F(S)`` with the ground set = every forget sample."""
        x = embed(model, forget, task, self.embedding, self.batch_size, seed=seed, proj_dim=self.proj_dim)
        sim = Similarity(x, "euclidean", max_dense=self.max_dense)

        def value(ids: np.ndarray) -> float:
            fn = FacilityLocation(sim)
            for r in rows_of(forget, ids):
                fn.add(int(r))
            return float(fn.value)

        return value
