"""Target ``gold_exact``: the gold rule on whole answers (every prediction unit right) instead of the mean unit
accuracy, against hand computations on a two-unit answer ("three </s>") and the same verdict as ``gold`` on one unit."""

import numpy as np
import pytest

from erasus_ray.errors import InvalidConfigError
from erasus_ray.evaluation.stats import SetStats
from erasus_ray.evaluation.verification import GoldExactTarget, GoldTarget, Measurement, resolve_target
from erasus_ray.experiment import GOLD_TARGETS, JobConfig
from erasus_ray.tasks.classification import ClassificationTask

N = 146  # the llava benchmark's forget set


def _measured(correct) -> Measurement:
    correct = np.asarray(correct, dtype=float)
    loss = np.arange(len(correct), 0, -1, dtype=float)  # later ids have lower loss: failing ids come out reversed
    return Measurement(SetStats(np.arange(len(correct)), loss, correct), None, None)


def _prepared(kind, gold):
    t = kind(gold)
    t.prepare(_measured(np.ones(N)), None)
    return t


def test_whole_answers_pass_where_the_unit_accuracy_is_held_up_by_the_end_token():
    # 140 answers forgotten (word wrong, </s> right: half the units) and k still fully right
    for k, passes in ((6, True), (8, False)):
        m = _measured([0.5] * (N - k) + [1.0] * k)
        exact = _prepared(GoldExactTarget, {"forget_exact": 0.0}).verdict(m)
        assert exact.criteria[0].value == pytest.approx(k / N)  # 6/146 = 0.041, 8/146 = 0.055
        assert exact.criteria[0].high == pytest.approx(0.05)  # the floor: the 95% half-width at p=0, n=146 is 0.018
        assert exact.passed is passes
    # the unit accuracy of the same model is 0.52 and a retrain's varies with its seed (0.39 / 0.25 / 0.01 measured)
    unit = _prepared(GoldTarget, {"forget_acc": 0.39}).verdict(_measured([0.5] * (N - 6) + [1.0] * 6))
    assert unit.criteria[0].value == pytest.approx((0.5 * (N - 6) + 6) / N) and not unit.passed


def test_still_known_samples_are_the_fully_right_ones_and_one_unit_gives_the_same_verdict_as_gold():
    m = _measured([0.5, 1.0, 0.0, 1.0])
    target = _prepared(GoldExactTarget, {"forget_exact": 0.0})
    assert target.failing_ids(m).tolist() == [3, 1]  # fully right, lowest loss first; 0.5 is no longer known
    one_unit = _measured([1.0] * 20 + [0.0] * 126)
    a = _prepared(GoldExactTarget, {"forget_exact": 0.1}).verdict(one_unit)
    b = _prepared(GoldTarget, {"forget_acc": 0.1}).verdict(one_unit)
    assert (a.criteria[0].value, a.criteria[0].low, a.criteria[0].high, a.passed) == \
        (b.criteria[0].value, b.criteria[0].low, b.criteria[0].high, b.passed)


def test_gold_exact_is_resolved_needs_gold_and_is_llavas_default():
    kw = dict(task=ClassificationTask(), forget=None, retain=None, heldout=None)
    assert isinstance(resolve_target("gold_exact", gold={"forget_exact": 0.0}, **kw).target, GoldExactTarget)
    with pytest.raises(InvalidConfigError, match="'gold_exact' needs gold="):
        resolve_target("gold_exact", gold=None, **kw)
    with pytest.raises(InvalidConfigError, match="needs 'forget_exact'"):
        resolve_target("gold_exact", gold={"forget_acc": 0.0}, **kw).target.prepare(_measured([1.0]), None)
    assert JobConfig.from_dict({"benchmark": "llava", "scenario": "class"}).target == "gold_exact" in GOLD_TARGETS
