"""Geometric and submodular selectors against brute-force references on tiny problems, and on the digits forget set."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from erasus_ray.errors import InvalidConfigError
from erasus_ray.selectors import get_selector
from erasus_ray.selectors._embeddings import (
    Similarity,
    feature_matrix,
    gradient_embedding,
    output_distributions,
    pairwise_distances,
    symmetric_kl_to,
)
from erasus_ray.selectors.k_center import greedy_k_center
from erasus_ray.selectors.submodular import FacilityLocation, GraphCut, LogDeterminant, maximize
from erasus_ray.tasks import ClassificationTask

from _tolerances import assert_float32_close

GEOMETRIC = ["k_center", "farthest_first", "kmeans_pp", "herding", "submodular", "craig", "gradmatch", "glister", "contextual_diversity"]


def _points(n, d=3, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _identity_problem(x):
    """A model whose penultimate features are its inputs: selectors then work on ``x`` itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(x.shape[1], 3)).double()
    data = TensorDataset(x, torch.arange(len(x)) % 3)
    return model, data, ClassificationTask()


def _radius(x, centers):
    return float(pairwise_distances(x, x[list(centers)]).min(1).values.max())


# ----------------------------------------------------------------------------------------------- k-center


def test_k_center_equals_hand_rolled_greedy_and_is_2_approximate():
    x = _points(10, seed=3)
    model, data, task = _identity_problem(x)
    k = 3
    core = get_selector("k_center").select(model, data, task=task, k=k)
    # hand-rolled: numpy distances, medoid start, farthest point each step
    xn = x.numpy()
    dist = np.sqrt(((xn[:, None, :] - xn[None, :, :]) ** 2).sum(-1))
    chosen = [int(np.argmin(dist.sum(1)))]
    for _ in range(k - 1):
        chosen.append(int(np.argmax(dist[:, chosen].min(1))))
    assert core.ids.tolist() == chosen
    assert core.info["objective"] == pytest.approx(dist[:, chosen].min(1).max())
    optimum = min(dist[:, list(c)].min(1).max() for c in itertools.combinations(range(10), k))
    assert core.info["objective"] <= 2 * optimum + 1e-9
    # scores: distance to the chosen set when picked (non-increasing), final distance for the rest
    picked = [core.scores[i] for i in chosen]
    assert all(a >= b - 1e-12 for a, b in zip(picked, picked[1:]))
    free = [i for i in range(10) if i not in chosen]
    np.testing.assert_allclose([core.scores[i] for i in free], dist[free][:, chosen].min(1))


def test_farthest_first_seeded_start_and_same_traversal():
    x = _points(30, d=4, seed=1)
    model, data, task = _identity_problem(x)
    a = get_selector("farthest_first").select(model, data, task=task, k=5, seed=0)
    b = get_selector("farthest_first").select(model, data, task=task, k=5, seed=0)
    starts = {get_selector("farthest_first").select(model, data, task=task, k=5, seed=s).ids[0] for s in range(6)}
    assert a.ids.tolist() == b.ids.tolist() and len(starts) > 1
    rows, _, radius = greedy_k_center(lambda j: pairwise_distances(x, x[[j]])[:, 0], 30, 5, int(a.ids[0]))
    assert rows == a.ids.tolist() and radius == pytest.approx(a.info["objective"])


# ----------------------------------------------------------------------------------------------- submodular


def _fl_value(sim_matrix, subset):
    return float(sim_matrix[:, list(subset)].max(1).values.sum())


def test_facility_location_greedy_beats_1_minus_1_over_e_of_exhaustive_optimum():
    x = _points(11, seed=4)
    sim = Similarity(x, "euclidean")
    for k in (2, 3, 4):
        fn = FacilityLocation(sim)
        rows, gains, _ = maximize(fn, k, "naive")
        assert fn.value == pytest.approx(_fl_value(sim.matrix, rows)) == pytest.approx(sum(gains))
        optimum = max(_fl_value(sim.matrix, c) for c in itertools.combinations(range(11), k))
        assert fn.value >= (1 - 1 / math.e) * optimum
        assert fn.value <= optimum + 1e-9


@pytest.mark.parametrize("function", ["facility_location", "graph_cut", "log_det"])
def test_lazy_greedy_selects_the_same_sequence_as_naive(function):
    x = _points(120, d=5, seed=2)
    kernel = "rbf" if function == "log_det" else "euclidean"
    make = {"facility_location": FacilityLocation, "graph_cut": GraphCut, "log_det": LogDeterminant}[function]
    naive_fn, lazy_fn = make(Similarity(x, kernel)), make(Similarity(x, kernel))
    naive, _, naive_evals = maximize(naive_fn, 15, "naive")
    lazy, _, lazy_evals = maximize(lazy_fn, 15, "lazy")
    assert naive == lazy and lazy_evals < naive_evals
    assert lazy_fn.value == pytest.approx(naive_fn.value)


def test_lazy_equals_naive_and_stochastic_is_near_on_digits_features(digits_class):
    b = digits_class
    runs = {
        opt: get_selector("submodular", optimizer=opt).select(b.original, b.forget, task=b.task, fraction=0.1, seed=0)
        for opt in ("naive", "lazy", "stochastic")
    }
    assert runs["lazy"].ids.tolist() == runs["naive"].ids.tolist()
    assert runs["stochastic"].info["objective"] >= 0.9 * runs["naive"].info["objective"]
    assert runs["stochastic"].info["evaluations"] < runs["naive"].info["evaluations"]


def test_graph_cut_and_log_det_objectives_match_their_definitions():
    x = _points(25, d=3, seed=5)
    sim = Similarity(x, "rbf")
    k_mat = sim.matrix
    ld = LogDeterminant(sim)
    rows, _, _ = maximize(ld, 6, "lazy")
    s = torch.tensor(rows)
    assert ld.value == pytest.approx(float(torch.logdet(torch.eye(6, dtype=torch.float64) + k_mat[s][:, s])))
    gc = GraphCut(Similarity(x, "euclidean"), lam=0.4)
    rows, _, _ = maximize(gc, 6, "naive")
    m, s = gc.sim.matrix, torch.tensor(rows)
    assert gc.value == pytest.approx(float(m[:, s].sum() - 0.4 * m[s][:, s].sum()))


def test_log_det_rejects_a_non_psd_kernel():
    with pytest.raises(InvalidConfigError, match="PSD"):
        get_selector("submodular", function="log_det", kernel="euclidean")


# ----------------------------------------------------------------------------------------------- gradient embeddings


def test_gradient_embedding_equals_autograd_last_layer_gradient(digits_class, tiny_lm):
    b = digits_class
    ds = b.forget.subset(b.forget_ids[:5])
    emb = gradient_embedding(b.original, ds, b.task)
    head = b.original.net[5]
    ref = []
    for row in range(len(ds)):
        x, y = ds[row][1]
        b.original.zero_grad()
        nn.functional.cross_entropy(b.original(x[None]), torch.as_tensor(y).reshape(1)).backward()
        ref.append(head.weight.grad.reshape(-1).clone())
    b.original.zero_grad()
    assert_float32_close(emb, torch.stack(ref))  # a batch of 5 vs one sample at a time
    lm_emb = gradient_embedding(tiny_lm["model"], tiny_lm["forget"], tiny_lm["task"])
    assert lm_emb.shape == (len(tiny_lm["forget"]), 48 * 32) and torch.isfinite(lm_emb).all()
    sketch = gradient_embedding(tiny_lm["model"], tiny_lm["forget"], tiny_lm["task"], proj_dim=64, seed=0)
    assert sketch.shape == (len(tiny_lm["forget"]), 64)


def test_craig_weights_are_cluster_sizes_summing_to_n(digits_class):
    b = digits_class
    core = get_selector("craig").select(b.original, b.forget, task=b.task, fraction=0.1, seed=0)
    n = len(b.forget)
    assert core.weights.sum() == n and (core.weights >= 1).all()
    g = gradient_embedding(b.original, b.forget.sorted(), b.task)
    rows = np.searchsorted(b.forget.sorted().ids, core.ids)
    nearest = pairwise_distances(g, g[rows]).argmin(1).numpy()
    np.testing.assert_array_equal(core.weights, np.bincount(nearest, minlength=len(rows)))


def test_gradmatch_error_decreases_with_k_and_weights_are_non_negative(digits_class):
    b = digits_class
    g = gradient_embedding(b.original, b.forget.sorted(), b.task).double()
    target = g.sum(0)
    finals = []
    for k in (1, 3, 8, 20):
        core = get_selector("gradmatch").select(b.original, b.forget, task=b.task, k=k)
        errors = core.info["errors"]
        assert len(errors) == k and all(a >= b_ - 1e-9 for a, b_ in zip(errors, errors[1:]))
        assert (core.weights >= 0).all()
        rows = np.searchsorted(b.forget.sorted().ids, core.ids)
        recon = (torch.as_tensor(core.weights)[:, None] * g[rows]).sum(0)
        assert float((recon - target).norm() / target.norm()) == pytest.approx(core.info["objective"], rel=1e-5, abs=1e-9)
        finals.append(core.info["objective"])
    assert all(a >= b_ - 1e-9 for a, b_ in zip(finals, finals[1:])) and finals[-1] < 0.5 * finals[0]


# ----------------------------------------------------------------------------------------------- seeds, herding, glister


def test_kmeans_pp_is_deterministic_under_seed_and_varies_across_seeds(digits_class):
    b = digits_class
    sel = lambda s: get_selector("kmeans_pp").select(b.original, b.forget, task=b.task, k=10, seed=s).ids.tolist()
    assert sel(0) == sel(0)
    assert len({tuple(sorted(sel(s))) for s in range(4)}) > 1


def test_herding_mean_approaches_the_true_mean_faster_than_random(digits_class):
    b = digits_class
    f = feature_matrix(b.original, b.forget.sorted(), b.task).double()
    mu = f.mean(0)
    k = 10
    core = get_selector("herding").select(b.original, b.forget, task=b.task, k=k)
    rows = np.searchsorted(b.forget.sorted().ids, core.ids)
    err = float((f[rows].mean(0) - mu).norm())
    assert err == pytest.approx(core.info["objective"])
    rng = np.random.default_rng(0)
    random_errs = [float((f[rng.choice(len(f), k, replace=False)].mean(0) - mu).norm()) for _ in range(50)]
    assert err < min(random_errs)
    assert core.info["errors"][-1] < core.info["errors"][0]


def test_glister_without_validation_or_retain_raises(digits_class):
    b = digits_class
    with pytest.raises(InvalidConfigError, match="validation"):
        get_selector("glister").select(b.original, b.forget, task=b.task, k=5)


def test_glister_contract_with_retain(digits_class, tiny_lm):
    b = digits_class
    sel = lambda data, **kw: get_selector("glister").select(b.original, data, task=b.task, fraction=0.1, seed=0, **kw)
    core = sel(b.forget, retain=b.retain)
    assert len(core.ids) == math.ceil(0.1 * len(b.forget)) == len(set(core.ids.tolist()))
    assert set(core.ids.tolist()) <= set(b.forget_ids.tolist()) and set(core.scores) == set(b.forget_ids.tolist())
    assert core.ids.tolist() == sel(b.forget, retain=b.retain).ids.tolist()
    perm = np.random.default_rng(1).permutation(b.forget.positions)
    shuffled = DataLoader(Subset(b.forget.base, [int(p) for p in perm]), batch_size=7, shuffle=True)
    assert sorted(sel(shuffled, retain=b.retain).ids.tolist()) == sorted(core.ids.tolist())
    # validation= takes precedence over retain=; the simulated step lowers the validation loss
    assert core.info["validation_loss_after"] < core.info["validation_loss_before"]
    other = sel(b.forget, validation=b.test, retain=b.retain)
    assert other.info["validation_size"] == len(b.test)
    lm = tiny_lm
    forget = lm["forget"]
    one = get_selector("glister").select(lm["model"], forget, task=lm["task"], k=3, retain=lm["retain"])
    two = get_selector("glister").select(lm["model"], forget.subset(forget.ids[::-1]), task=lm["task"], k=3, retain=lm["retain"])
    assert sorted(one.ids.tolist()) == sorted(two.ids.tolist()) and set(one.ids.tolist()) <= set(forget.ids.tolist())


def test_contextual_distance_is_symmetric_kl(digits_class):
    b = digits_class
    p = output_distributions(b.original, b.forget.sorted().subset(b.forget.sorted().ids[:6]), b.task)
    q = p.clamp_min(1e-12)
    q = q / q.sum(1, keepdim=True)
    ref = 0.5 * ((q[:, None] * (q[:, None] / q[None]).log()).sum(-1) + (q[None] * (q[None] / q[:, None]).log()).sum(-1))
    np.testing.assert_allclose(symmetric_kl_to(p, torch.arange(6)).numpy(), ref.numpy(), rtol=1e-6, atol=1e-12)


# ----------------------------------------------------------------------------------------------- every selector


@pytest.mark.parametrize(
    "name,kwargs",
    [(n, {}) for n in GEOMETRIC]
    + [
        ("submodular", {"function": "graph_cut"}),
        ("submodular", {"function": "log_det", "optimizer": "stochastic"}),
        ("submodular", {"embedding": "gradient", "kernel": "cosine"}),
        ("k_center", {"embedding": "gradient"}),
        ("herding", {"kernel": "rbf"}),
        ("kmeans_pp", {"embedding": "gradient"}),
    ],
)
def test_each_selector_returns_valid_ids_on_digits(name, kwargs, digits_class):
    b = digits_class
    ctx = {"retain": b.retain} if name == "glister" else {}
    core = get_selector(name, **kwargs).select(b.original, b.forget, task=b.task, k=12, seed=0, **ctx)
    ids = core.ids.tolist()
    assert len(ids) == 12 == len(set(ids)) == len(core.weights)
    assert set(ids) <= set(b.forget_ids.tolist())
    assert np.all(np.isfinite(core.weights)) and (core.weights >= 0).all()
    if core.scores is not None:
        assert set(core.scores) == set(b.forget_ids.tolist()) and all(np.isfinite(list(core.scores.values())))
    assert "objective" in core.info and np.isfinite(core.info["objective"])


@pytest.mark.parametrize("name,kwargs", [
    ("k_center", {}), ("farthest_first", {}), ("kmeans_pp", {}), ("herding", {}), ("herding", {"kernel": "rbf"}),
    ("submodular", {}), ("submodular", {"function": "graph_cut"}), ("submodular", {"function": "log_det"}),
    ("craig", {}), ("gradmatch", {}), ("contextual_diversity", {}),
])
def test_set_objective_reproduces_the_selectors_own_objective(name, kwargs, digits_class):
    """GreeDi compares solutions by ``set_objective`` on the whole forget set: on the set a selector chose itself,
    it equals the objective the selector reported, with the declared sense (max / min)."""
    b = digits_class
    selector = get_selector(name, **kwargs)
    core = selector.select(b.original, b.forget, task=b.task, k=12, seed=0)
    f = selector.set_objective(b.original, b.forget.sorted(), b.task, 0)
    assert f(core.ids) == pytest.approx(core.info["objective"], rel=1e-6, abs=1e-9)
    assert selector.objective_sense in ("max", "min")
    other = core.ids[::-1].copy()
    assert f(other) == pytest.approx(f(core.ids), rel=1e-9)  # a set function: order does not matter
