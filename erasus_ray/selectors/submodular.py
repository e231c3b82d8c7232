"""Submodular coreset selection: facility location, graph cut and log-determinant, maximised by the naive greedy
(Nemhauser, Wolsey & Fisher 1978: ``1 - 1/e`` for monotone functions), Minoux's lazy greedy (1978: same result,
fewer evaluations, via a heap of stale upper bounds) or stochastic greedy (Mirzasoleiman et al., AAAI 2015, "Lazier
Than Lazy Greedy": ``1 - 1/e - epsilon`` in expectation from ``(n/k) log(1/epsilon)`` evaluations per step).
The functions follow Iyer et al., "Submodular Combinatorial Information Measures" (ALT 2021) / submodlib."""

from __future__ import annotations

import heapq
import math
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from erasus_ray.data import IdDataset
from erasus_ray.errors import InvalidConfigError
from erasus_ray.selectors._embeddings import EMBEDDING_NEEDS, Similarity, check_embedding, embed, rows_of, score_map, to_numpy_ids
from erasus_ray.selectors.base import SELECTORS, Coreset, Selector
from erasus_ray.tasks import Capability, Task

FUNCTIONS = ("facility_location", "graph_cut", "log_det")
OPTIMIZERS = ("naive", "lazy", "stochastic")


class SetFunction:
    """A submodular ``F`` with ``F(empty) = 0`` over the rows of a :class:`Similarity`, with incremental state.

    ``gains(idx)`` returns the marginal gains ``F(S + j) - F(S)`` (float64) of rows ``idx`` (``None``: all rows)
    given the current ``S``; ``gain(j)`` the same for one row; ``add(j)`` adds row ``j`` to ``S`` and returns its
    gain; ``value`` is ``F(S)``.
    """

    def __init__(self, sim: Similarity) -> None:
        self.sim = sim
        self.n = sim.n
        self.value = 0.0

    def gains(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def gain(self, j: int) -> float:
        return float(self.gains(torch.tensor([j]))[0])

    def _add(self, j: int) -> None:
        raise NotImplementedError

    def add(self, j: int) -> float:
        gain = self.gain(j)
        self._add(j)
        self.value += gain
        return gain


class FacilityLocation(SetFunction):
    """``F(S) = sum_{i in V} max_{j in S} s_ij`` (monotone; needs ``s >= 0``): every sample is represented by
    its most similar chosen one."""

    def __init__(self, sim: Similarity) -> None:
        super().__init__(sim)
        self.cover = torch.zeros(self.n, dtype=torch.float64, device=sim.device)

    def gains(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.sim.reduce_rows(idx, lambda r: (r - self.cover).clamp_min(0).sum(1))

    def gain(self, j: int) -> float:
        return float((self.sim.row(j) - self.cover).clamp_min(0).sum())

    def _add(self, j: int) -> None:
        self.cover = torch.maximum(self.cover, self.sim.row(j))


class GraphCut(SetFunction):
    """``F(S) = sum_{i in V, j in S} s_ij - lam sum_{i, j in S} s_ij``: representation minus redundancy
    (monotone for ``lam <= 0.5``, submodular for ``lam >= 0``)."""

    def __init__(self, sim: Similarity, lam: float = 0.5) -> None:
        super().__init__(sim)
        self.lam = float(lam)
        self.total = sim.rowsum()
        self.diag = sim.diag()
        self.within = torch.zeros(self.n, dtype=torch.float64, device=sim.device)  # sum_{s in S} s_is

    def gains(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        g = self.total - self.lam * (2.0 * self.within + self.diag)
        return g if idx is None else g[torch.as_tensor(idx).to(g.device)]

    def gain(self, j: int) -> float:
        return float(self.total[j] - self.lam * (2.0 * self.within[j] + self.diag[j]))

    def _add(self, j: int) -> None:
        self.within = self.within + self.sim.row(j)


class LogDeterminant(SetFunction):
    """``F(S) = log det(I + K_S)`` for a PSD kernel ``K`` (monotone submodular; the DPP log-likelihood of ``S``
    under ``L = K``). Gains via the incremental Cholesky of Chen, Zhang & Zhou (NeurIPS 2018, fast greedy MAP for
    DPPs): ``gain_j = log d_j^2`` with ``d_j^2`` the Schur complement, updated for every row in ``O(n |S|)``."""

    def __init__(self, sim: Similarity) -> None:
        super().__init__(sim)
        if sim.kernel == "euclidean":
            raise InvalidConfigError("log_det needs a PSD kernel: use kernel='rbf', 'cosine' or 'linear', not 'euclidean'")
        self.d2 = 1.0 + sim.diag()
        self.factor = torch.zeros(self.n, 0, dtype=torch.float64, device=sim.device)

    def gains(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        g = torch.log(self.d2.clamp_min(1e-300))
        return g if idx is None else g[torch.as_tensor(idx).to(g.device)]

    def gain(self, j: int) -> float:
        return math.log(max(float(self.d2[j]), 1e-300))

    def _add(self, j: int) -> None:
        col = self.sim.row(j).clone()
        col[j] += 1.0  # row of I + K
        dj = math.sqrt(max(float(self.d2[j]), 1e-300))
        e = (col - self.factor @ self.factor[j]) / dj
        self.factor = torch.cat([self.factor, e[:, None]], 1)
        self.d2 = self.d2 - e.pow(2)
        self.d2[j] = 0.0


def make_function(name: str, sim: Similarity, graph_cut_lambda: float = 0.5) -> SetFunction:
    if name == "facility_location":
        return FacilityLocation(sim)
    if name == "graph_cut":
        return GraphCut(sim, graph_cut_lambda)
    if name == "log_det":
        return LogDeterminant(sim)
    raise InvalidConfigError(f"function must be one of {FUNCTIONS}, got {name!r}")


def maximize(fn: SetFunction, k: int, optimizer: str = "lazy", *, epsilon: float = 0.01, seed: int = 0) -> tuple[list[int], list[float], int]:
    """Greedy maximisation of ``fn`` under ``|S| = k``. Returns ``(rows in selection order, gain of each pick,
    number of marginal-gain evaluations)``. Ties go to the smallest row, so ``naive`` and ``lazy`` return the
    same sequence. ``k`` rows are always returned (gains may be <= 0 for non-monotone functions)."""
    n = fn.n
    rows: list[int] = []
    gains: list[float] = []
    evals = 0
    if optimizer == "naive":
        for _ in range(k):
            g = fn.gains(None).clone()  # all rows at once (no gather), chosen ones masked
            evals += n - len(rows)
            if rows:
                g[torch.as_tensor(rows, device=g.device)] = -float("inf")
            j = int(torch.argmax(g))  # argmax returns the first maximum: smallest row on ties
            gains.append(fn.add(j))
            rows.append(j)
    elif optimizer == "lazy":
        initial = fn.gains(None).cpu().tolist()
        evals += n
        heap = [(-g, i) for i, g in enumerate(initial)]
        heapq.heapify(heap)
        for _ in range(k):
            while True:
                _, j = heapq.heappop(heap)
                g = fn.gain(j)
                evals += 1
                # A fresh gain that still beats every stale upper bound (ties: smaller row) is the true argmax.
                if not heap or (-g, j) <= heap[0]:
                    break
                heapq.heappush(heap, (-g, j))
            gains.append(fn.add(j))
            rows.append(j)
    elif optimizer == "stochastic":
        if not 0.0 < epsilon < 1.0:
            raise InvalidConfigError(f"epsilon must be in (0, 1), got {epsilon!r}")
        rng = np.random.default_rng(seed)
        size = max(1, math.ceil(n / k * math.log(1.0 / epsilon)))
        free = np.ones(n, dtype=bool)
        for _ in range(k):
            remaining = np.flatnonzero(free)
            cand = np.sort(rng.choice(remaining, size=min(size, len(remaining)), replace=False))
            g = fn.gains(torch.as_tensor(cand))
            evals += len(cand)
            j = int(cand[int(torch.argmax(g))])
            gains.append(fn.add(j))
            rows.append(j)
            free[j] = False
    else:
        raise InvalidConfigError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    return rows, gains, evals


def greedy_scores(fn: SetFunction, rows: list[int], gains: list[float]) -> torch.Tensor:
    """Per-row scores: a chosen row's marginal gain when it was picked; an unchosen row's marginal gain given
    the final set (what it would still add)."""
    scores = fn.gains(None).double().cpu().clone()
    scores[torch.as_tensor(rows)] = torch.tensor(gains, dtype=torch.float64)
    return scores


@SELECTORS.register("submodular")
class SubmodularSelector(Selector):
    """Maximise a submodular function of the forget set's penultimate features (or gradient embeddings):

    * ``function="facility_location"`` (default): ``sum_i max_{j in S} s_ij`` - every forget sample has a similar
      chosen one (representativeness);
    * ``"graph_cut"``: ``sum_{i, j in S} s_ij - lam sum_{i, j in S} s_ij`` (``graph_cut_lambda``, default 0.5);
    * ``"log_det"``: ``log det(I + K_S)`` - diversity (DPP MAP).

    ``kernel``: ``"auto"`` is ``"euclidean"`` (``d_max - d``, CRAIG's similarity) for facility location and graph
    cut, ``"rbf"`` (``gamma = 1 / mean squared distance``) for log-det; or ``"rbf"``, ``"cosine"``, ``"linear"``.
    ``optimizer``: ``"lazy"`` (default, Minoux's heap-based lazy greedy: exactly the naive greedy's result),
    ``"naive"``, or ``"stochastic"`` (``epsilon``, default 0.01; candidates drawn with ``seed``).

    ``Coreset.scores``: each chosen id's marginal gain when it was picked, each other id's marginal gain given the
    final set. ``info``: ``objective`` (``F(S)``), ``gains`` (per pick), ``evaluations`` (marginal-gain calls).

    Cost: one forward pass; an ``n x n`` similarity in float64 for ``n <= max_dense`` (5000: 200 MB), else columns
    recomputed on demand; naive greedy ``O(k n^2)``, lazy typically far fewer, stochastic ``O(n^2 log(1/eps))``.

    Example:
        >>> sel = SubmodularSelector(function="facility_location", optimizer="lazy")
        >>> coreset = sel.select(model, forget_loader, fraction=0.1)
    """

    #: embedding='features' (default); 'gradient' also reads logits (see requirements()).
    requires = frozenset({Capability.FEATURES})

    def __init__(
        self,
        batch_size: int = 128,
        function: str = "facility_location",
        optimizer: str = "lazy",
        embedding: str = "features",
        kernel: str = "auto",
        epsilon: float = 0.01,
        graph_cut_lambda: float = 0.5,
        max_dense: int = 5000,
        proj_dim: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size)
        if function not in FUNCTIONS:
            raise InvalidConfigError(f"function must be one of {FUNCTIONS}, got {function!r}")
        if optimizer not in OPTIMIZERS:
            raise InvalidConfigError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if not 0.0 < float(epsilon) < 1.0:
            raise InvalidConfigError(f"epsilon must be in (0, 1), got {epsilon!r}")
        if float(graph_cut_lambda) < 0:
            raise InvalidConfigError(f"graph_cut_lambda must be >= 0, got {graph_cut_lambda!r}")
        if kernel == "auto":
            kernel = "rbf" if function == "log_det" else "euclidean"
        if function == "log_det" and kernel == "euclidean":
            raise InvalidConfigError("log_det needs a PSD kernel: use kernel='rbf', 'cosine' or 'linear'")
        self.function = function
        self.optimizer = optimizer
        self.embedding = check_embedding(embedding)
        self.kernel = kernel
        self.epsilon = float(epsilon)
        self.graph_cut_lambda = float(graph_cut_lambda)
        self.max_dense = int(max_dense)
        self.proj_dim = proj_dim

    def requirements(self) -> frozenset[Capability]:
        """What its ``embedding`` reads (:data:`~erasus_ray.selectors._embeddings.EMBEDDING_NEEDS`)."""
        return EMBEDDING_NEEDS[self.embedding]

    def run(self, x: torch.Tensor, budget: int, seed: int) -> tuple[SetFunction, list[int], list[float], int]:
        """Greedy on an embedding ``x`` ``[n, d]`` (rows sorted by id): ``(function, rows, gains, evaluations)``."""
        sim = Similarity(x, self.kernel, max_dense=self.max_dense)
        fn = make_function(self.function, sim, self.graph_cut_lambda)
        rows, gains, evals = maximize(fn, budget, self.optimizer, epsilon=self.epsilon, seed=seed)
        return fn, rows, gains, evals

    def _select(self, model: nn.Module, forget: IdDataset, task: Task, budget: int, seed: int, **context: Any) -> Coreset:
        x = embed(model, forget, task, self.embedding, self.batch_size, seed=seed, proj_dim=self.proj_dim)
        fn, rows, gains, evals = self.run(x, budget, seed)
        return Coreset(
            ids=to_numpy_ids(forget, rows),
            weights=np.full(budget, len(forget) / budget),
            scores=score_map(forget, greedy_scores(fn, rows, gains)),
            info={
                "objective": fn.value,
                "gains": gains,
                "evaluations": evals,
                "function": self.function,
                "optimizer": self.optimizer,
                "kernel": self.kernel,
                "embedding": self.embedding,
            },
        )

    objective_sense = "max"

    def set_objective(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, **context: Any) -> Callable[[np.ndarray], float]:
        """``F(S)`` with the ground set = every forget sample."""
        x = embed(model, forget, task, self.embedding, self.batch_size, seed=seed, proj_dim=self.proj_dim)
        sim = Similarity(x, self.kernel, max_dense=self.max_dense)

        def value(ids: np.ndarray) -> float:
            fn = make_function(self.function, sim, self.graph_cut_lambda)
            for r in rows_of(forget, ids):
                fn.add(int(r))
            return float(fn.value)

        return value
