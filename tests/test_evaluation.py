"""Evaluation: attack statistics against hand-made cases, gaps against the gold model."""

import numpy as np
import pytest

from erasus_ray.evaluation import evaluate, gap_metrics
from erasus_ray.evaluation.classification import auc, svc_mia_efficacy


def test_auc_extremes():
    assert auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert auc(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.5


def test_svc_efficacy_separates_members_from_non_members():
    rng = np.random.default_rng(0)
    retain = np.clip(rng.normal(0.98, 0.01, 300), 0, 1)  # members: confident
    test = np.clip(rng.normal(0.4, 0.15, 300), 0, 1)  # non-members: not
    assert svc_mia_efficacy(retain, test, np.clip(rng.normal(0.4, 0.15, 50), 0, 1)) > 0.9
    assert svc_mia_efficacy(retain, test, np.clip(rng.normal(0.98, 0.01, 50), 0, 1)) < 0.1


def test_gap_metrics_hand_computed():
    gaps = gap_metrics({"a": 0.9, "b": 0.5}, {"a": 0.7, "b": 0.6}, ("a", "b"))
    assert gaps["gap_a"] == pytest.approx(0.2) and gaps["gap_b"] == pytest.approx(0.1)
    assert gaps["avg_gap"] == pytest.approx(0.15)


def test_gold_has_zero_gap_and_original_a_large_one(digits_class):
    b = digits_class
    gold = evaluate(b.gold, forget=b.forget, retain=b.retain, test=b.test, gold=b.gold)
    assert gold["avg_gap"] == 0.0 and gold["forget_acc"] == 0.0
    orig = evaluate(b.original, forget=b.forget, retain=b.retain, test=b.test, gold=b.gold)
    assert orig["forget_acc"] > 0.95 and orig["avg_gap"] > 0.3
    # the original model's confidence on the forget class looks like membership; the gold model's does not
    assert orig["mia_svc_efficacy"] < 0.3 < 0.9 < gold["mia_svc_efficacy"]
    assert orig["seed"] == 0
