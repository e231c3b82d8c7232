"""Shadow-model LiRA, offline variant (Carlini et al. 2022, "Membership Inference Attacks From First Principles",
Sec. IV and VI-C), registered as ``mia_lira_auc``.

Per sample ``x`` the attack reads the logit-scaled confidence ``phi(x) = log(p / (1 - p))`` with ``p = exp(-loss)``
(the task's per-sample loss: for a classifier the true label's probability, for a causal LM the length-normalised
answer likelihood; Carlini et al. scale the confidence this way because it is close to Gaussian). ``S`` shadow
models are trained by a caller-supplied trainer on random halves of a reference set that contains neither the forget
nor the test samples, so every shadow is an OUT model for every target sample; per sample, a Gaussian
``N(mu_out, sigma_out^2)`` is fitted to the shadows' ``phi`` and the offline likelihood-ratio test scores the model
under attack by the one-sided ``Lambda(x) = Phi((phi(x) - mu_out(x)) / sigma_out(x))`` (the probability mass of
the OUT distribution below the observed confidence: near 1 = far more confident than any model that never saw
``x``). ``mia_lira_auc`` is the ROC AUC of ``Lambda`` on the forget set (members) against the test set.

With few shadows the per-sample variance is noisy; ``fixed_variance=True`` uses one variance over all samples
(the paper's choice below 64 shadows). A per-sample difficulty calibration is what separates LiRA from the global
LOSS threshold: a sample every model fits (easy) does not look like a member for being fitted.

Cost: ``n_shadows`` runs of the caller's trainer on half the reference set each (once per :class:`LiraShadows`,
reused by every evaluation given it), plus one forward pass of each shadow over forget and test (cached per split).

Example::

    shadows = LiraShadows(reference=retain, train=lambda data, seed: train_fresh_model(data, seed), n_shadows=4)
    MetricSuite(["mia_lira_auc"]).run(model, forget, retain, test, lira=shadows)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from scipy.stats import norm
from torch import nn

from erasus_ray.data import IdDataset, as_id_dataset
from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.evaluation.loss_metrics import membership_auc
from erasus_ray.evaluation.metrics import EvalContext, register_metric
from erasus_ray.evaluation.stats import set_stats
from erasus_ray.tasks import Capability, Task

#: ``phi`` for a loss of exactly 0 would be +inf; losses are floored here (p = 1 - 1e-12).
_MIN_LOSS = 1e-12


def logit_confidence(loss: np.ndarray) -> np.ndarray:
    """``log(p / (1 - p))`` with ``p = exp(-loss)``, computed as ``-loss - log(1 - exp(-loss))`` (stable)."""
    loss = np.maximum(np.asarray(loss, dtype=np.float64), _MIN_LOSS)
    return -loss - np.log(-np.expm1(-loss))


def lira_offline_scores(target: np.ndarray, shadow: np.ndarray, fixed_variance: bool = False) -> np.ndarray:
    """Offline LiRA statistic ``Phi((phi - mu_out) / sigma_out)`` per sample.

    ``target``: ``[N]`` logit-scaled confidences of the attacked model; ``shadow``: ``[N, S]`` those of ``S`` OUT
    shadow models on the same samples. ``sigma_out``: the per-sample (population) standard deviation, or with
    ``fixed_variance`` the root mean of the per-sample variances; floored at 1e-6 (identical shadows)."""
    target = np.asarray(target, dtype=np.float64).reshape(-1)
    shadow = np.asarray(shadow, dtype=np.float64).reshape(len(target), -1)
    if shadow.shape[1] < 1:
        raise InvalidDataError("lira_offline_scores: needs at least one shadow model's scores")
    mu, var = shadow.mean(axis=1), shadow.var(axis=1)
    sigma = np.sqrt(np.full_like(var, var.mean()) if fixed_variance else var)
    return norm.cdf((target - mu) / np.maximum(sigma, 1e-6))


@dataclass(eq=False)
class LiraShadows:
    """The OUT shadow models of offline LiRA (module docstring), trained on first use and kept.

    Args:
        reference: data of the target's distribution containing none of the samples attacked (e.g. the retain set
            when the forget set is attacked against held-out test data); anything ``as_id_dataset`` takes.
        train: ``train(data, seed) -> model``: a fresh model of the attacked architecture trained on ``data`` the
            way the target was (the caller's recipe, its cost).
        n_shadows: shadow models (>= 2 for a variance; Carlini et al. use 64+ online, a few suffice offline).
        seed: draws the halves (``default_rng(seed)``) and is passed to ``train`` as ``seed + k``.
        fixed_variance: one variance for all samples instead of per-sample ones (better with few shadows).
        models: already trained shadow models (then ``reference`` / ``train`` are not used).
    """

    reference: Any = None
    train: Callable[[IdDataset, int], nn.Module] | None = None
    n_shadows: int = 4
    seed: int = 0
    fixed_variance: bool = False
    models: list[nn.Module] | None = None
    _phi: dict[Any, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.models is None and (self.reference is None or self.train is None):
            raise InvalidConfigError("LiraShadows: give reference= and train= (or already trained models=)")
        if self.models is None and int(self.n_shadows) < 2:
            raise InvalidConfigError(f"LiraShadows.n_shadows must be >= 2 (a variance), got {self.n_shadows}")

    def shadow_models(self) -> list[nn.Module]:
        """The shadow models, training them on random halves of ``reference`` on first call."""
        if self.models is None:
            data = as_id_dataset(self.reference)
            rng = np.random.default_rng(self.seed)
            half = len(data) // 2
            self.models = [self.train(data.subset(rng.permutation(data.ids)[:half]), self.seed + k)
                           for k in range(int(self.n_shadows))]
        return self.models

    def shadow_phi(self, task: Task, data: IdDataset, batch_size: int) -> np.ndarray:
        """``[N, S]`` logit-scaled confidences of every shadow on ``data`` (cached by the data's ids)."""
        key = tuple(int(i) for i in data.ids)
        if key not in self._phi:
            self._phi[key] = np.stack([logit_confidence(set_stats(m, task, data, batch_size).loss)
                                       for m in self.shadow_models()], axis=1)
        return self._phi[key]

    def scores(self, model_loss: np.ndarray, task: Task, data: IdDataset, batch_size: int) -> np.ndarray:
        """Offline LiRA statistic of the attacked model (its per-sample losses on ``data``)."""
        return lira_offline_scores(logit_confidence(model_loss), self.shadow_phi(task, data, batch_size),
                                   self.fixed_variance)


@register_metric("mia_lira_auc", requires={Capability.LOSS}, splits=("forget", "test"), options=("lira",))
def mia_lira_auc(ctx: EvalContext) -> float:
    """Offline shadow-model LiRA AUC, forget (members) vs test (non-members); needs ``lira=LiraShadows(...)``."""
    shadows = ctx.options.lira
    if not isinstance(shadows, LiraShadows):
        raise InvalidConfigError(f"lira: a LiraShadows, got {type(shadows).__name__}")
    forget, test = (shadows.scores(ctx.stats(s).loss, ctx.task, ctx.splits[s], ctx.batch_size) for s in ("forget", "test"))
    return membership_auc(forget, test)


__all__ = ["LiraShadows", "lira_offline_scores", "logit_confidence"]
