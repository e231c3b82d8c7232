"""Embeddings and geometry shared by the geometric coreset selectors (k-center, k-means++, herding, submodular,
CRAIG, GradMatch, GLISTER, contextual diversity).

Everything goes through the task adapter, so one code path serves classifiers and causal LMs:

* :func:`feature_matrix` - ``[n, D]`` penultimate features (``task.forward(..., features=True).features``), one
  batched forward pass, no gradients.
* :func:`gradient_embedding` - ``[n, C*D]`` last-layer gradient embeddings (BADGE, Ash et al. ICLR 2020; DeepCore,
  Guo et al. 2022). The gradient of the cross-entropy w.r.t. the output layer's weight is the outer product
  ``(softmax(z) - onehot(y)) f^T``, so it is formed in closed form from the two factors returned by
  :func:`gradient_factors` - no backward pass and no per-sample full-model gradients. For an LM the error vector
  is averaged over the sample's supervised tokens (``TaskOutput.owner``) and multiplied by the sample's feature
  (the task's mean hidden state over those positions): ``mean_t(e_t) mean_t(h_t)^T``, a rank-one approximation
  of the exact ``mean_t(e_t h_t^T)`` (exact for classifiers, one unit per sample). When ``C*D`` exceeds
  ``max_dim`` (an LM vocabulary) the embedding is sketched with a seeded Kronecker Johnson-Lindenstrauss map
  ``(R_1 e) (x) (R_2 f)``, which preserves inner products in expectation and never forms the ``C*D`` vector.
* :func:`pairwise_distances`, :func:`similarity_columns`, :class:`Similarity`, :func:`medoid_index` - distances
  (``torch.cdist`` in float64, chunked) and kernels.

Rows are always in the order of the (id-sorted) :class:`~erasus_ray.data.IdDataset` passed in, so row ``i``
is the ``i``-th smallest id and "smallest index" tie-breaking is "smallest id" tie-breaking.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from erasus_ray.data import IdDataset, as_id_dataset, make_loader
from erasus_ray.errors import InvalidConfigError
from erasus_ray.tasks import Capability, Task
from erasus_ray.tasks.base import TaskOutput
from erasus_ray.utils import model_device

EMBEDDINGS = ("features", "gradient")
#: What each embedding reads of the task: penultimate features, and for last-layer gradients also the logits
#: (``softmax(z) - onehot(y)``). Geometry selectors add it to their requirements.
EMBEDDING_NEEDS: dict[str, frozenset[Capability]] = {
    "features": frozenset({Capability.LOSS, Capability.FEATURES}),
    "gradient": frozenset({Capability.LOSS, Capability.LOGITS, Capability.FEATURES}),
}
#: Largest number of matrix entries one chunk of a distance / similarity computation may hold (float64: 128 MiB).
CHUNK_ELEMENTS = 1 << 24


def _per_sample_mean(values: torch.Tensor, out: TaskOutput) -> torch.Tensor:
    """``[B, C]`` mean of unit rows ``values`` ``[N, C]`` over each sample's units (zeros for a sample without any)."""
    acc = torch.zeros(out.batch_size, values.shape[1], dtype=values.dtype, device=values.device)
    acc.index_add_(0, out.owner, values)
    counts = torch.bincount(out.owner, minlength=out.batch_size).clamp_min(1).to(values.dtype)
    return acc / counts[:, None]


def _batches(model: nn.Module, data: Any, task: Task, batch_size: int):
    ds = as_id_dataset(data)
    device = model_device(model)
    for batch in make_loader(ds, task.collate, batch_size=batch_size, shuffle=False):
        yield task.forward(model, batch.to(device).data, features=True)


def _features_of(out: TaskOutput) -> torch.Tensor:
    if out.features is None:  # pragma: no cover - every task provides features when asked
        raise RuntimeError("the task returned no features")
    return out.features.detach().float().flatten(1)


@torch.no_grad()
def feature_matrix(model: nn.Module, forget: IdDataset, task: Task, batch_size: int = 128) -> torch.Tensor:
    """``[n, D]`` penultimate features of ``forget`` (float32, on the model's device), rows in dataset order."""
    return torch.cat([_features_of(out) for out in _batches(model, forget, task, batch_size)])


@torch.no_grad()
def gradient_factors(
    model: nn.Module, forget: IdDataset, task: Task, batch_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(errors [n, C], features [n, D])``: the factors of the last-layer loss gradient ``errors_i features_i^T``.

    ``errors_i = softmax(z) - onehot(y)`` (the cross-entropy gradient w.r.t. the logits), averaged over an LM
    sample's supervised tokens.
    """
    errors, feats = [], []
    for out in _batches(model, forget, task, batch_size):
        probs = out.logits.detach().float().softmax(-1)
        probs[torch.arange(len(out.targets), device=probs.device), out.targets] -= 1.0
        errors.append(_per_sample_mean(probs, out))
        feats.append(_features_of(out))
    return torch.cat(errors), torch.cat(feats)


@torch.no_grad()
def output_distributions(model: nn.Module, forget: IdDataset, task: Task, batch_size: int = 128) -> torch.Tensor:
    """``[n, C]`` (float64) predictive distribution per sample: the softmax (classifier), or the entropy-weighted mean of the
    unit softmax vectors over an LM sample's supervised tokens (the ``w_r`` weighting of Agarwal et al. 2020)."""
    rows = []
    for out in _batches(model, forget, task, batch_size):
        logp = out.logits.detach().double().log_softmax(-1)  # float64: a confident model's small probabilities matter
        p = logp.exp()
        w = (-(p * logp).sum(-1, keepdim=True)).clamp_min(1e-12)  # entropy of each unit
        num = _per_sample_mean(w * p, out)
        den = _per_sample_mean(w, out).clamp_min(1e-12)
        rows.append(num / den)
    return torch.cat(rows)


def _gaussian(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(rows, cols, generator=generator, dtype=torch.float32) / math.sqrt(cols)


def outer_embedding(
    errors: torch.Tensor,
    features: torch.Tensor,
    *,
    proj_dim: int | None = None,
    max_dim: int = 1 << 15,
    seed: int = 0,
    bias: bool = False,
) -> torch.Tensor:
    """Rows ``vec(errors_i features_i^T)`` (``[n, C*D]``; ``C*(D+1)`` with ``bias``: the bias gradient is ``errors_i``).

    With ``proj_dim`` (or automatically when the exact width exceeds ``max_dim``) the rows are sketched as
    ``vec((R_1^T e_i)(R_2^T f_i)^T)`` with seeded Gaussian ``R_1 [C, p_1]``, ``R_2 [D, p_2]``,
    ``p_1 p_2 <= proj_dim``; ``E<sketch_i, sketch_j> = <g_i, g_j>``.
    """
    if bias:
        features = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype, device=features.device)], 1)
    n, c = errors.shape
    d = features.shape[1]
    if proj_dim is None and c * d > max_dim:
        proj_dim = max_dim
    if proj_dim is not None and proj_dim < c * d:
        if proj_dim < 1:
            raise InvalidConfigError(f"proj_dim must be a positive integer, got {proj_dim!r}")
        p1 = max(1, min(c, int(math.isqrt(proj_dim))))
        p2 = max(1, min(d, proj_dim // p1))
        g = torch.Generator().manual_seed(int(seed))
        r1 = _gaussian(c, p1, g).to(errors.device) if p1 < c else None
        r2 = _gaussian(d, p2, g).to(features.device) if p2 < d else None
        errors = errors @ r1 if r1 is not None else errors
        features = features @ r2 if r2 is not None else features
    return (errors[:, :, None] * features[:, None, :]).reshape(n, -1)


def gradient_embedding(
    model: nn.Module,
    forget: IdDataset,
    task: Task,
    batch_size: int = 128,
    *,
    proj_dim: int | None = None,
    max_dim: int = 1 << 15,
    seed: int = 0,
    bias: bool = False,
) -> torch.Tensor:
    """``[n, C*D]`` last-layer gradient embeddings ``(softmax(z_i) - onehot(y_i)) (x) f_i`` (BADGE / DeepCore).

    One forward pass, no backward: see :func:`gradient_factors` and :func:`outer_embedding` (sketching for wide
    outputs). Rows in dataset order.
    """
    errors, feats = gradient_factors(model, forget, task, batch_size)
    return outer_embedding(errors, feats, proj_dim=proj_dim, max_dim=max_dim, seed=seed, bias=bias)


def check_embedding(embedding: str) -> str:
    if embedding not in EMBEDDINGS:
        raise InvalidConfigError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
    return embedding


def embed(
    model: nn.Module,
    forget: IdDataset,
    task: Task,
    embedding: str = "features",
    batch_size: int = 128,
    *,
    seed: int = 0,
    proj_dim: int | None = None,
) -> torch.Tensor:
    """The ``[n, d]`` embedding a geometric selector works on: ``"features"`` or last-layer ``"gradient"``."""
    if check_embedding(embedding) == "features":
        return feature_matrix(model, forget, task, batch_size)
    return gradient_embedding(model, forget, task, batch_size, proj_dim=proj_dim, seed=seed)


# --------------------------------------------------------------------------------------------------- geometry


def _chunk_rows(n_cols: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, n_cols))


def pairwise_distances(
    x: torch.Tensor, y: torch.Tensor | None = None, *, squared: bool = False, chunk_size: int | None = None
) -> torch.Tensor:
    """``[n, m]`` Euclidean distances (``torch.cdist`` in float64, computed in row chunks to bound memory)."""
    x = x.double()
    y = x if y is None else y.double()
    step = chunk_size or _chunk_rows(len(y))
    out = torch.cat([torch.cdist(x[i : i + step], y) for i in range(0, len(x), step)]) if len(x) else x.new_zeros(0, len(y))
    return out.pow(2) if squared else out


def distances_to(x: torch.Tensor, j: int | torch.Tensor) -> torch.Tensor:
    """``[n]`` distances from every row of ``x`` to row(s) ``j`` (a single column of the distance matrix)."""
    idx = torch.as_tensor(j, device=x.device).reshape(-1)
    return pairwise_distances(x, x[idx]).reshape(len(x), -1).squeeze(1)


def medoid_index(x: torch.Tensor) -> int:
    """Row minimising the sum of distances to all rows (ties: smallest index), in chunks of rows."""
    step = _chunk_rows(len(x))
    sums = torch.cat([pairwise_distances(x[i : i + step], x).sum(1) for i in range(0, len(x), step)])
    return int(torch.argmin(sums))


def mean_sq_distance(x: torch.Tensor) -> float:
    """Mean of ``||x_i - x_j||^2`` over all ordered pairs, in closed form: ``2 (mean ||x||^2 - ||mean x||^2)``."""
    x = x.double()
    return float(2.0 * (x.pow(2).sum(1).mean() - x.mean(0).pow(2).sum()))


KERNELS = ("euclidean", "rbf", "cosine", "linear")


class Similarity:
    """Rows of the symmetric ``n x n`` similarity matrix of ``x``, precomputed (``n <= max_dense``) or on demand.

    Kernels: ``"euclidean"``: ``d_max - ||x_i - x_j||`` (CRAIG's non-negative similarity; not PSD);
    ``"rbf"``: ``exp(-gamma ||x_i - x_j||^2)`` with ``gamma = 1 / mean squared distance`` by default;
    ``"cosine"``: ``(1 + cos) / 2`` in ``[0, 1]``; ``"linear"``: ``<x_i, x_j>``. All in float64. Rows (not
    columns) are the access unit: contiguous in memory, and equal to columns by symmetry.
    """

    def __init__(self, x: torch.Tensor, kernel: str = "euclidean", *, gamma: float | None = None, max_dense: int = 5000) -> None:
        if kernel not in KERNELS:
            raise InvalidConfigError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.x = x.double()
        if kernel == "cosine":
            self.x = F.normalize(self.x, dim=1)
        self.kernel = kernel
        self.n = len(x)
        self.device = self.x.device
        self.gamma = float(gamma) if gamma is not None else (1.0 / max(mean_sq_distance(self.x), 1e-12))
        self.d_max = 0.0
        self.matrix: torch.Tensor | None = None
        if self.n <= max_dense:
            self.matrix = self._raw(self.x)
            if kernel == "euclidean":
                self.d_max = float(self.matrix.max()) if self.n else 0.0
                self.matrix = self.d_max - self.matrix
        elif kernel == "euclidean":
            step = _chunk_rows(self.n)
            self.d_max = max(float(pairwise_distances(self.x[i : i + step], self.x).max()) for i in range(0, self.n, step))

    def _raw(self, points: torch.Tensor) -> torch.Tensor:
        """``[m, n]`` kernel (raw distance for euclidean) between ``points`` and every row of ``x``."""
        if self.kernel == "euclidean":
            return pairwise_distances(points, self.x)
        if self.kernel == "rbf":
            return torch.exp(-self.gamma * pairwise_distances(points, self.x, squared=True))
        if self.kernel == "cosine":
            return (1.0 + points @ self.x.T) / 2.0
        return points @ self.x.T

    def _computed(self, points: torch.Tensor) -> torch.Tensor:
        raw = self._raw(points)
        return self.d_max - raw if self.kernel == "euclidean" else raw

    def row(self, j: int) -> torch.Tensor:
        """``[n]`` similarities of row ``j`` to every row (a view when precomputed)."""
        if self.matrix is not None:
            return self.matrix[int(j)]
        return self._computed(self.x[int(j)][None])[0]

    def rows(self, idx: Any) -> torch.Tensor:
        """``[len(idx), n]`` similarity rows (= columns: the matrix is symmetric)."""
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64), device=self.device).reshape(-1)
        if self.matrix is not None:
            return self.matrix[idx]
        return self._computed(self.x[idx])

    def cols(self, idx: Any) -> torch.Tensor:
        """``[n, len(idx)]`` similarity columns."""
        return self.rows(idx).T

    def diag(self) -> torch.Tensor:
        if self.matrix is not None:
            return self.matrix.diagonal().clone()
        if self.kernel == "euclidean":
            return torch.full((self.n,), self.d_max, dtype=torch.float64, device=self.device)
        if self.kernel == "rbf":
            return torch.ones(self.n, dtype=torch.float64, device=self.device)
        if self.kernel == "cosine":
            return (1.0 + self.x.pow(2).sum(1)) / 2.0
        return self.x.pow(2).sum(1)

    def reduce_rows(self, idx: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``cat(fn(rows(chunk)))`` over chunks of ``idx`` (``None``: all rows, as views of the precomputed matrix),
        holding at most ~``CHUNK_ELEMENTS`` entries at once; ``fn`` maps ``[m, n]`` rows to ``[m]``."""
        step = _chunk_rows(self.n)
        if idx is None:
            if self.matrix is not None:
                parts = [fn(self.matrix[i : i + step]) for i in range(0, self.n, step)]
            else:
                parts = [fn(self._computed(self.x[i : i + step])) for i in range(0, self.n, step)]
        else:
            idx = torch.as_tensor(np.asarray(idx, dtype=np.int64)).reshape(-1)
            parts = [fn(self.rows(idx[i : i + step])) for i in range(0, len(idx), step)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=self.device)

    def rowsum(self) -> torch.Tensor:
        """``[n]`` row sums (= column sums), in chunks."""
        return self.reduce_rows(None, lambda r: r.sum(1))


def similarity_columns(x: torch.Tensor, idx: Any, kernel: str = "euclidean", gamma: float | None = None) -> torch.Tensor:
    """Convenience: ``[n, len(idx)]`` columns of ``Similarity(x, kernel)``."""
    return Similarity(x, kernel, gamma=gamma).cols(idx)


def symmetric_kl_to(p: torch.Tensor, j: int | torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``[n]`` symmetric KL ``0.5 (KL(p_i || p_j) + KL(p_j || p_i)) = 0.5 sum_c (p_ic - p_jc)(log p_ic - log p_jc)``
    between every row of ``p`` and row(s) ``j`` (vectorised: two matrix products). Probabilities are floored at
    ``eps`` (and renormalised) so that the logarithms are finite."""
    p = p.double().clamp_min(eps)
    p = p / p.sum(1, keepdim=True)
    logp = p.log()
    idx = torch.as_tensor(j, device=p.device).reshape(-1)
    h = (p * logp).sum(1)
    d = 0.5 * (h[:, None] + h[idx][None, :] - p @ logp[idx].T - logp @ p[idx].T)
    return d.clamp_min(0).reshape(len(p), -1).squeeze(1)


def to_numpy_ids(forget: IdDataset, rows: list[int] | np.ndarray) -> np.ndarray:
    """Dataset ids of ``rows`` (int64 copy)."""
    return forget.ids[np.asarray(rows, dtype=np.int64)].astype(np.int64).copy()


def rows_of(forget: IdDataset, ids: Any) -> np.ndarray:
    """Rows of ``forget`` holding dataset ``ids`` (int64), in the order given."""
    row = forget.row_of()
    return np.asarray([row[int(i)] for i in np.asarray(ids).reshape(-1)], dtype=np.int64)


def score_map(forget: IdDataset, scores: torch.Tensor | np.ndarray) -> dict[int, float]:
    vals = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    return {int(i): float(s) for i, s in zip(forget.ids, vals)}
