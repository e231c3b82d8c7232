"""GradMatch (Killamsetty et al., ICML 2021, "GRAD-MATCH: Gradient Matching based Data Subset Selection for
Efficient Deep Model Training"): orthogonal matching pursuit for a weighted subset whose gradient matches the full
gradient."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from scipy.linalg import cho_factor, solve_triangular
from scipy.optimize import nnls
from torch import nn

from erasus_ray.data import IdDataset
from erasus_ray.errors import InvalidConfigError
from erasus_ray.selectors._embeddings import EMBEDDING_NEEDS, check_embedding, embed, rows_of, to_numpy_ids
from erasus_ray.selectors.base import SELECTORS, Coreset, Selector
from erasus_ray.tasks import Capability, Task


def nnls_gram(gram: np.ndarray, rhs: np.ndarray, ridge: float) -> np.ndarray:
    """``argmin_{w >= 0} w^T (G + ridge I) w - 2 w^T rhs`` via scipy's NNLS on the Cholesky factor
    ``R^T R = G + ridge I``: ``||R w - R^{-T} rhs||^2`` has the same minimiser."""
    a = gram + ridge * np.eye(len(gram))
    jitter = 0.0
    for _ in range(8):
        try:
            r, _ = cho_factor(a + jitter * np.eye(len(a)), lower=False)
            break
        except np.linalg.LinAlgError:
            jitter = max(jitter * 10.0, 1e-12 * max(float(np.trace(a)) / len(a), 1e-300))
    else:  # pragma: no cover - only for a numerically singular, non-finite Gram
        raise InvalidConfigError("GradMatch: the Gram matrix of the chosen gradients is not positive definite")
    r = np.triu(r)
    y = solve_triangular(r, rhs, trans="T", lower=False)
    w, _ = nnls(r, y)
    return w


def omp_match(x: torch.Tensor, k: int, lam: float = 1e-4) -> tuple[list[int], np.ndarray, list[float]]:
    """Non-negative OMP on rows ``x`` ``[n, d]`` toward ``b = sum_i x_i``: each step adds the unchosen row with the
    largest inner product with the residual ``b - sum_S w_j x_j`` (ties: smallest row), then refits ``w >= 0`` by
    ridge-regularised NNLS (``ridge = lam * mean ||x_j||^2`` over the chosen rows). Works on inner products only
    (``K_S = x x_S^T``), ``O(n k d)``. Returns ``(rows, weights, errors)``, ``errors[t]`` the relative
    reconstruction error ``||b - sum w_j x_j|| / ||b||`` with the first ``t + 1`` rows."""
    x = x.double()
    b = x.sum(0)
    kb = x @ b  # <x_i, b>
    bb = float(b @ b)
    rows: list[int] = []
    kcols = torch.zeros(len(x), 0, dtype=torch.float64, device=x.device)  # K[:, S]
    w = np.zeros(0)
    errors: list[float] = []
    for _ in range(k):
        corr = kb - kcols @ torch.as_tensor(w, dtype=torch.float64, device=x.device) if rows else kb.clone()
        corr[rows] = -float("inf")
        j = int(torch.argmax(corr))
        rows.append(j)
        kcols = torch.cat([kcols, (x @ x[j])[:, None]], 1)
        gram = kcols[rows].cpu().numpy()
        gram = 0.5 * (gram + gram.T)
        rhs = kb[rows].cpu().numpy()
        ridge = lam * max(float(np.mean(np.diag(gram))), 1e-300)
        w = nnls_gram(gram, rhs, ridge)
        err2 = bb - 2.0 * float(w @ rhs) + float(w @ gram @ w)
        errors.append(float(np.sqrt(max(err2, 0.0) / bb)) if bb > 0 else 0.0)
    return rows, w, errors


@SELECTORS.register("gradmatch")
class GradMatchSelector(Selector):
    """GradMatch: orthogonal matching pursuit picks forget samples and non-negative weights so that the weighted
    sum of their last-layer gradient embeddings matches the sum over the whole forget set
    (``min_w ||sum_S w_j g_j - sum_i g_i||^2 + lam ||w||^2``, ``w >= 0``). ``Coreset.weights`` are the fitted
    ``w`` (on the scale of "samples represented"; a weight can be 0 when NNLS drops an atom - counted in
    ``info["zero_weights"]``). ``info["errors"]``: relative matching error after each pick;
    ``info["objective"]``: the final one. No per-sample scores; deterministic (``seed`` only seeds the sketch of
    very wide gradient embeddings).

    Cost: one forward pass (closed-form gradients, no backward); ``O(n k d)`` inner products plus a ``k x k``
    NNLS per step.

    Example:
        >>> coreset = GradMatchSelector().select(model, forget_loader, fraction=0.1)
        >>> coreset.info["objective"]  # relative gradient-matching error
    """

    #: embedding='gradient' (default): last-layer gradients (softmax error x features); 'features': features only.
    requires = frozenset({Capability.LOGITS, Capability.FEATURES})

    def __init__(self, batch_size: int = 128, embedding: str = "gradient", lam: float = 1e-4, proj_dim: int | None = None) -> None:
        super().__init__(batch_size=batch_size)
        self.embedding = check_embedding(embedding)
        if float(lam) < 0:
            raise InvalidConfigError(f"lam must be >= 0, got {lam!r}")
        self.lam = float(lam)
        self.proj_dim = proj_dim

    def requirements(self) -> frozenset[Capability]:
        """What its ``embedding`` reads (:data:`~erasus_ray.selectors._embeddings.EMBEDDING_NEEDS`)."""
        return EMBEDDING_NEEDS[self.embedding]

    def _select(self, model: nn.Module, forget: IdDataset, task: Task, budget: int, seed: int, **context: Any) -> Coreset:
        x = embed(model, forget, task, self.embedding, self.batch_size, seed=seed, proj_dim=self.proj_dim)
        rows, w, errors = omp_match(x, budget, self.lam)
        return Coreset(
            ids=to_numpy_ids(forget, rows),
            weights=np.asarray(w, dtype=np.float64),
            scores=None,
            info={"objective": errors[-1], "errors": errors, "zero_weights": int((w <= 0).sum()), "embedding": self.embedding},
        )

    objective_sense = "min"

    def set_objective(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, **context: Any) -> Callable[[np.ndarray], float]:
        """The relative matching error ``||sum_S w_j g_j - sum_i g_i|| / ||sum_i g_i||`` over every forget sample,
        ``w >= 0`` refitted by the same ridge NNLS."""
        x = embed(model, forget, task, self.embedding, self.batch_size, seed=seed, proj_dim=self.proj_dim).double()
        b = x.sum(0)
        bb = float(b @ b)

        def error(ids: np.ndarray) -> float:
            xs = x[rows_of(forget, ids)]
            gram = (xs @ xs.T).cpu().numpy()
            gram = 0.5 * (gram + gram.T)
            rhs = (xs @ b).cpu().numpy()
            w = nnls_gram(gram, rhs, self.lam * max(float(np.mean(np.diag(gram))), 1e-300))
            err2 = bb - 2.0 * float(w @ rhs) + float(w @ gram @ w)
            return float(np.sqrt(max(err2, 0.0) / bb)) if bb > 0 else 0.0

        return error
