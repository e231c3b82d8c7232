"""Certification: check the (epsilon, delta) certificate of ``certified_removal``, audit any other unlearned model
empirically, and the bounds that have a derivation.

:class:`CertifiedRemovalVerifier` answers "is this removal (epsilon, delta)-certified?" honestly:

* a model unlearned by ``certified_removal`` (a convex head fitted by ``train_certified_head``, Guo et al. 2020)
  carries its gradient-residual bound and noise scale; its certificate is Theorem 3's ``epsilon = c * bound / sigma``,
  ``c = sqrt(2 ln(1.5 / delta))``, and it is **certified** when that is at most the requested ``epsilon``;
* any other model has no certificate: the verifier reports the empirical lower bound of
  :mod:`erasus_ray.evaluation.privacy` (the loss-threshold attack, forget vs held-out, which every task family
  has, with a Clopper-Pearson interval), which can refute an epsilon claim but never establish one.

:class:`TheoreticalBounds` holds only bounds with a derivation cited in their docstring. The seed package's
``pac_utility_bound`` (``utility_drop <= (k/n) eps_gen + sqrt(2 (k/n) log(1/delta))`` with the VC dimension taken
as the number of parameters) has no derivation we could find, and is not offered: calling it raises with this
explanation. What can be derived is offered instead: the certified-removal epsilon and its worst-case residual bound,
and a Hoeffding bound on a measured accuracy gap.

Example::

    verifier = CertifiedRemovalVerifier(epsilon=1.0, delta=1e-5)
    result = verifier.verify(unlearned, retrained, n_total=1797, n_forget=8, forget=f, test=t)
    result.certified, result.epsilon_certified, result.empirical["epsilon_low"]

Cost: with ``forget`` / ``test`` given, one forward pass over each per model (the attacks' scores).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from torch import nn

from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.evaluation.privacy import epsilon_lower_bound
from erasus_ray.evaluation.stats import set_stats
from erasus_ray.strategies.certified_removal import LOGISTIC_GAMMA, CertifiedHead, certified_epsilon
from erasus_ray.tasks import get_task


class TheoreticalBounds:
    """Bounds with a derivation (each docstring cites it). All static."""

    @staticmethod
    def certified_removal_epsilon(residual_bound: float, sigma: float, delta: float) -> float:
        """Guo, Goldstein, Hannun & van der Maaten 2020, Theorem 3: objective perturbation ``b ~ N(0, sigma^2 I)``
        and a gradient residual ``||grad L(w-; D')|| <= residual_bound`` give an ``(epsilon, delta)``-certified
        removal with ``epsilon = sqrt(2 ln(1.5 / delta)) * residual_bound / sigma``."""
        return certified_epsilon(residual_bound, sigma, delta)

    @staticmethod
    def certified_removal_residual_bound(n_total: int, n_forget: int, lam: float, gradient_bound: float = 1.0,
                                         gamma: float = LOGISTIC_GAMMA) -> float:
        """Guo et al. 2020, Theorem 1 (one point) and Corollary 1 (``m`` points at once): the data-independent
        worst case of the Newton step's gradient residual, ``4 gamma m^2 C^2 / (lam^2 (n - m))``, for the objective
        ``sum_i l(w.x_i, y_i) + lam n / 2 ||w||^2`` with ``||x_i|| <= 1``, ``||grad l|| <= C`` (``gradient_bound``;
        1 for the logistic loss on such features) and ``l''`` ``gamma``-Lipschitz (1/4 for the logistic loss)."""
        _check_counts(n_total, n_forget)
        if lam <= 0:
            raise InvalidConfigError(f"lam must be > 0, got {lam}")
        m = n_forget
        return 4 * gamma * m * m * gradient_bound ** 2 / (lam * lam * (n_total - m))

    @staticmethod
    def hoeffding_gap(n_a: int, n_b: int, alpha: float = 0.05, value_range: float = 1.0) -> float:
        """Half-width ``t`` with ``P(|gap - E gap| >= t) <= alpha`` for the gap between the means of two
        independent samples of sizes ``n_a`` and ``n_b`` of values in an interval of width ``value_range`` (e.g.
        0/1 correctness: the measured accuracy gap between an unlearned and a retrained model on separate data).
        Hoeffding 1963, Thm. 2, applied to the ``n_a + n_b`` terms ``x_i / n_a`` and ``-y_j / n_b``:
        ``t = value_range * sqrt(ln(2 / alpha) (1/n_a + 1/n_b) / 2)``."""
        if n_a < 1 or n_b < 1:
            raise InvalidDataError(f"hoeffding_gap: sample sizes must be >= 1, got {n_a}, {n_b}")
        if not 0 < alpha < 1:
            raise InvalidConfigError(f"alpha must be in (0, 1), got {alpha}")
        return value_range * math.sqrt(math.log(2 / alpha) * (1 / n_a + 1 / n_b) / 2)

    @staticmethod
    def pac_utility_bound(*args: Any, **kwargs: Any) -> dict[str, float]:
        """Not offered: the seed's formula has no derivation (module docstring). Raises InvalidConfigError."""
        raise InvalidConfigError(
            "pac_utility_bound: the seed's formula (VC dimension = number of parameters) has no derivation and is not "
            "offered; use TheoreticalBounds.hoeffding_gap on a measured gap, or certified_removal_epsilon")


def _check_counts(n_total: int, n_forget: int) -> None:
    if not 1 <= n_forget < n_total:
        raise InvalidDataError(f"n_total / n_forget: need 1 <= n_forget < n_total, got n_total={n_total}, "
                               f"n_forget={n_forget}")


@dataclass
class CertificationResult:
    """What :meth:`CertifiedRemovalVerifier.verify` found. ``method``: ``"certificate"`` (a certified_removal
    head) or ``"empirical"`` (no certificate: only the audit); ``certified``: the certificate holds at the requested
    epsilon (always False for ``"empirical"``); ``consistent``: the empirical lower bound does not refute the
    requested epsilon (None without data to audit)."""

    method: str
    certified: bool
    epsilon: float
    delta: float
    epsilon_certified: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    empirical: dict[str, Any] | None = None
    empirical_retrained: dict[str, Any] | None = None
    consistent: bool | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CertifiedRemovalVerifier:
    """Check an ``(epsilon, delta)`` removal claim (module docstring).

    Args:
        epsilon: the claimed epsilon (> 0).
        delta: the claimed delta, in (0, 1).
        alpha: the empirical bound's confidence level is ``1 - alpha``.
    """

    def __init__(self, epsilon: float, delta: float, alpha: float = 0.05) -> None:
        if not epsilon > 0:
            raise InvalidConfigError(f"epsilon must be > 0, got {epsilon}")
        if not 0 < delta < 1:
            raise InvalidConfigError(f"delta must be in (0, 1), got {delta}")
        self.epsilon, self.delta, self.alpha = float(epsilon), float(delta), float(alpha)

    def verify(self, unlearned: nn.Module, retrained: nn.Module | None, n_total: int, n_forget: int, *,
               forget: Any = None, test: Any = None, task: Any = "auto") -> CertificationResult:
        """The certificate of a ``certified_removal`` model, else the empirical audit; with ``forget`` and ``test``
        (held-out) data the audit is run for both models either way."""
        _check_counts(int(n_total), int(n_forget))
        state = getattr(unlearned, "certified_head", None)
        result = (self._certificate(unlearned, retrained, state, int(n_total), int(n_forget))
                  if isinstance(state, CertifiedHead) and state.removals > 0 else
                  CertificationResult("empirical", False, self.epsilon, self.delta,
                                      message="no certificate: this model was not unlearned by certified_removal; "
                                              "the empirical bound below can refute an epsilon claim, not prove one"))
        if forget is not None and test is not None:
            result.empirical = self._audit(unlearned, forget, test, task)
            if retrained is not None:
                result.empirical_retrained = self._audit(retrained, forget, test, task)
            result.consistent = result.empirical["epsilon_low"] <= self.epsilon
        return result

    def _certificate(self, model: nn.Module, retrained: nn.Module | None, state: CertifiedHead, n_total: int,
                     n_forget: int) -> CertificationResult:
        remaining = n_total - n_forget
        if len(state.train_ids) != remaining:
            raise InvalidDataError(f"n_total - n_forget = {remaining}, but the certified head's remaining training "
                                   f"set has {len(state.train_ids)} samples")
        eps = certified_epsilon(state.residual_bound, state.sigma, self.delta)
        details = {"residual_bound": state.residual_bound, "sigma": state.sigma, "lam": state.lam,
                   "removals": state.removals,
                   "worst_case_residual_bound": TheoreticalBounds.certified_removal_residual_bound(
                       n_total, n_forget, state.lam),
                   "head_distance_to_retrained": _head_distance(model, retrained, state.head)}
        ok = eps <= self.epsilon
        message = (f"certified: epsilon {eps:.4g} <= {self.epsilon:.4g} at delta {self.delta:.2g}" if ok else
                   f"not certified at epsilon {self.epsilon:.4g}: the certificate gives {eps:.4g} (residual bound "
                   f"{state.residual_bound:.4g}, sigma {state.sigma:.4g})")
        return CertificationResult("certificate", ok, self.epsilon, self.delta, eps, details, message=message)

    def _audit(self, model: nn.Module, forget: Any, test: Any, task: Any) -> dict[str, Any]:
        from erasus_ray.data import as_id_dataset

        adapter = get_task(task, model)
        f = set_stats(model, adapter, as_id_dataset(forget), adapter.eval_batch_size).loss
        t = set_stats(model, adapter, as_id_dataset(test), adapter.eval_batch_size).loss
        return epsilon_lower_bound(-f, -t, self.delta, self.alpha).to_dict()


def _head_distance(model: nn.Module, retrained: nn.Module | None, head: str) -> float | None:
    """Frobenius distance between the two models' head weights (None without a retrained model of that shape)."""
    if retrained is None:
        return None
    mine = model.get_submodule(head) if head else model
    theirs = retrained.get_submodule(head) if head else retrained
    try:
        a = np.r_[mine.weight.detach().double().numpy().ravel(), _bias(mine)]
        b = np.r_[theirs.weight.detach().double().numpy().ravel(), _bias(theirs)]
    except AttributeError:
        return None
    return float(np.linalg.norm(a - b)) if a.shape == b.shape else None


def _bias(module: nn.Module) -> np.ndarray:
    bias = getattr(module, "bias", None)
    return np.zeros(0) if bias is None else bias.detach().double().numpy().ravel()


__all__ = ["CertificationResult", "CertifiedRemovalVerifier", "TheoreticalBounds"]
