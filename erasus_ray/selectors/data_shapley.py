"""Data Shapley values of forget samples: exact KNN-Shapley (Jia, Dao, Wang, Hubis, Gurel, Li, Zhang, Spanos &
Song, VLDB 2019, "Efficient Task-Specific Data Valuation for Nearest Neighbor Algorithms") and truncated
Monte-Carlo Shapley (Ghorbani & Zou, ICML 2019, "Data Shapley: Equitable Valuation of Data for Machine Learning")."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from erasus_ray.data import IdDataset
from erasus_ray.errors import InvalidConfigError
from erasus_ray.selectors._reference import labels_and_features, reference_set
from erasus_ray.selectors.base import SELECTORS, Coreset, ScoreSelector
from erasus_ray.tasks import Capability, Task

METHODS = ("knn", "tmc")
POOLS = ("forget+reference", "forget")


def _ranks(train_x: torch.Tensor, test_x: torch.Tensor) -> torch.Tensor:
    """``[T, N]`` order of the training rows by distance to each test point (ties: smaller row first)."""
    dist = torch.cdist(test_x.double(), train_x.double())
    return torch.sort(dist, dim=1, stable=True).indices


def knn_utility(train_y: np.ndarray, order: np.ndarray, test_y: np.ndarray, subset: np.ndarray | list[int], k: int) -> float:
    """The KNN utility of the training rows ``subset``: mean over test points of (number of the ``min(k, |S|)``
    nearest rows of ``subset`` whose label equals the test label) / ``k``. ``order``: ``[T, N]`` from :func:`_ranks`."""
    chosen = np.zeros(order.shape[1], dtype=bool)
    chosen[np.asarray(subset, dtype=np.int64)] = True
    total = 0.0
    for t in range(order.shape[0]):
        near = [j for j in order[t] if chosen[j]][:k]
        total += sum(float(train_y[j] == test_y[t]) for j in near) / k
    return total / order.shape[0]


def knn_shapley(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, k: int, chunk: int = 256
) -> np.ndarray:
    """``[N]`` exact Shapley values of the training rows for the KNN utility (:func:`knn_utility`), averaged over the
    test points, by the recursion of Jia et al. (2019, Theorem 1) with ``alpha_1..alpha_N`` the rows sorted by
    distance to the test point:
    ``s(alpha_N) = 1[y_alpha_N = y] / N`` (``1[.] / k`` when ``k > N``: the paper assumes ``k <= N``);
    ``s(alpha_i) = s(alpha_{i+1}) + (1[y_alpha_i = y] - 1[y_alpha_{i+1} = y]) / k * min(k, i) / i``.
    Vectorised over test points (a reverse cumulative sum), ``O(T N log N)``."""
    n = len(train_x)
    values = torch.zeros(n, dtype=torch.float64)
    i = torch.arange(1, n, dtype=torch.float64)  # 1..N-1
    coef = torch.clamp(i, max=k) / i / k
    train_y = train_y.reshape(-1)
    for start in range(0, len(test_x), chunk):
        order = _ranks(train_x, test_x[start : start + chunk])
        match = (train_y[order] == test_y[start : start + chunk].reshape(-1, 1)).double()  # [t, N] in sorted order
        s = torch.zeros_like(match)
        s[:, -1] = match[:, -1] * min(k, n) / (n * k)  # = 1[match] / N for k <= N (the paper's case)
        if n > 1:
            steps = (match[:, :-1] - match[:, 1:]) * coef  # [t, N-1]: s(alpha_i) - s(alpha_{i+1})
            s[:, :-1] = s[:, -1:] + steps.flip(1).cumsum(1).flip(1)
        values += torch.zeros_like(s).scatter_(1, order, s).sum(0)
    return (values / len(test_x)).numpy()


def tmc_shapley(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, k: int, *,
    num_permutations: int = 200, tolerance: float = 0.01, seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """``[N]`` truncated Monte-Carlo Shapley estimates (Ghorbani & Zou 2019, Algorithm 1) for the same KNN utility.

    For each seeded random permutation the rows are added one at a time and each gets its marginal contribution
    ``U(prefix + row) - U(prefix)``, with ``U(empty) = 0``. Truncation: once ``|U(all) - U(prefix)| < tolerance *
    |U(all)|`` the remaining marginals of that permutation are set to 0 (``tolerance=0`` disables it). The utility of
    each prefix is updated incrementally (each test point keeps its ``k`` nearest rows so far), ``O(T k)`` per step.
    """
    n = len(train_x)
    order = _ranks(train_x, test_x).numpy()
    rank = np.empty_like(order)
    rank[np.arange(len(order))[:, None], order] = np.arange(n)[None, :]  # rank[t, j]: position of row j for point t
    match = (train_y.reshape(1, -1).numpy() == test_y.reshape(-1, 1).numpy()).astype(np.float64)  # [T, N]
    t_idx = np.arange(len(test_x))
    full = float((np.take_along_axis(match, order[:, :k], 1)).sum(1).mean() / k)
    rng = np.random.default_rng(seed)
    total = np.zeros(n)
    truncated_steps = 0
    for _ in range(int(num_permutations)):
        perm = rng.permutation(n)
        best_rank = np.full((len(test_x), k), n, dtype=np.int64)  # slots hold ranks; n = empty
        best_match = np.zeros((len(test_x), k))
        prev = 0.0
        for pos, j in enumerate(perm):
            if abs(full - prev) < tolerance * abs(full):
                truncated_steps += n - pos
                break
            worst = best_rank.argmax(1)
            better = rank[:, j] < best_rank[t_idx, worst]
            rows = t_idx[better]
            best_rank[rows, worst[better]] = rank[better, j]
            best_match[rows, worst[better]] = match[better, j]
            value = float(best_match.sum() / (k * len(test_x)))
            total[j] += value - prev
            prev = value
    info = {"utility_full": full, "truncated_fraction": truncated_steps / max(1, n * int(num_permutations))}
    return total / int(num_permutations), info


@SELECTORS.register("data_shapley")
class DataShapleySelector(ScoreSelector):
    """Score each forget sample by its data Shapley value for a K-nearest-neighbour classifier on the model's
    penultimate embeddings, evaluated on labelled test points (the retain set by default).

    ``method="knn"`` (default): exact KNN-Shapley in closed form (Jia et al. 2019), ``O(T N log N)``.
    ``method="tmc"``: truncated Monte-Carlo Shapley (Ghorbani & Zou 2019) with the same KNN utility, so the
    estimate converges to the exact value (``num_permutations``, truncation ``tolerance``, ``seed``); useful as a
    check and as the template for costlier utilities.

    Players (where the papers leave freedom): ``pool="forget+reference"`` (default) - the reference set (``validation=``
    / ``reference=``, else ``retain=``; at most ``max_reference`` rows, a seeded subsample) is split in two seeded
    halves; one half joins the forget samples as players (the classifier's training set), the other half are the
    test points; only forget values are reported. This keeps values informative when no test point shares a forget
    label (forgetting a whole class: a forget sample's value is then how much it displaces correct neighbours of
    retained points, <= 0). ``pool="forget"``: the forget samples are the only players and every reference row is
    a test point. No reference data raises :class:`InvalidConfigError`. Classifiers only (KNN needs labels).

    ``order="low"`` (default) keeps the least valuable forget samples: those whose presence most hurts the KNN
    classifier on retained points (a forget sample sitting among retained samples of other labels) - the samples
    most entangled with what must be kept. Measured on digits class 3 (10% coreset, ``grad_diff``, 3 seeds): Avg.Gap
    to the gold model 0.0025 with ``"low"`` vs 0.019 with ``"high"`` (retain accuracy 0.993 vs 0.954).

    Cost: one forward pass over forget and reference rows; then ``O(T N log N)`` (knn) or
    ``O(num_permutations N T k)`` (tmc) on the CPU.

    Example:
        >>> coreset = DataShapleySelector(k_neighbors=5).select(model, forget, fraction=0.1, retain=retain)
        >>> DataShapleySelector(method="tmc", num_permutations=500).select(model, forget, k=10, validation=val)
    """

    #: KNN-Shapley over features with one class label per sample (the units' targets).
    requires = frozenset({Capability.LOGITS, Capability.LABELS, Capability.FEATURES})

    default_order = "low"
    needs_retain: ClassVar[bool] = True
    #: Shapley values depend on every player: run centrally.
    distributed_merge = "central"
    central_reason = "a Shapley value depends on every player: all forget samples are valued together"

    def __init__(
        self,
        batch_size: int = 128,
        order: str | None = None,
        method: str = "knn",
        k_neighbors: int = 5,
        pool: str = "forget+reference",
        validation: Any = None,
        max_reference: int | None = 2000,
        num_permutations: int = 100,
        tolerance: float = 0.01,
    ) -> None:
        super().__init__(batch_size=batch_size, order=order)
        if method not in METHODS:
            raise InvalidConfigError(f"method must be one of {METHODS}, got {method!r}")
        if pool not in POOLS:
            raise InvalidConfigError(f"pool must be one of {POOLS}, got {pool!r}")
        if isinstance(k_neighbors, bool) or int(k_neighbors) < 1:
            raise InvalidConfigError(f"k_neighbors must be a positive integer, got {k_neighbors!r}")
        if int(num_permutations) < 1:
            raise InvalidConfigError(f"num_permutations must be a positive integer, got {num_permutations!r}")
        if not float(tolerance) >= 0:
            raise InvalidConfigError(f"tolerance must be >= 0, got {tolerance!r}")
        self.method = method
        self.k_neighbors = int(k_neighbors)
        self.pool = pool
        self.validation = validation
        self.max_reference = max_reference
        self.num_permutations = int(num_permutations)
        self.tolerance = float(tolerance)

    def _values(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, context: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        ref = reference_set(self.name, context, self.validation, seed=seed, max_size=self.max_reference)
        assert ref is not None
        ref = ref.exclude(forget.ids) if ref.base is forget.base else ref
        fy, fx = labels_and_features(model, forget, task, self.batch_size)
        ry, rx = labels_and_features(model, ref, task, self.batch_size)
        if self.pool == "forget+reference" and len(ref) >= 2:
            perm = np.random.default_rng(seed + 1).permutation(len(ref))
            players, tests = np.sort(perm[: len(ref) // 2]), np.sort(perm[len(ref) // 2 :])
            train_x, train_y = torch.cat([fx, rx[players]]), torch.cat([fy, ry[players]])
            test_x, test_y = rx[tests], ry[tests]
        else:
            train_x, train_y, test_x, test_y = fx, fy, rx, ry
        info: dict[str, Any] = {"method": self.method, "pool": self.pool, "players": len(train_x), "test_points": len(test_x), "k_neighbors": self.k_neighbors}
        if self.method == "knn":
            values = knn_shapley(train_x, train_y, test_x, test_y, self.k_neighbors)
        else:
            values, extra = tmc_shapley(
                train_x, train_y, test_x, test_y, self.k_neighbors,
                num_permutations=self.num_permutations, tolerance=self.tolerance, seed=seed,
            )
            info.update(extra)
        return values[: len(forget)], info

    def score(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, **context: Any) -> np.ndarray:
        return self._values(model, forget, task, seed, context)[0]

    def _select(self, model: nn.Module, forget: IdDataset, task: Task, budget: int, seed: int, **context: Any) -> Coreset:
        values, info = self._values(model, forget, task, seed, context)
        coreset = self.coreset_from_scores(forget.ids, values, budget)
        coreset.info.update(info)
        return coreset
