"""Selectors against independent references written from their papers' definitions, on tiny problems.

Each reference below is written from the published algorithm (numpy / scipy / autograd), never with the library's
own helpers; the selector runs end to end (task adapter, id-sorted forget set, dataset ids that are not positions).
The model is ``Flatten -> Linear``, so the penultimate features the geometric selectors use are the inputs ``x``
themselves and the last layer is the whole model.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import nnls
from scipy.stats import chisquare
from torch import nn
from torch.utils.data import TensorDataset

from erasus_ray.selectors import get_selector
from erasus_ray.tasks import ClassificationTask


class _IdTensors(TensorDataset):
    """A TensorDataset whose dataset ids are not its positions (``ids = 100 + 7 * position``)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, offset: int = 100) -> None:
        super().__init__(x, y)
        self.ids = offset + 7 * np.arange(len(x))


def _problem(x: np.ndarray, y: np.ndarray | None = None, classes: int = 3, bias: bool = True, seed: int = 0):
    """(model, dataset, task, ids) with features = ``x`` (float64)."""
    x_t = torch.as_tensor(x, dtype=torch.float64)
    y_t = torch.as_tensor(np.arange(len(x)) % classes if y is None else y, dtype=torch.long)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(x.shape[1], classes, bias=bias)).double()
    data = _IdTensors(x_t, y_t)
    return model, data, ClassificationTask(), data.ids


def _rows(ids_all: np.ndarray, picked: np.ndarray) -> list[int]:
    where = {int(i): r for r, i in enumerate(ids_all)}
    return [where[int(i)] for i in picked]


def _sq_dists(x: np.ndarray) -> np.ndarray:
    return ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)


# ------------------------------------------------------------------------------------------------ k-means++


def _d2_sampler(x: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """k-means++ seeding (Arthur & Vassilvitskii 2007, Sec. 2.2): c_1 uniform; c_t = x' with probability
    D(x')^2 / sum_x D(x)^2, D(x) the distance to the nearest centre chosen so far."""
    d2 = _sq_dists(x)
    chosen = [int(rng.integers(len(x)))]
    for _ in range(1, k):
        dmin = d2[:, chosen].min(1)
        chosen.append(int(rng.choice(len(x), p=dmin / dmin.sum())))
    return chosen


def test_kmeans_pp_equals_a_hand_written_d2_sampler_on_the_same_rng_stream():
    x = np.random.default_rng(1).normal(size=(12, 3))
    model, data, task, ids = _problem(x)
    for seed in range(5):
        core = get_selector("kmeans_pp").select(model, data, task=task, k=4, seed=seed)
        ref = _d2_sampler(x, 4, np.random.default_rng(seed))
        assert _rows(ids, core.ids) == ref, seed
        assert core.info["objective"] == pytest.approx(_sq_dists(x)[:, ref].min(1).sum(), rel=1e-6)


def test_kmeans_pp_second_pick_follows_the_d2_distribution():
    """Implementation-independent: over many seeds the frequency of the second seed matches
    P(c_2 = j) = (1/n) sum_i D(j, i)^2 / sum_l D(l, i)^2 (chi-square); a uniform second pick is rejected."""
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [0.5, 0.5], [-1.0, 1.5]])
    n, trials = len(x), 3000
    model, data, task, ids = _problem(x)
    sel = get_selector("kmeans_pp")
    second = np.zeros(n)
    for seed in range(trials):
        core = sel.select(model, data, task=task, k=2, seed=seed)
        second[_rows(ids, core.ids)[1]] += 1
    d2 = _sq_dists(x)
    expected = (d2 / d2.sum(0, keepdims=True)).mean(1) * trials  # column i: D^2 distribution given c_1 = i
    assert chisquare(second, expected).pvalue > 1e-3, (second, expected)
    assert chisquare(second, np.full(n, trials / n)).pvalue < 1e-6  # the test tells D^2 from uniform


# ------------------------------------------------------------------------------------------------ random


def test_random_ids_are_valid_and_uniform_over_subsets():
    """Every k-subset equally likely (chi-square over all C(5, 2) subsets), each id's inclusion ~ k/n, and only
    dataset ids (not positions) ever come back."""
    x = np.random.default_rng(0).normal(size=(5, 2))
    model, data, task, ids = _problem(x)
    sel, trials, k = get_selector("random"), 3000, 2
    subsets = {s: 0 for s in itertools.combinations(ids.tolist(), k)}
    inclusion = {int(i): 0 for i in ids}
    for seed in range(trials):
        core = sel.select(model, data, task=task, k=k, seed=seed)
        picked = core.ids.tolist()
        assert len(set(picked)) == k and set(picked) <= set(ids.tolist())
        subsets[tuple(sorted(picked))] += 1
        for i in picked:
            inclusion[i] += 1
    counts = np.array(list(subsets.values()))
    assert chisquare(counts).pvalue > 1e-3, counts
    freq = np.array(list(inclusion.values())) / trials
    assert np.abs(freq - k / len(ids)).max() < 5 * np.sqrt(0.4 * 0.6 / trials), freq


# ------------------------------------------------------------------------------------------------ contextual diversity


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def test_contextual_diversity_equals_greedy_k_center_under_symmetric_kl():
    """Agarwal et al. 2020: d(i, j) = 0.5 (KL(P_i || P_j) + KL(P_j || P_i)) between predicted class distributions;
    k-center greedy from the medoid (min summed distance), farthest point each step."""
    x = np.random.default_rng(0).normal(size=(14, 4)) * 1.5
    model, data, task, ids = _problem(x, classes=4)
    with torch.no_grad():
        p = _softmax(model(torch.as_tensor(x)).numpy())
    kl = (p[:, None, :] * (np.log(p[:, None, :]) - np.log(p[None, :, :]))).sum(-1)  # KL(P_i || P_j)
    d = 0.5 * (kl + kl.T)
    chosen = [int(np.argmin(d.sum(1)))]
    for _ in range(4):
        far = d[:, chosen].min(1)
        far[chosen] = -1
        chosen.append(int(np.argmax(far)))
    core = get_selector("contextual_diversity").select(model, data, task=task, k=5)
    assert _rows(ids, core.ids) == chosen
    assert core.info["objective"] == pytest.approx(d[:, chosen].min(1).max(), rel=1e-6)
    # the distance matters: plain Euclidean k-center on the same probabilities picks differently
    e = np.sqrt(_sq_dists(p))
    euclid = [int(np.argmin(e.sum(1)))]
    for _ in range(4):
        euclid.append(int(np.argmax(e[:, euclid].min(1))))
    assert euclid != chosen


# ------------------------------------------------------------------------------------------------ gradmatch


def _omp_nnls(g: np.ndarray, k: int, lam: float) -> tuple[list[int], np.ndarray]:
    """OMP gradient matching (Killamsetty et al. 2021, Alg. 2 with w >= 0): target b = sum_i g_i; each step adds
    the unchosen atom most correlated with the residual b - sum_S w_j g_j, then refits
    w = argmin_{w >= 0} ||G_S^T w - b||^2 + ridge ||w||^2 (scipy NNLS on the stacked system [G_S^T; sqrt(ridge) I])."""
    b = g.sum(0)
    chosen: list[int] = []
    w = np.zeros(0)
    for _ in range(k):
        resid = b - (g[chosen].T @ w if chosen else 0.0)
        corr = g @ resid
        corr[chosen] = -np.inf
        chosen.append(int(np.argmax(corr)))
        a = g[chosen].T
        ridge = lam * float(np.mean((g[chosen] ** 2).sum(1)))
        stacked = np.vstack([a, np.sqrt(ridge) * np.eye(len(chosen))])
        w, _ = nnls(stacked, np.concatenate([b, np.zeros(len(chosen))]))
    return chosen, w


def test_gradmatch_equals_reference_omp_with_nnls():
    rng = np.random.default_rng(6)
    x = np.vstack([rng.normal(size=(6, 5)), -2.0 * rng.normal(size=(4, 5)) + 0.5])
    k, lam = 5, 1e-2
    model, data, task, ids = _problem(x)
    core = get_selector("gradmatch", embedding="features", lam=lam).select(model, data, task=task, k=k)
    ref_rows, ref_w = _omp_nnls(x, k, lam)
    assert _rows(ids, core.ids) == ref_rows
    np.testing.assert_allclose(core.weights, ref_w, rtol=1e-6, atol=1e-9)
    err = np.linalg.norm(x[ref_rows].T @ ref_w - x.sum(0)) / np.linalg.norm(x.sum(0))
    assert core.info["objective"] == pytest.approx(err, rel=1e-6)
    # the non-negativity binds on this problem: unconstrained least squares would use a negative weight
    ls = np.linalg.lstsq(x[ref_rows].T, x.sum(0), rcond=None)[0]
    assert ls.min() < 0 and ref_w.min() == 0.0 and core.info["zero_weights"] == 1


def test_gradmatch_on_gradient_embeddings_equals_reference_omp():
    """The default embedding: last-layer gradients of the cross-entropy, here taken with autograd per sample."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(9, 3))
    model, data, task, ids = _problem(x, bias=False)
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(torch.as_tensor(x[i : i + 1])), data.tensors[1][i : i + 1])
        loss.backward()
        rows.append(model[1].weight.grad.detach().numpy().reshape(-1).copy())
    g = np.stack(rows)
    core = get_selector("gradmatch").select(model, data, task=task, k=4)
    ref_rows, ref_w = _omp_nnls(g, 4, 1e-4)
    assert _rows(ids, core.ids) == ref_rows
    np.testing.assert_allclose(core.weights, ref_w, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------------------------ herding


def _herding_mean_matching(x: np.ndarray, k: int) -> list[int]:
    """Herding toward the mean as in iCaRL (Rebuffi et al. 2017, Alg. 4) / DeepCore: p_t = argmin_x
    ||mu - (x + sum_{s<t} p_s) / t||, without replacement."""
    mu = x.mean(0)
    chosen: list[int] = []
    for t in range(1, k + 1):
        cand = [(np.linalg.norm(mu - (x[j] + x[chosen].sum(0)) / t), j) for j in range(len(x)) if j not in chosen]
        chosen.append(min(cand)[1])
    return chosen


def _herding_weights(phi: np.ndarray, k: int) -> list[int]:
    """Welling (2009) herding: w_0 = mu, x_t = argmax_x <w_{t-1}, phi(x)>, w_t = w_{t-1} + mu - phi(x_t); picks
    without replacement (a coreset)."""
    mu = phi.mean(0)
    w = mu.copy()
    chosen: list[int] = []
    for _ in range(k):
        score = phi @ w
        score[chosen] = -np.inf
        j = int(np.argmax(score))
        chosen.append(j)
        w = w + mu - phi[j]
    return chosen


def test_herding_linear_equals_hand_written_herding_loops():
    x = np.random.default_rng(5).normal(size=(15, 4)) + np.array([1.0, 0.0, 0.0, 0.0])
    model, data, task, ids = _problem(x)
    core = get_selector("herding").select(model, data, task=task, k=6)
    ref = _herding_mean_matching(x, 6)
    assert _rows(ids, core.ids) == ref
    errors = [np.linalg.norm(x[ref[: t + 1]].mean(0) - x.mean(0)) for t in range(6)]
    np.testing.assert_allclose(core.info["errors"], errors, rtol=1e-6)
    # On features of equal norm (constant k(x, x)) mean matching is exactly Welling's weight-vector herding
    # (Chen, Welling & Smola 2010, Sec. 4); on the raw x above the two differ by the ||x||^2 / 2t term.
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    model_u, data_u, task_u, ids_u = _problem(u)
    core_u = get_selector("herding").select(model_u, data_u, task=task_u, k=6)
    assert _rows(ids_u, core_u.ids) == _herding_weights(u, 6) == _herding_mean_matching(u, 6)


def test_herding_rbf_greedily_minimises_the_mmd():
    """Kernel herding (Chen et al. 2010) with the RBF kernel k = exp(-gamma ||x - x'||^2), gamma = 1 / mean squared
    distance: each pick minimises MMD^2(S + j, X) = mean K_SS - 2 mean K_SX + mean K_XX over all candidates
    (brute force), which for a kernel with constant diagonal is Chen's argmax_x E k(x, x') - sum_S k(x, s) / (t+1)."""
    x = np.random.default_rng(6).normal(size=(13, 3))
    model, data, task, ids = _problem(x)
    d2 = _sq_dists(x)
    kmat = np.exp(-d2 / d2.mean())

    def mmd2(rows):
        return kmat[np.ix_(rows, rows)].mean() - 2 * kmat[rows].mean() + kmat.mean()

    chosen: list[int] = []
    for _ in range(5):
        cand = [(mmd2(chosen + [j]), j) for j in range(len(x)) if j not in chosen]
        chosen.append(min(cand)[1])
    core = get_selector("herding", kernel="rbf").select(model, data, task=task, k=5)
    assert _rows(ids, core.ids) == chosen
    np.testing.assert_allclose(core.info["errors"], [np.sqrt(mmd2(chosen[: t + 1])) for t in range(5)], rtol=1e-7)
    chen: list[int] = []
    for t in range(5):
        score = kmat.mean(1) - kmat[:, chen].sum(1) / (t + 1)
        score[chen] = -np.inf
        chen.append(int(np.argmax(score)))
    assert chen == chosen


# ------------------------------------------------------------------------------------------------ GLISTER


def _glister_reference(model: nn.Module, xf, yf, xv, yv, k: int, lr: float) -> tuple[list[int], list[float], float]:
    """GLISTER-ONLINE greedy (Killamsetty et al. 2021, Alg. 1, last-layer approximation), by autograd: with S chosen,
    theta_S = theta - lr sum_{s in S} grad L_s(theta); the gain of j is the first-order change of the validation
    log-likelihood LL_V(theta_S - lr grad L_j(theta)) - LL_V(theta_S) ~= lr <grad L_j(theta), grad L_V(theta_S)>;
    pick the largest, repeat. theta: the output layer's weight and bias (if any) - here the whole model."""
    theta0 = [p.detach().clone() for p in model[1].parameters()]

    def grad_at(theta, x, y):
        theta = [p.clone().requires_grad_(True) for p in theta]
        logits = x @ theta[0].T + (theta[1] if len(theta) > 1 else 0.0)
        loss = nn.functional.cross_entropy(logits, y)
        return torch.autograd.grad(loss, theta), float(loss.detach())

    def dot(a, b):
        return float(sum((u * v).sum() for u, v in zip(a, b)))

    g_train = [grad_at(theta0, xf[i : i + 1], yf[i : i + 1])[0] for i in range(len(xf))]
    chosen, gains = [], []
    theta = theta0
    for _ in range(k):
        g_val, _ = grad_at(theta, xv, yv)
        gain = [lr * dot(g_train[j], g_val) if j not in chosen else -np.inf for j in range(len(xf))]
        j = int(np.argmax(gain))
        chosen.append(j)
        gains.append(gain[j])
        theta = [p - lr * g for p, g in zip(theta, g_train[j])]
    static = np.array([lr * dot(g, grad_at(theta0, xv, yv)[0]) for g in g_train])
    return chosen, gains, grad_at(theta, xv, yv)[1], static


@pytest.mark.parametrize("bias", [False, True])
def test_glister_greedy_equals_hand_computed_taylor_gains(bias):
    rng = np.random.default_rng(3)
    xf = rng.normal(size=(10, 3))
    xv = rng.normal(size=(6, 3))
    yf = np.array([0, 1, 2, 0, 1, 2, 2, 2, 1, 0])
    yv = np.array([2, 2, 2, 1, 2, 0])
    model, data, task, ids = _problem(xf, yf, bias=bias, seed=1)
    val = _IdTensors(torch.as_tensor(xv), torch.as_tensor(yv), offset=900)
    lr = 0.8
    core = get_selector("glister", lr=lr).select(model, data, task=task, k=4, validation=val)
    t = torch.as_tensor
    ref, gains, loss_after, static = _glister_reference(model, t(xf), t(yf), t(xv), t(yv), 4, lr)
    assert _rows(ids, core.ids) == ref
    np.testing.assert_allclose(core.info["gains"], gains, rtol=1e-6)
    assert core.info["validation_loss_after"] == pytest.approx(loss_after, rel=1e-6)
    assert core.info["output_bias"] is bias
    # the re-evaluation of the validation gradient after each simulated step matters on this problem: the top 4
    # of the first step's gains are another set
    assert set(np.argsort(-static, kind="stable")[:4].tolist()) != set(ref)


# ------------------------------------------------------------------------------------------------ valuation network


def test_valuation_network_inputs_are_their_definitions():
    """The per-sample inputs of the value network (one forward pass), by hand: cross-entropy, EL2N ||p - onehot||,
    last-layer gradient norm ||p - onehot|| sqrt(||f||^2 + 1) (weight and bias), entropy, top-2 margin, max p."""
    from erasus_ray.data import as_id_dataset
    from erasus_ray.selectors.valuation_network import FEATURE_NAMES, cheap_features

    x = np.random.default_rng(8).normal(size=(9, 3))
    model, data, task, ids = _problem(x)
    stats, emb, labels = cheap_features(model, as_id_dataset(data).sorted(), task)
    with torch.no_grad():
        p = _softmax(model(torch.as_tensor(x)).numpy())
    y = data.tensors[1].numpy()
    err = p.copy()
    err[np.arange(len(y)), y] -= 1.0
    top = np.sort(p, 1)[:, ::-1]
    ref = {
        "loss": -np.log(p[np.arange(len(y)), y]),
        "el2n": np.linalg.norm(err, axis=1),
        "last_layer_grad_norm": np.linalg.norm(err, axis=1) * np.sqrt((x**2).sum(1) + 1.0),
        "entropy": -(p * np.log(p)).sum(1),
        "margin": top[:, 0] - top[:, 1],
        "max_prob": top[:, 0],
    }
    for j, name in enumerate(FEATURE_NAMES):
        np.testing.assert_allclose(stats[:, j].numpy(), ref[name], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(emb.numpy(), x, rtol=1e-6)
    assert labels.tolist() == y.tolist()


def test_valuation_network_learns_the_values_it_is_given():
    """What defines it: a regression of the given per-id values on those inputs. Taught value = the sample's loss
    on reference samples, it ranks unseen forget samples by their loss, and order='low' keeps the lowest."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(60, 3)) * 1.5
    y = rng.integers(0, 3, size=60)
    model, data, task, ids = _problem(x, y)
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(torch.as_tensor(x)), torch.as_tensor(y), reduction="none").numpy()
    forget_rows, ref_rows = np.arange(12), np.arange(12, 60)
    from erasus_ray.data import as_id_dataset

    full = as_id_dataset(data)
    forget, reference = full.subset(ids[forget_rows]), full.subset(ids[ref_rows])
    targets = {int(ids[r]): float(loss[r]) for r in ref_rows}
    core = get_selector("valuation_network", embedding_dim=0, targets=targets, reference=reference).select(
        model, forget, task=task, k=4, seed=0
    )
    pred = np.array([core.scores[int(i)] for i in ids[forget_rows]])
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(rank(pred), rank(loss[forget_rows]))[0, 1] >= 0.9
    lowest = set(ids[forget_rows][np.argsort(loss[forget_rows])[:4]].tolist())
    assert len(lowest & set(core.ids.tolist())) >= 3
