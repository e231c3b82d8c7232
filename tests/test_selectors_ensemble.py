"""Ensemble selectors (voting, weighted fusion, auto) against hand computations; reference-set errors across the
registry; selectors run end to end through ErasusUnlearner and unlearn."""

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from erasus_ray import ErasusUnlearner
from erasus_ray.errors import InvalidConfigError
from erasus_ray.selectors import SELECTORS, Coreset, ScoreSelector, Selector, get_selector
from erasus_ray.tasks import ClassificationTask


class _Fixed(ScoreSelector):
    """A scorer with given scores (id -> score), for hand-checkable ensembles."""

    name = "fixed"

    def __init__(self, scores, order="high"):
        super().__init__(order=order)
        self.values = scores

    def score(self, model, forget, task, seed, **context):
        return np.array([self.values[int(i)] for i in forget.ids], dtype=float)


class _Picks(Selector):
    """A pick-only selector (no scores) that picks the given ids in order."""

    name = "picks"

    def __init__(self, picks):
        super().__init__()
        self.picks = picks

    def _select(self, model, forget, task, budget, seed, **context):
        return Coreset(ids=np.array(self.picks[:budget]), weights=np.ones(budget), scores=None)


def _problem(n=6):
    model = nn.Sequential(nn.Linear(2, 2))
    return model, TensorDataset(torch.randn(n, 2, generator=torch.Generator().manual_seed(0)), torch.zeros(n).long()), ClassificationTask()


def test_voting_is_the_borda_count():
    model, data, task = _problem()
    a = _Fixed({0: 5.0, 1: 4.0, 2: 3.0, 3: 2.0, 4: 1.0, 5: 0.0})  # ranking 0 1 2 3 4 5
    b = _Fixed({0: 5.0, 1: 0.0, 2: 1.0, 3: 2.0, 4: 3.0, 5: 4.0}, order="low")  # ranking 1 2 3 4 5 0
    c = _Picks([3, 5])  # picked 3 then 5; others share the remaining points (0..3 -> 1.5)
    core = get_selector("voting", selectors=[a, b, c]).select(model, data, task=task, k=2)
    # Borda points (n - 1 - rank): a: 5 4 3 2 1 0 ; b: 0 5 4 3 2 1 ; c: 1.5 1.5 1.5 5 1.5 4
    expected = {0: 6.5, 1: 10.5, 2: 8.5, 3: 10.0, 4: 4.5, 5: 5.0}
    assert core.scores == pytest.approx(expected)
    assert core.ids.tolist() == [1, 3]
    assert [m["full_ranking"] for m in core.info["members"]] == [True, True, False]


def test_voting_weights_change_the_winner():
    model, data, task = _problem()
    a = _Fixed({0: 5.0, 1: 4.0, 2: 3.0, 3: 2.0, 4: 1.0, 5: 0.0})
    b = _Fixed({0: 0.0, 1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 5.0})
    first = get_selector("voting", selectors=[a, b], weights=[2.0, 1.0]).select(model, data, task=task, k=1)
    second = get_selector("voting", selectors=[a, b], weights=[1.0, 2.0]).select(model, data, task=task, k=1)
    assert first.ids.tolist() == [0] and first.scores[0] == pytest.approx(10.0)
    assert second.ids.tolist() == [5] and second.scores[5] == pytest.approx(10.0)


def test_weighted_fusion_is_the_weighted_sum_of_normalised_scores():
    model, data, task = _problem()
    s1 = {0: 0.0, 1: 10.0, 2: 5.0, 3: 2.0, 4: 8.0, 5: 1.0}
    s2 = {0: 1.0, 1: 3.0, 2: 2.0, 3: 0.0, 4: 4.0, 5: 5.0}  # order low: 3 is its favourite
    core = get_selector("weighted_fusion", selectors=[_Fixed(s1), _Fixed(s2, order="low")], weights=[0.25, 0.75]).select(
        model, data, task=task, k=2
    )
    n1 = {i: v / 10.0 for i, v in s1.items()}
    n2 = {i: (5.0 - v) / 5.0 for i, v in s2.items()}
    expected = {i: 0.25 * n1[i] + 0.75 * n2[i] for i in s1}
    assert core.scores == pytest.approx(expected)
    top = sorted(expected, key=lambda i: (-expected[i], i))[:2]
    assert core.ids.tolist() == top
    with pytest.raises(InvalidConfigError, match="voting"):
        get_selector("weighted_fusion", selectors=[_Fixed(s1), _Picks([1, 2])]).select(model, data, task=task, k=2)
    with pytest.raises(InvalidConfigError, match="weights"):
        get_selector("weighted_fusion", selectors=["el2n", "loss"], weights=[1.0])


def test_auto_rule_choices_and_reasons(digits_class, digits_random10, tiny_lm):
    b = digits_class
    core = get_selector("auto").select(b.original, b.forget, task=b.task, fraction=0.1, retain=b.retain)
    direct = get_selector("deepfool").select(b.original, b.forget, task=b.task, fraction=0.1)
    assert core.info["chose"] == "deepfool" and "class-like" in core.info["why"]
    assert core.ids.tolist() == direct.ids.tolist() and core.selector == "auto"
    r = digits_random10
    scattered = get_selector("auto").select(r.original, r.forget, task=r.task, fraction=0.1, seed=3)
    assert scattered.info["chose"] == "random" and "scattered" in scattered.info["why"]
    assert scattered.ids.tolist() == get_selector("random").select(r.original, r.forget, task=r.task, fraction=0.1, seed=3).ids.tolist()
    lm = get_selector("auto").select(tiny_lm["model"], tiny_lm["forget"], task=tiny_lm["task"], k=2)
    assert lm.info["chose"] == "el2n" and "causal_lm" in lm.info["why"]
    everything = get_selector("auto").select(b.original, b.forget, task=b.task, fraction=1.0)
    assert everything.info["chose"] == "full" and len(everything) == len(b.forget_ids)


NEEDS_REFERENCE = [n for n in SELECTORS.names() if getattr(SELECTORS.get(n), "needs_retain", False)]


@pytest.mark.parametrize("name", NEEDS_REFERENCE)
def test_selectors_that_need_reference_data_say_so(name, digits_class):
    b = digits_class
    with pytest.raises(InvalidConfigError, match=r"retain=") as err:
        get_selector(name).select(b.original, b.forget, task=b.task, fraction=0.1)
    assert name in str(err.value)


def test_cal_without_reference_uses_the_rest_of_the_forget_set(digits_class):
    b = digits_class
    core = get_selector("cal").select(b.original, b.forget, task=b.task, fraction=0.1)
    assert "rest of the forget set" in core.info["reference"]
    with_retain = get_selector("cal").select(b.original, b.forget, task=b.task, fraction=0.1, retain=b.retain)
    assert with_retain.info["reference"].startswith("retain set")


@pytest.mark.parametrize("name", ["auto", "data_shapley", "voting"])
def test_selectors_unlearn_through_the_unlearner(name, digits_class):
    """Only what fit receives: forget drops to the gold model's level, retain accuracy holds."""
    b = digits_class
    result = ErasusUnlearner(b.original, strategy="grad_diff", selector=name, fraction=0.1, seed=0, task=b.task).fit(b.forget, b.retain)
    assert result.coreset.selector == name and len(result.coreset) == int(np.ceil(0.1 * len(b.forget_ids)))
    assert json.loads(result.to_json())["coreset"]["selector"] == name  # info and selector params serialise
    with torch.no_grad():
        acc = {}
        for split, ds in (("forget", b.forget), ("retain", b.retain)):
            x = torch.stack([ds[i][1][0] for i in range(len(ds))])
            y = torch.stack([ds[i][1][1] for i in range(len(ds))])
            acc[split] = float((result.model(x).argmax(1) == y).float().mean())
    assert acc["forget"] <= 0.05  # original 1.00, gold 0.00
    assert acc["retain"] >= 0.95  # original 0.998, gold 0.998
