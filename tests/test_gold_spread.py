"""The gold target widened to a measured retrain spread (``target={"gold_spread": {...}}``), against hand-computed
bounds: the sampling half-width alone, or the spread where wider, on both sides (pass and overshoot)."""

import numpy as np
import pytest

from erasus_ray.errors import InvalidConfigError
from erasus_ray.evaluation.stats import SetStats
from erasus_ray.evaluation.verification import GoldTarget, Measurement, resolve_target, verification_tolerance
from erasus_ray.experiment import _spread_target
from erasus_ray.tasks.classification import ClassificationTask

N = 146  # the llava benchmark's forget set
GOLD = 0.39


def _measured(acc: float) -> Measurement:
    """A forget set of N samples, each with half its units right (answer word wrong, </s> right) or as ``acc`` says."""
    correct = np.full(N, acc)
    return Measurement(SetStats(np.arange(N), np.ones(N), correct), None, None)


def _target(spread=None) -> GoldTarget:
    t = GoldTarget({"forget_acc": GOLD}, spread=spread)
    t.prepare(_measured(1.0), None)
    return t


def test_the_sampling_tolerance_alone_rejects_a_model_that_a_measured_spread_admits():
    half = verification_tolerance(GOLD, N)
    q = (GOLD * N + 2) / (N + 4)
    assert half == pytest.approx(1.96 * np.sqrt(q * (1 - q) / (N + 4)))  # 0.078 by hand
    assert not _target().verdict(_measured(0.50)).passed  # 0.50 > 0.39 + 0.078
    wide = _target({"forget_acc": 0.12}).verdict(_measured(0.50))
    assert wide.passed and wide.criteria[0].high == pytest.approx(GOLD + 0.12)
    assert not _target({"forget_acc": 0.10}).verdict(_measured(0.50)).passed  # 0.49 < 0.50
    assert _target({"forget_acc": 0.01}).verdict(_measured(0.30)).criteria[0].low == pytest.approx(GOLD - half)  # max()


def test_overshoot_is_judged_against_the_widened_tolerance_too():
    assert _target().verdict(_measured(0.30)).overshoot  # below 0.39 - 0.078
    assert not _target({"forget_acc": 0.12}).verdict(_measured(0.30)).overshoot  # within 0.39 - 0.12


def test_spread_target_is_resolved_from_a_dict_and_bad_ones_are_refused():
    task = ClassificationTask()
    resolved = resolve_target({"gold_spread": {"forget_acc": 0.2}}, task=task, forget=None, retain=None, heldout=None,
                              gold={"forget_acc": GOLD})
    assert isinstance(resolved.target, GoldTarget) and resolved.target.spread == {"forget_acc": 0.2}
    assert _spread_target({"gold_spread": {"forget_acc": 0.2}}) and not _spread_target("auto")
    for target, gold, match in [({"gold_spread": {"forget_acc": 0.2}}, None, "needs gold"),
                                ({"gold_spread": {"forget_acc": 0.2}, "forget_acc": {"max": 0.1}}, {"forget_acc": GOLD}, "no other key"),
                                ({"gold_spread": {"forget_loss": 0.2}}, {"forget_acc": GOLD}, "unknown metric 'forget_loss'"),
                                ({"gold_spread": {"forget_acc": 2}}, {"forget_acc": GOLD}, r"in \[0, 1\]")]:
        with pytest.raises(InvalidConfigError, match=match):
            resolve_target(target, task=task, forget=None, retain=None, heldout=None, gold=gold)
