"""The ``general`` protocol: the classifier evaluation we have (accuracy on forget / retain / test, membership
attacks, Avg.Gap to the retrained model; Jia et al. 2023, Fan et al. 2024) behind the protocol interface.

Criteria (thresholds: :class:`~erasus_ray.evaluation.protocols.base.VerdictThresholds`):

* forgetting: ``|forget_acc - gold forget_acc| <= max_gap`` (the retrained model's forget accuracy is the target:
  lower is not better, since an unlearned model that scores below the gold model is itself a membership signal);
* utility: ``retain_acc`` and ``test_acc`` each at most ``max_gap`` below the gold model's;
* privacy (``include_privacy``): ``mia_svc_efficacy`` and ``mia_loss_auc`` each within ``privacy_gap`` of the gold's,
  and the empirical epsilon lower bound ``mia_epsilon`` at most ``epsilon_gap`` above the gold's.

Cost: one forward pass per split per model and run, plus one small SVC fit per run.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from erasus_ray.evaluation.protocols.base import (
    FORGETTING, PROTOCOLS, EvalData, Protocol, StandIn, VerdictThresholds, epsilon_within,
)
from erasus_ray.evaluation.suite import MetricSuite

ACCURACY = ("forget_acc", "retain_acc", "test_acc")
PRIVACY = ("mia_svc_efficacy", "mia_loss_auc")


def within(mean: Mapping[str, float], gold: Mapping[str, float], names: tuple[str, ...], gap: float) -> bool:
    """Whether every metric of ``names`` is within ``gap`` of the gold model's value."""
    return all(abs(mean[n] - gold[n]) <= gap for n in names)


@PROTOCOLS.register("general")
class GeneralProtocol(Protocol):
    """Classifier protocol: accuracies, membership attacks and Avg.Gap against the gold model. Stand-in: the digits
    MLP forgetting class 3 (``variant`` is ignored)."""

    tradeoff = ("forget_acc", "test_acc")

    @classmethod
    def standin(cls, variant: str = "ci", seed: int = 0) -> StandIn:
        from erasus_ray.benchmarks import load_benchmark

        bench = load_benchmark("digits", scenario="class", seed=seed)
        return StandIn(bench, bench.forget, bench.retain, bench.test, ("gradient_ascent", "scrub", "fine_tune"))

    def names(self) -> tuple[str, ...]:
        return ACCURACY + (PRIVACY + ("mia_epsilon",) if self.include_privacy else ())

    def measure(self, model: nn.Module, data: EvalData, seed: int, reference: Mapping[str, Any]) -> dict[str, float]:
        return MetricSuite(self.names()).run(model, data.forget, data.retain, data.test, task=data.task, seed=seed).metrics

    def criteria(self, mean: Mapping[str, float], gold: Mapping[str, float], thresholds: VerdictThresholds) -> dict[str, bool]:
        result = {
            FORGETTING: within(mean, gold, ("forget_acc",), thresholds.max_gap),
            "utility": all(mean[n] >= gold[n] - thresholds.max_gap for n in ("retain_acc", "test_acc")),
        }
        if self.include_privacy:
            result["privacy"] = within(mean, gold, PRIVACY, thresholds.privacy_gap) and epsilon_within(mean, gold, thresholds)
        return result


__all__ = ["GeneralProtocol", "within"]
