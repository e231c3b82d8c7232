"""Empirical (epsilon, delta) lower bounds from a membership attack, with a Clopper-Pearson confidence interval.

A mechanism that is (epsilon, delta)-differentially private bounds every membership test's error rates (Kairouz,
Oh & Viswanath 2015, Thm. 2.1; used for auditing by Jagielski, Ullman & Oprea 2020, "Auditing Differentially
Private Machine Learning", and by the NeurIPS 2023 machine-unlearning challenge's evaluation): for any threshold,

    FPR + e^epsilon FNR >= 1 - delta   and   FNR + e^epsilon FPR >= 1 - delta,

so an attack that reaches (FPR, FNR) proves

    epsilon >= max( log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR) ).

Here an "attack" is a score per sample (higher = member); members are the forget set, non-members held-out data.
For an unlearned model, the forget set should be indistinguishable from data never seen: a large lower bound
refutes any small-epsilon claim. :func:`epsilon_lower_bound` scans every threshold, and for each one turns the
counts into rates three ways: the point estimate, and the one-sided Clopper-Pearson bounds (exact binomial, Clopper
& Pearson 1934) at level ``alpha / 2`` per rate, which give an interval ``[epsilon_low, epsilon_high]`` holding with
probability ``>= 1 - alpha`` at that threshold (Jagielski et al. 2020 report ``epsilon_low``). The threshold kept is
the one with the largest ``epsilon_low``. Choosing it on the same samples makes the reported ``epsilon_low``
optimistic (a max over thresholds); with few samples (tens) the bounds are small anyway: 20 perfectly separated
members and non-members give ``epsilon_low`` ~1.6 at alpha 0.05.

Both directions are tested by default ("higher score = member" and "lower score = member": an over-unlearned forget
set is detectable too). ``max_fpr`` restricts the scan to the low-FPR region (the "TPR at low FPR" view, Carlini et al. 2022).

The bound refutes a privacy claim only when members and non-members are exchangeable (a random forget set against
held-out data of the same distribution). A forget set that is a whole class, compared with held-out data of every
class, is told apart by any model that generalises, the retrained one included: read the value against the gold
model's, as the protocols' privacy criteria do.

The registered metric ``mia_epsilon`` is ``epsilon_low`` of the best of the loss, Min-K% and Min-K%++ attacks
(forget vs test) at ``MetricOptions.dp_delta``. Cost: a sort of the scores per attack (O(n log n)).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

import numpy as np
from scipy import stats

from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.evaluation.metrics import EvalContext, register_metric
from erasus_ray.tasks import Capability


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Two-sided exact ``1 - alpha`` interval for a binomial rate with ``k`` successes in ``n`` trials."""
    if n <= 0 or not 0 <= k <= n:
        raise InvalidDataError(f"clopper_pearson: need 0 <= k <= n and n > 0, got k={k}, n={n}")
    if not 0 < alpha < 1:
        raise InvalidConfigError(f"alpha must be in (0, 1), got {alpha}")
    low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def _log_ratio(numerator: float, denominator: float) -> float:
    if numerator <= 0:
        return 0.0
    return math.inf if denominator <= 0 else max(0.0, math.log(numerator / denominator))


def epsilon_from_rates(fpr: float, fnr: float, delta: float = 0.0) -> float:
    """The (epsilon, delta)-DP lower bound an attack with these error rates proves (module docstring); >= 0."""
    if not 0 <= delta < 1:
        raise InvalidConfigError(f"delta must be in [0, 1), got {delta}")
    return max(_log_ratio(1 - delta - fpr, fnr), _log_ratio(1 - delta - fnr, fpr))


@dataclass(frozen=True)
class EpsilonBound:
    """:func:`epsilon_lower_bound`'s answer: the point estimate and its ``1 - alpha`` interval at the kept
    threshold, that threshold's TPR / FPR and counts, and the settings."""

    epsilon: float
    epsilon_low: float
    epsilon_high: float
    tpr: float
    fpr: float
    threshold: float
    n_members: int
    n_nonmembers: int
    delta: float
    alpha: float
    #: "higher": a score >= threshold is called a member; "lower": a score <= threshold is
    direction: str = "higher"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def epsilon_lower_bound(member_scores: Any, nonmember_scores: Any, delta: float = 1e-5, alpha: float = 0.05,
                        max_fpr: float | None = None, two_sided: bool = True) -> EpsilonBound:
    """The empirical epsilon lower bound of one attack (higher score = member); see the module docstring.

    ``two_sided``: also test "lower score = member" (``direction="lower"``: a score <= threshold is a member): an unlearned
    model that pushed its forget set *below* held-out data is as distinguishable as one that kept it above, and a DP
    guarantee bounds every test. The bound kept is the larger (more tests: a little more optimistic)."""
    members = np.asarray(member_scores, dtype=np.float64).reshape(-1)
    nonmembers = np.asarray(nonmember_scores, dtype=np.float64).reshape(-1)
    members, nonmembers = members[np.isfinite(members)], nonmembers[np.isfinite(nonmembers)]
    if not len(members) or not len(nonmembers):
        raise InvalidDataError("epsilon_lower_bound: needs finite scores for at least one member and one non-member")
    bounds = [_scan(members, nonmembers, delta, alpha, max_fpr)]
    if two_sided:
        low = _scan(-members, -nonmembers, delta, alpha, max_fpr)
        bounds.append(replace(low, threshold=-low.threshold, direction="lower"))
    return max(bounds, key=lambda b: (b.epsilon_low, b.epsilon))


def _scan(members: np.ndarray, nonmembers: np.ndarray, delta: float, alpha: float,
          max_fpr: float | None) -> EpsilonBound:
    """The threshold "score >= t = member" with the largest ``epsilon_low``."""
    n1, n0 = len(members), len(nonmembers)
    best: EpsilonBound | None = None
    for threshold in np.unique(np.r_[members, nonmembers, np.inf]):
        tp, fp = int((members >= threshold).sum()), int((nonmembers >= threshold).sum())
        if max_fpr is not None and fp / n0 > max_fpr:
            continue
        bound = _bound_at(tp, fp, n1, n0, delta, alpha, float(threshold))
        if best is None or (bound.epsilon_low, bound.epsilon) > (best.epsilon_low, best.epsilon):
            best = bound
    assert best is not None  # the threshold +inf (predict nobody a member) always qualifies
    return best


def _bound_at(tp: int, fp: int, n1: int, n0: int, delta: float, alpha: float, threshold: float) -> EpsilonBound:
    fn = n1 - tp
    fpr_lo, fpr_hi = clopper_pearson(fp, n0, alpha)
    fnr_lo, fnr_hi = clopper_pearson(fn, n1, alpha)
    return EpsilonBound(
        epsilon=epsilon_from_rates(fp / n0, fn / n1, delta),
        epsilon_low=epsilon_from_rates(fpr_hi, fnr_hi, delta),  # the worst rates the counts allow: a lower bound
        epsilon_high=epsilon_from_rates(fpr_lo, fnr_lo, delta),
        tpr=tp / n1, fpr=fp / n0, threshold=threshold, n_members=n1, n_nonmembers=n0, delta=delta, alpha=alpha)


def best_attack_bound(attacks: Mapping[str, tuple[Any, Any]], delta: float = 1e-5, alpha: float = 0.05,
                      max_fpr: float | None = None) -> tuple[str, EpsilonBound]:
    """``(name, bound)`` of the attack with the largest ``epsilon_low``; ``attacks``: name -> (member, non-member
    scores)."""
    if not attacks:
        raise InvalidConfigError("attacks: no attack given")
    bounds = {name: epsilon_lower_bound(m, n, delta, alpha, max_fpr) for name, (m, n) in attacks.items()}
    name = max(bounds, key=lambda k: (bounds[k].epsilon_low, bounds[k].epsilon))
    return name, bounds[name]


def context_attacks(ctx: EvalContext) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The membership attacks of an evaluation, forget (members) vs test: LOSS, Min-K% and Min-K%++ scores."""
    forget, test = ctx.stats("forget"), ctx.stats("test")
    attacks = {"loss": (-forget.loss, -test.loss)}
    for column in ("mink", "minkpp"):
        if column in forget.columns:
            attacks[column] = (np.asarray(forget.columns[column]), np.asarray(test.columns[column]))
    return attacks


@register_metric("mia_epsilon", requires={Capability.LOGITS}, splits=("forget", "test"), columns=("mink", "minkpp"),
                 display=True)
def mia_epsilon(ctx: EvalContext) -> float:
    """Empirical epsilon lower bound (Clopper-Pearson, alpha 0.05) of the best of LOSS / Min-K% / Min-K%++."""
    return best_attack_bound(context_attacks(ctx), ctx.options.dp_delta)[1].epsilon_low


__all__ = ["EpsilonBound", "best_attack_bound", "clopper_pearson", "context_attacks", "epsilon_from_rates",
           "epsilon_lower_bound"]
