"""Learning-based selectors against hand / brute-force references on tiny problems: loss, active learning,
forgetting events, data Shapley (KNN closed form and TMC), DeepFool, CAL and the valuation network."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from erasus_ray.data import as_id_dataset
from erasus_ray.errors import InvalidDataError
from erasus_ray.selectors import get_selector
from erasus_ray.selectors._reference import labels_and_features
from erasus_ray.selectors.data_shapley import _ranks, knn_shapley, knn_utility, tmc_shapley
from erasus_ray.selectors.deepfool import deepfool_distances
from erasus_ray.selectors.forgetting_events import count_forgetting_events
from erasus_ray.selectors.valuation_network import _spearman
from erasus_ray.tasks import ClassificationTask

from _tolerances import assert_float32_close


def _linear_problem(n=12, d=4, c=3, seed=0):
    """A fixed affine classifier (float64) on random points; labels are arbitrary classes."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, c)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(c, d, generator=g, dtype=torch.float64))
        model[1].bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    return model, TensorDataset(x, y), ClassificationTask()


def _scores(core, ids):
    return np.array([core.scores[int(i)] for i in ids])


# ----------------------------------------------------------------------------------------------------- loss


def test_loss_equals_cross_entropy_and_keeps_highest(digits_class):
    b = digits_class
    core = get_selector("loss").select(b.original, b.forget, task=b.task, k=7)
    ids = b.forget.sorted().ids
    x = torch.stack([b.forget.sorted()[i][1][0] for i in range(len(ids))])
    y = torch.stack([b.forget.sorted()[i][1][1] for i in range(len(ids))])
    with torch.no_grad():
        manual = nn.functional.cross_entropy(b.original(x), y, reduction="none").numpy()
    assert_float32_close(_scores(core, ids), manual)  # batches of 128 vs one of all rows: float32 rounding
    assert core.ids.tolist() == ids[np.lexsort((ids, -manual))[:7]].tolist()


# ------------------------------------------------------------------------------------------- active learning


@pytest.mark.parametrize("criterion", ["least_confidence", "entropy", "margin"])
def test_active_learning_matches_hand_computation(criterion):
    model, data, task = _linear_problem()
    core = get_selector("active_learning", criterion=criterion).select(model, data, task=task, k=4)
    with torch.no_grad():
        p = model(data.tensors[0]).softmax(-1).numpy()
    ps = np.sort(p, 1)[:, ::-1]
    expected = {
        "least_confidence": 1 - ps[:, 0],
        "entropy": -(p * np.log(p)).sum(1),
        "margin": 1 - (ps[:, 0] - ps[:, 1]),
    }[criterion]
    ids = np.arange(len(p))
    np.testing.assert_allclose(_scores(core, ids), expected, rtol=1e-6, atol=1e-7)
    assert core.ids.tolist() == ids[np.lexsort((ids, -expected))[:4]].tolist()


def test_active_learning_lm_is_mean_over_answer_tokens(tiny_lm):
    model, task, forget = tiny_lm["model"], tiny_lm["task"], tiny_lm["forget"].sorted()
    core = get_selector("active_learning").select(model, forget, task=task, k=2)
    manual = []
    for row in range(3):
        item = forget[row][1]
        ids = item["input_ids"]
        with torch.no_grad():
            logits = model(ids[None]).logits[0]
        # token t (t >= answer_start) is predicted from position t - 1
        p = logits[item["answer_start"] - 1 : len(ids) - 1].double().softmax(-1)
        manual.append(float((1 - p.max(-1).values).mean()))
    assert_float32_close(_scores(core, forget.ids[:3]), manual)  # a padded batch vs one sequence at a time


# ---------------------------------------------------------------------------------------- forgetting events


def test_forgetting_event_counts_and_ranking_from_given_dynamics():
    dyn = {
        0: [0, 1, 0, 1, 0],  # two 1->0 transitions
        1: [1, 1, 1, 1, 1],  # unforgettable
        2: [0, 0, 0, 0, 0],  # never learned: counts as infinitely forgotten
        3: [1, 0, 1, 1, 0],  # two
        4: [0, 1, 1, 0, 1],  # one
        5: [0, 0, 1, 1, 1],  # learned once, never forgotten
    }
    events, learned = count_forgetting_events(np.array(list(dyn.values())))
    assert events.tolist() == [2, 0, 0, 2, 1, 0] and learned.tolist() == [True, True, False, True, True, True]
    model, data, task = _linear_problem(n=6)
    core = get_selector("forgetting_events").select(model, data, task=task, k=4, dynamics=dyn)
    assert core.scores == {0: 2.0, 1: 0.0, 2: 5.0, 3: 2.0, 4: 1.0, 5: 0.0}
    assert core.ids.tolist() == [2, 0, 3, 4]  # never learned first, ties by id
    assert core.info["never_learned"] == [2] and core.info["dynamics"] == "given"
    # the same dynamics as an array (rows = ascending ids) and from the constructor
    arr = np.array([dyn[i] for i in range(6)])
    again = get_selector("forgetting_events", dynamics=arr).select(model, data, task=task, k=4)
    assert again.ids.tolist() == [2, 0, 3, 4]
    with pytest.raises(InvalidDataError, match="no record"):
        get_selector("forgetting_events").select(model, data, task=task, k=2, dynamics={0: [1, 0]})


def test_forgetting_events_replay_ranks_a_mislabelled_sample_first():
    """Two separable blobs; one point of blob 0 carries label 1: the replayed training never learns it stably."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20, 2, generator=g) - 3.0, torch.randn(20, 2, generator=g) + 3.0])
    y = torch.cat([torch.zeros(20), torch.ones(20)]).long()
    y[5] = 1  # mislabelled
    data = TensorDataset(x, y)
    task = ClassificationTask()

    def factory():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(2, 2))

    sel = get_selector("forgetting_events", model_factory=factory, epochs=6, lr=0.05, batch_size=8)
    forget_ids = np.arange(0, 40, 4)  # every 4th sample, plus the mislabelled id 5
    forget_ids = np.sort(np.append(forget_ids, 5))
    forget = as_id_dataset(data).subset(forget_ids)
    retain = as_id_dataset(data).exclude(forget_ids)
    core = sel.select(factory(), forget, task=task, k=1, retain=retain, seed=0)
    assert core.ids.tolist() == [5]
    assert core.info["dynamics"].startswith("replayed proxy training")
    assert max(v for k, v in core.scores.items() if k != 5) < core.scores[5]


# ---------------------------------------------------------------------------------------------- data Shapley


def _tiny_valuation(n=7, t=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    tx = torch.randn(n, 2, generator=g, dtype=torch.float64)
    ty = torch.randint(0, 2, (n,), generator=g)
    sx = torch.randn(t, 2, generator=g, dtype=torch.float64)
    sy = torch.randint(0, 2, (t,), generator=g)
    return tx, ty, sx, sy


def _brute_force_shapley(tx, ty, sx, sy, k):
    n = len(tx)
    order = _ranks(tx, sx).numpy()
    util = {}
    for r in range(n + 1):
        for s in itertools.combinations(range(n), r):
            util[s] = knn_utility(ty.numpy(), order, sy.numpy(), list(s), k)
    values = np.zeros(n)
    for i in range(n):
        for s, u in util.items():
            if i in s:
                continue
            w = math.factorial(len(s)) * math.factorial(n - len(s) - 1) / math.factorial(n)
            values[i] += w * (util[tuple(sorted(s + (i,)))] - u)
    return values, util[tuple(range(n))]


@pytest.mark.parametrize("n,k", [(7, 3), (8, 1), (5, 6)])
def test_knn_shapley_recursion_equals_brute_force(n, k):
    tx, ty, sx, sy = _tiny_valuation(n=n, seed=n + k)
    exact, full = _brute_force_shapley(tx, ty, sx, sy, k)
    values = knn_shapley(tx, ty, sx, sy, k)
    np.testing.assert_allclose(values, exact, atol=1e-9)
    assert values.sum() == pytest.approx(full, abs=1e-12)  # efficiency: values sum to U(all) - U(empty)


def test_tmc_shapley_converges_to_exact_value():
    tx, ty, sx, sy = _tiny_valuation(n=7, seed=1)
    exact = knn_shapley(tx, ty, sx, sy, 3)
    est, info = tmc_shapley(tx, ty, sx, sy, 3, num_permutations=1000, tolerance=0.0, seed=0)
    assert np.abs(est - exact).max() < 0.05
    few, _ = tmc_shapley(tx, ty, sx, sy, 3, num_permutations=1000, tolerance=0.0, seed=0)
    np.testing.assert_array_equal(est, few)  # seeded
    assert info["truncated_fraction"] == 0.0
    _, trunc = tmc_shapley(tx, ty, sx, sy, 3, num_permutations=50, tolerance=0.5, seed=0)
    assert trunc["truncated_fraction"] > 0


def test_data_shapley_selector_equals_closed_form_on_identity_features():
    """With a model whose penultimate features are its inputs the selector values the raw points."""
    tx, ty, sx, sy = _tiny_valuation(n=8, t=6, seed=3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2)).double()
    task = ClassificationTask()
    train, test = TensorDataset(tx, ty), TensorDataset(sx, sy)
    for method, tol in (("knn", 1e-12), ("tmc", 0.06)):
        sel = get_selector("data_shapley", method=method, pool="forget", k_neighbors=3, num_permutations=800, tolerance=0.0)
        core = sel.select(model, train, task=task, k=3, validation=test)
        exact = knn_shapley(tx, ty, sx, sy, 3)
        assert np.abs(_scores(core, np.arange(8)) - exact).max() < tol
        if method == "knn":
            assert core.ids.tolist() == np.lexsort((np.arange(8), exact))[:3].tolist()  # default: lowest values


# --------------------------------------------------------------------------------------------------- DeepFool


def test_deepfool_distance_equals_closed_form_on_linear_classifier():
    model, data, task = _linear_problem(n=15, d=5, c=4, seed=2)
    core = get_selector("deepfool").select(model, data, task=task, k=5)
    x = data.tensors[0]
    w, b = model[1].weight.detach(), model[1].bias.detach()
    f = x @ w.T + b
    pred = f.argmax(1)
    expected = []
    for i in range(len(x)):
        k = int(pred[i])
        expected.append(min(abs(float(f[i, k] - f[i, j])) / float((w[k] - w[j]).norm()) for j in range(4) if j != k))
    expected = np.array(expected)
    np.testing.assert_allclose(_scores(core, np.arange(15)), expected, rtol=1e-9, atol=1e-12)
    assert core.ids.tolist() == np.lexsort((np.arange(15), expected))[:5].tolist()  # closest to the boundary


def test_deepfool_flips_a_nonlinear_classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x = torch.randn(20, 3, dtype=torch.float64)
    dist, flipped = deepfool_distances(model, x, max_iter=50, overshoot=0.02)
    assert bool(flipped.all()) and bool((dist > 0).all())


# -------------------------------------------------------------------------------------------------------- CAL


def test_cal_matches_hand_computation_and_falls_back_to_forget_set():
    model, data, task = _linear_problem(n=10, d=2, c=3, seed=4)
    ref_model, ref, _ = _linear_problem(n=9, d=2, c=3, seed=5)  # reference points from another draw
    x, rx = data.tensors[0].numpy(), ref.tensors[0].numpy()
    with torch.no_grad():
        p = model(data.tensors[0]).softmax(-1).numpy()
        rp = model(ref.tensors[0]).softmax(-1).numpy()

    def expected(k, qx, qp, px, pp, self_excluded):
        out = []
        for i in range(len(qx)):
            d = np.linalg.norm(px - qx[i], axis=1)
            if self_excluded:
                d[i] = np.inf
            nbrs = np.argsort(d, kind="stable")[:k]
            out.append(np.mean([(pp[j] * np.log(pp[j] / qp[i])).sum() for j in nbrs]))
        return np.array(out)

    core = get_selector("cal", k_neighbors=3).select(model, data, task=task, k=4, reference=ref)
    np.testing.assert_allclose(_scores(core, np.arange(10)), expected(3, x, p, rx, rp, False), rtol=1e-6, atol=1e-9)
    assert core.info["reference"].startswith("given reference")
    alone = get_selector("cal", k_neighbors=3).select(model, data, task=task, k=4)
    np.testing.assert_allclose(_scores(alone, np.arange(10)), expected(3, x, p, x, p, True), rtol=1e-6, atol=1e-9)
    assert "rest of the forget set" in alone.info["reference"]


# ----------------------------------------------------------------------------------------- valuation network


def test_valuation_network_ranks_held_out_samples_by_learned_value(digits_random10):
    """Train on exact KNN-Shapley values of half the valued samples; rank the other half (never seen) by value."""
    b = digits_random10
    pool = b.retain.sorted()
    y, feats = labels_and_features(b.original, pool, b.task)
    perm = np.random.default_rng(0).permutation(len(pool))
    players, tests = np.sort(perm[: len(pool) // 2]), np.sort(perm[len(pool) // 2 :])
    values = knn_shapley(feats[players], y[players], feats[tests], y[tests], 5)
    player_ids = pool.ids[players]
    train_rows, held_rows = np.arange(0, len(players), 2), np.arange(1, len(players), 2)
    targets = {int(player_ids[r]): float(values[r]) for r in train_rows}
    sel = get_selector("valuation_network", order="high", targets=targets, reference=pool.subset(player_ids[train_rows]))
    held = pool.subset(player_ids[held_rows])
    core = sel.select(b.original, held, task=b.task, k=len(held_rows) // 5, seed=0)
    pred = _scores(core, held.sorted().ids)
    true = dict(zip(player_ids[held_rows].tolist(), values[held_rows]))
    truth = np.array([true[int(i)] for i in held.sorted().ids])
    assert _spearman(pred, truth) > 0.5
    chosen = np.array([true[int(i)] for i in core.ids])
    assert chosen.mean() > np.quantile(truth, 0.6)  # the top-valued fifth is well above the median value
    assert core.info["targets"].startswith("given targets")


# -------------------------------------------------------------------------------------------- GraNd ensemble


def test_grand_ensemble_averages_gradnorms_of_independently_trained_models():
    from erasus_ray.selectors.gradient_norm import GradientNormSelector
    from erasus_ray.training import TrainRecipe, train_model
    from erasus_ray.selectors._reference import union_with_ids

    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(15, 2, generator=g) - 3.0, torch.randn(15, 2, generator=g) + 3.0])
    y = torch.cat([torch.zeros(15), torch.ones(15)]).long()
    y[2] = 1  # mislabelled: the largest expected gradient norm
    data = as_id_dataset(TensorDataset(x, y))
    task = ClassificationTask()

    def factory():
        return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))

    forget = data.subset(np.arange(0, 30, 3))  # ids 0, 3, ..., plus the mislabelled one below
    forget = data.subset(np.sort(np.append(forget.ids, 2)))
    retain = data.exclude(forget.ids)
    sel = get_selector("grand_ensemble", model_factory=factory, num_models=2, epochs=4, lr=0.05, batch_size=8)
    core = sel.select(factory(), forget, task=task, k=1, retain=retain, seed=5)
    assert core.ids.tolist() == [2]
    # by hand: the same two seeded runs, GraNd of each, averaged
    manual = np.zeros(len(forget))
    for s in (5, 6):
        torch.manual_seed(s)
        m = factory()
        train_model(m, union_with_ids(forget.sorted(), retain.sorted()), task, TrainRecipe(epochs=4, lr=0.05, batch_size=8, seed=s))
        manual += GradientNormSelector(batch_size=8)._scores_for(m, forget.sorted(), task) / 2
    np.testing.assert_allclose(_scores(core, forget.sorted().ids), manual, rtol=1e-5)
    assert len(core.info["models"]) == 2
