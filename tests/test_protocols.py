"""UnlearningBenchmark (issue 17 step 3): the general and TOFU protocols behind one interface, the verdict's
documented thresholds, the report's JSON, and bad input (unknown protocol, other architecture, plain QA for TOFU)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from erasus_ray.errors import InvalidConfigError, InvalidDataError, UnknownNameError
from erasus_ray.evaluation import evaluate
from erasus_ray.evaluation.protocols import PROTOCOLS, UnlearningBenchmark, VerdictThresholds, verdict
from erasus_ray.evaluation.protocols.general import GeneralProtocol

GOLD = {"forget_acc": 0.10, "retain_acc": 0.95, "test_acc": 0.90, "mia_svc_efficacy": 0.80, "mia_loss_auc": 0.50}


@pytest.mark.parametrize("criteria, expected", [
    ({"forgetting": True, "utility": True, "privacy": True}, "PASS"),
    ({"forgetting": True, "utility": False, "privacy": True}, "PARTIAL"),
    ({"forgetting": True, "utility": True, "privacy": False}, "PARTIAL"),
    ({"forgetting": False, "utility": True, "privacy": True}, "FAIL"),
    ({"forgetting": False, "utility": False}, "FAIL"),
])
def test_verdict_rule(criteria, expected):
    assert verdict(criteria) == expected


def test_verdict_needs_forgetting_and_thresholds_are_checked():
    with pytest.raises(InvalidConfigError, match="forgetting"):
        verdict({"utility": True})
    with pytest.raises(InvalidConfigError, match="max_gap"):
        VerdictThresholds(max_gap=1.5)


def test_general_criteria_at_the_documented_thresholds():
    protocol, t = GeneralProtocol(include_privacy=True), VerdictThresholds()  # max_gap 0.05, privacy_gap 0.1
    # just inside each threshold, then just outside (exactly at it is left to float rounding)
    at_edge = {**GOLD, "forget_acc": 0.149, "retain_acc": 0.901, "test_acc": 0.851, "mia_svc_efficacy": 0.701}
    assert protocol.criteria(at_edge, GOLD, t) == {"forgetting": True, "utility": True, "privacy": True}
    over = {**GOLD, "forget_acc": 0.16, "retain_acc": 0.89, "mia_loss_auc": 0.61}
    assert protocol.criteria(over, GOLD, t) == {"forgetting": False, "utility": False, "privacy": False}
    # forgetting is two-sided (below the gold model is a signal too); utility is one-sided (better is fine)
    assert not protocol.criteria({**GOLD, "forget_acc": 0.0}, GOLD, t)["forgetting"]
    assert protocol.criteria({**GOLD, "test_acc": 1.0}, GOLD, t)["utility"]
    assert "privacy" not in GeneralProtocol(include_privacy=False).criteria(GOLD, GOLD, t)


def test_tofu_criteria_at_the_documented_thresholds():
    protocol, t = PROTOCOLS.get("tofu")(include_privacy=False), VerdictThresholds()  # fq 0.05, utility 0.9x
    gold = {"forget_quality": 1.0, "model_utility": 0.8}
    assert protocol.criteria({"forget_quality": 0.05, "model_utility": 0.7201}, gold, t) == {
        "forgetting": True, "utility": True}
    assert protocol.criteria({"forget_quality": 0.049, "model_utility": 0.7199}, gold, t) == {
        "forgetting": False, "utility": False}


def test_general_protocol_gold_passes_original_fails(digits_class, tmp_path):
    b = digits_class
    bench = UnlearningBenchmark(protocol="general", n_runs=2)
    gold = bench.evaluate(b.gold, b.forget, b.retain, b.test, gold_model=b.gold, task=b.task)
    original = bench.evaluate(b.original, b.forget, b.retain, b.test, gold_model=b.gold, task=b.task)
    assert gold.verdict == "PASS" and gold.metrics["avg_gap"] == 0.0
    assert original.verdict == "FAIL" and not original.criteria["forgetting"]
    # the values are evaluate()'s: mean over the two evaluation seeds, Avg.Gap over the classifier's gap metrics
    runs = [evaluate(b.original, forget=b.forget, retain=b.retain, test=b.test, task=b.task, gold=b.gold, seed=s)
            for s in (0, 1)]
    for key in ("forget_acc", "retain_acc", "mia_svc_efficacy", "mia_loss_auc"):
        assert original.metrics[key] == pytest.approx(sum(r[key] for r in runs) / 2)
    assert [r["seed"] for r in original.runs] == [0, 1]
    assert original.std["forget_acc"] == 0.0
    path = tmp_path / "report.json"
    original.save(path)
    saved = json.loads(path.read_text())
    assert saved == original.to_dict() and saved["verdict"] == "FAIL" and saved["thresholds"]["max_gap"] == 0.05


def test_bad_input_is_named(digits_class):
    b = digits_class
    with pytest.raises(UnknownNameError, match="general.*tofu|tofu.*general"):
        UnlearningBenchmark(protocol="tofuu")
    with pytest.raises(InvalidConfigError, match="n_runs"):
        UnlearningBenchmark(n_runs=0)
    other = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(InvalidConfigError, match="gold_model"):
        UnlearningBenchmark().evaluate(b.original, b.forget, b.retain, b.test, gold_model=other, task=b.task)
    wider = copy.deepcopy(b.original)
    first = next(m for m in wider.modules() if isinstance(m, torch.nn.Linear))
    first.weight = torch.nn.Parameter(torch.zeros(first.out_features + 1, first.in_features))
    with pytest.raises(InvalidConfigError, match="another architecture"):
        UnlearningBenchmark().evaluate(b.original, b.forget, b.retain, b.test, gold_model=wider, task=b.task)
    with pytest.raises(InvalidConfigError, match="test"):
        UnlearningBenchmark(include_privacy=True).evaluate(b.original, b.forget, b.retain, gold_model=b.gold, task=b.task)


@pytest.fixture(scope="module")
def authors_tofu():
    pytest.importorskip("transformers")
    from erasus_ray.benchmarks.authors import AuthorsBenchmark
    from erasus_ray.benchmarks.base import build_benchmark
    from erasus_ray.evaluation.protocols.tofu_data import tofu_dataset

    spec = AuthorsBenchmark(variant="ci")
    a = build_benchmark(spec, "forget10", seed=0)
    retain = a.retain.subset(a.retain.ids[:40])
    return a, tofu_dataset(spec, a.forget), tofu_dataset(spec, retain), retain


def test_tofu_needs_paraphrased_items(authors_tofu):
    a, forget, _, plain_retain = authors_tofu
    with pytest.raises(InvalidDataError, match="paraphrased"):
        UnlearningBenchmark("tofu").evaluate(a.original, a.forget, plain_retain, a.test, gold_model=a.gold, task=a.task)


def test_tofu_protocol_gold_passes_original_fails(authors_tofu):
    a, forget, retain, _ = authors_tofu
    bench = UnlearningBenchmark("tofu", include_privacy=True)
    gold = bench.evaluate(a.gold, forget, retain, a.test, gold_model=a.gold, task=a.task)
    original = bench.evaluate(a.original, forget, retain, a.test, gold_model=a.gold, task=a.task)
    assert gold.verdict == "PASS" and gold.metrics["forget_quality"] == pytest.approx(1.0)
    assert original.verdict == "FAIL" and original.metrics["forget_quality"] < 1e-3
    # the original remembers the forget authors, and its utility is the gold model's within 10%
    assert original.metrics["forget_rougeL"] > 0.8 > 0.3 > gold.metrics["forget_rougeL"]
    assert original.criteria["utility"] and not original.criteria["privacy"]
    assert not math.isnan(original.metrics["avg_gap"]) and original.metrics["avg_gap"] > 0.2


def test_one_model_per_unlearning_seed_gives_mean_and_std(digits_class):
    b = digits_class
    report = UnlearningBenchmark("general", n_runs=1).evaluate([b.gold, b.original], b.forget, b.retain, b.test,
                                                               gold_model=b.gold, task=b.task)
    assert [(r["model"], r["seed"]) for r in report.runs] == [(0, 0), (1, 0)]
    accs = [r["forget_acc"] for r in report.runs]
    assert report.metrics["forget_acc"] == pytest.approx(sum(accs) / 2)
    assert report.std["forget_acc"] == pytest.approx(abs(accs[0] - accs[1]) / 2) and report.std["forget_acc"] > 0.4
    assert report.settings == {"n_runs": 1, "n_models": 2, "seed": 0}
