"""The empirical (epsilon, delta) lower bound and its Clopper-Pearson interval, certification of certified_removal vs
the empirical audit of other models, and TheoreticalBounds (issue 17), against hand computations."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from scipy import stats

from erasus_ray import ErasusUnlearner
from erasus_ray.certification import CertifiedRemovalVerifier, TheoreticalBounds
from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.evaluation.privacy import best_attack_bound, clopper_pearson, epsilon_from_rates, epsilon_lower_bound
from erasus_ray.strategies.certified_removal import certified_epsilon, train_certified_head


def test_clopper_pearson_matches_scipys_exact_interval():
    for k, n in ((0, 20), (3, 20), (20, 20), (37, 100)):
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert clopper_pearson(k, n, 0.05) == pytest.approx((ci.low, ci.high), abs=1e-12)
    with pytest.raises(InvalidDataError, match="k=5, n=3"):
        clopper_pearson(5, 3)


def test_epsilon_from_rates_is_the_dp_hypothesis_testing_bound():
    # TPR 0.8, FPR 0.1, delta 0: max(log(0.9 / 0.2), log(0.8 / 0.1)) = log 8
    assert epsilon_from_rates(0.1, 0.2) == pytest.approx(math.log(8))
    assert epsilon_from_rates(0.1, 0.2, delta=0.05) == pytest.approx(math.log(0.75 / 0.1))
    assert epsilon_from_rates(0.5, 0.5) == 0.0  # a coin flip proves nothing
    assert epsilon_from_rates(0.0, 0.3) == math.inf  # no false positive at TPR 0.7: no finite epsilon fits


def test_epsilon_bound_on_a_synthetic_attack_with_known_rates():
    # members: 80 of 100 score 2 (above the threshold), 20 score 0; non-members: 10 of 100 score 2
    members = np.r_[np.full(80, 2.0), np.zeros(20)]
    nonmembers = np.r_[np.full(10, 2.0), np.zeros(90)]
    b = epsilon_lower_bound(members, nonmembers, delta=1e-5, alpha=0.05)
    assert (b.tpr, b.fpr, b.threshold) == (0.8, 0.1, 2.0)
    assert b.epsilon == pytest.approx(math.log((1 - 1e-5 - 0.2) / 0.1))
    fpr_hi, fnr_hi = clopper_pearson(10, 100)[1], clopper_pearson(20, 100)[1]
    assert b.epsilon_low == pytest.approx(epsilon_from_rates(fpr_hi, fnr_hi, 1e-5))
    assert 0 < b.epsilon_low < b.epsilon < b.epsilon_high
    # the same attack on identical distributions proves nothing at the lower end of the interval
    same = epsilon_lower_bound(np.zeros(100), np.zeros(100))
    assert same.epsilon_low == 0.0
    # max_fpr restricts to the low-FPR region: FPR 0.1 is out, only "nobody is a member" remains
    assert epsilon_lower_bound(members, nonmembers, max_fpr=0.05).epsilon == 0.0
    # an over-unlearned forget set (members scoring *below* non-members) is caught by the reversed test
    reversed_ = epsilon_lower_bound(-members, -nonmembers)
    assert reversed_.epsilon == pytest.approx(b.epsilon) and (reversed_.direction, reversed_.threshold) == ("lower", -2.0)
    assert epsilon_lower_bound(-members, -nonmembers, two_sided=False).epsilon_low < b.epsilon_low
    name, best = best_attack_bound({"weak": (np.zeros(100), np.zeros(100)), "strong": (members, nonmembers)})
    assert name == "strong" and best == b


def test_hoeffding_gap_and_the_refused_pac_formula():
    assert TheoreticalBounds.hoeffding_gap(100, 400, alpha=0.05) == pytest.approx(
        math.sqrt(math.log(40) * (1 / 100 + 1 / 400) / 2))
    # Guo et al. 2020 Corollary 1: 4 gamma m^2 C^2 / (lam^2 (n - m))
    assert TheoreticalBounds.certified_removal_residual_bound(1000, 10, lam=0.1) == pytest.approx(
        4 * 0.25 * 100 / (0.01 * 990))
    with pytest.raises(InvalidConfigError, match="no derivation"):
        TheoreticalBounds.pac_utility_bound(n_total=50000, n_forget=500, delta=0.05)
    with pytest.raises(InvalidDataError, match="n_forget"):
        TheoreticalBounds.certified_removal_residual_bound(10, 10, lam=0.1)


@pytest.fixture(scope="module")
def certified(digits_class):
    b = digits_class
    forget_ids = np.sort(np.random.default_rng(0).choice(b.train.ids, size=8, replace=False))
    forget, retain = b.train.subset(forget_ids), b.train.exclude(forget_ids)
    model = copy.deepcopy(b.original)
    train_certified_head(model, b.train, lam=1e-3, sigma=1.0, seed=0)
    res = ErasusUnlearner(model, strategy="certified_removal", selector=None, fraction=None, seed=0,
                          progress=False).fit(forget_data=forget, retain_data=retain)
    return b, res, forget


def test_verifier_checks_the_certificate_of_certified_removal(certified):
    b, res, forget = certified
    info = res.report.info
    n_total = len(b.train)
    eps = certified_epsilon(info["residual_bound"], 1.0, 1e-5)
    loose = CertifiedRemovalVerifier(epsilon=2 * eps, delta=1e-5).verify(res.model, b.gold, n_total, 8,
                                                                        forget=forget, test=b.test, task=b.task)
    assert loose.method == "certificate" and loose.certified and loose.epsilon_certified == pytest.approx(eps)
    assert loose.details["removals"] == 1 and loose.details["head_distance_to_retrained"] > 0
    assert loose.empirical is not None and loose.empirical_retrained is not None
    tight = CertifiedRemovalVerifier(epsilon=eps / 2, delta=1e-5).verify(res.model, None, n_total, 8)
    assert tight.method == "certificate" and not tight.certified and "not certified" in tight.message
    with pytest.raises(InvalidDataError, match="remaining training set"):
        CertifiedRemovalVerifier(1.0, 1e-5).verify(res.model, None, n_total, 9)


def test_other_strategies_get_the_empirical_bound_not_a_certificate():
    pytest.importorskip("transformers")
    from erasus_ray.benchmarks.authors import AuthorsBenchmark
    from erasus_ray.benchmarks.base import build_benchmark

    a = build_benchmark(AuthorsBenchmark(variant="ci"), "forget10", seed=0)
    # the original LM, "unlearned" by nothing: no certificate, and its memorised forget answers are told apart from
    # held-out ones (losses ~0.02 vs ~6), so a claim of epsilon 0.1 is refuted
    verifier = CertifiedRemovalVerifier(epsilon=0.1, delta=1e-5)
    result = verifier.verify(a.original, a.gold, len(a.train), len(a.forget), forget=a.forget, test=a.test, task=a.task)
    assert result.method == "empirical" and not result.certified and result.epsilon_certified is None
    assert "no certificate" in result.message
    # measured: all 20 members and 49 of 50 non-members on the right side of the kept threshold; the lower bound is
    # the DP bound at the Clopper-Pearson upper rates of those counts
    e = result.empirical
    n1, n0 = e["n_members"], e["n_nonmembers"]
    fnr_hi = clopper_pearson(round((1 - e["tpr"]) * n1), n1)[1]
    fpr_hi = clopper_pearson(round(e["fpr"] * n0), n0)[1]
    assert (n1, n0) == (len(a.forget), len(a.test)) and e["tpr"] == 1.0 and e["fpr"] <= 0.02
    assert e["epsilon_low"] == pytest.approx(epsilon_from_rates(fpr_hi, fnr_hi, 1e-5))
    assert e["epsilon_low"] > 1.5 and result.consistent is False
    # the retrained model never saw the forget authors: the same attack proves next to nothing
    assert result.empirical_retrained["epsilon_low"] < 0.5
