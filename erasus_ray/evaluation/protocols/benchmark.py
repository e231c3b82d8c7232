"""``UnlearningBenchmark``: run a protocol on an unlearned model against the gold (retrained) model, get a verdict.

Example::

    bench = UnlearningBenchmark(protocol="general", n_runs=3)
    report = bench.evaluate(unlearned, forget, retain, test, gold_model=retrained)
    report.verdict            # "PASS" / "PARTIAL" / "FAIL"
    report.save("results.json")

``model`` may be one model or a list of models (one per unlearning seed); every model is evaluated with ``n_runs``
evaluation seeds (``seed``, ``seed + 1``, ...), which vary only the randomised metrics (the SVC attack's shadow
split), and the report gives the mean and standard deviation over all of those runs. The criteria and the verdict
are taken on the mean (:mod:`.base`). The gold model is evaluated once, with ``seed``.

Cost: ``len(models) * n_runs + 1`` protocol evaluations (see each protocol's cost).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from torch import nn

from erasus_ray.data import as_id_dataset
from erasus_ray.errors import InvalidConfigError
from erasus_ray.evaluation.metrics import METRICS, gap_metrics, gap_names_for
from erasus_ray.evaluation.protocols.base import PROTOCOLS, BenchmarkReport, EvalData, VerdictThresholds, verdict
from erasus_ray.tasks import Task, get_task


def check_same_architecture(model: nn.Module, gold: nn.Module) -> None:
    """The gold model must be the unlearned model's architecture: same class, same parameter names and shapes."""
    if type(model) is not type(gold):
        raise InvalidConfigError(f"gold_model: a {type(gold).__name__}, but the model is a {type(model).__name__}")
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    mine, theirs = shapes(model), shapes(gold)
    if mine != theirs:
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise InvalidConfigError(f"gold_model: another architecture than the model; parameters differ: {differ[:5]}")


def mean_std(runs: Sequence[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-metric mean and (population) standard deviation over runs."""
    keys = list(runs[0])
    values = {k: np.array([r[k] for r in runs], dtype=np.float64) for k in keys}
    return {k: float(v.mean()) for k, v in values.items()}, {k: float(v.std()) for k, v in values.items()}


class UnlearningBenchmark:
    """A benchmark protocol with its settings.

    Args:
        protocol: a name in :data:`~erasus_ray.evaluation.protocols.base.PROTOCOLS` (``"tofu"``, ``"muse"``,
            ``"wmdp"``, ``"general"``).
        n_runs: evaluation seeds per model (>= 1).
        include_privacy: add the membership-attack metrics, the empirical (epsilon, delta) lower bound
            (``mia_epsilon``, :mod:`erasus_ray.evaluation.privacy`) and the privacy criterion (needs a ``test`` split).
        thresholds: the verdict's thresholds (default :class:`VerdictThresholds`).
        seed: the first evaluation seed.
    """

    def __init__(self, protocol: str = "general", n_runs: int = 1, include_privacy: bool = True,
                 thresholds: VerdictThresholds | None = None, seed: int = 0) -> None:
        if int(n_runs) < 1:
            raise InvalidConfigError(f"n_runs must be >= 1, got {n_runs}")
        self.protocol = PROTOCOLS.get(protocol)(include_privacy=include_privacy)
        self.n_runs, self.include_privacy, self.seed = int(n_runs), include_privacy, seed
        self.thresholds = thresholds or VerdictThresholds()

    def evaluate(self, model: nn.Module | Sequence[nn.Module], forget: Any, retain: Any, test: Any = None, *,
                 gold_model: nn.Module, task: Task | str = "auto",
                 unlearn_seconds: float | Sequence[float] | None = None,
                 utility_sets: Mapping[str, Any] | None = None) -> BenchmarkReport:
        """Evaluate ``model`` (or one model per unlearning seed) against ``gold_model``; see the module docstring.

        ``unlearn_seconds``: the wall time of the unlearning run of each model (one number per model, measured by
        the caller, e.g. :func:`~erasus_ray.evaluation.cost.timed`); every run of a model then reports it as the
        metric ``seconds``, so the report gives its mean and std beside the quality metrics. ``utility_sets``: extra
        QA sets the protocol's utility reads (TOFU: its world-facts stand-in, ``StandIn.utility_sets``)."""
        models = list(model) if isinstance(model, (list, tuple)) else [model]
        if not models:
            raise InvalidConfigError("model: no model given")
        costs = _per_model_seconds(unlearn_seconds, len(models))
        for m in models:
            check_same_architecture(m, gold_model)
        if self.include_privacy and test is None:
            raise InvalidConfigError("test: include_privacy=True needs a test split (the attacks' non-members)")
        data = EvalData(as_id_dataset(forget), as_id_dataset(retain),
                        None if test is None else as_id_dataset(test), get_task(task, models[0]),
                        {k: as_id_dataset(v) for k, v in (utility_sets or {}).items()})
        reference = self.protocol.prepare(gold_model, data)
        gold = self.protocol.measure(gold_model, data, self.seed, reference)
        runs = [{**self.protocol.measure(m, data, self.seed + r, reference), **costs[i], "model": i,
                 "seed": self.seed + r} for i, m in enumerate(models) for r in range(self.n_runs)]
        mean, std = mean_std([{k: v for k, v in run.items() if k not in ("model", "seed")} for run in runs])
        mean.update(self._gaps(mean, gold, data.task))
        criteria = self.protocol.criteria(mean, gold, self.thresholds)
        return BenchmarkReport(self.protocol.name, verdict(criteria), criteria, mean, std, gold, runs, self.thresholds,
                               self.include_privacy, {"n_runs": self.n_runs, "n_models": len(models), "seed": self.seed})

    @staticmethod
    def _gaps(mean: dict[str, float], gold: dict[str, float], task: Task) -> dict[str, float]:
        # Avg.Gap as evaluate() defines it: over the protocol's registered metrics that count in the task's gap
        return gap_metrics(mean, gold, gap_names_for(task, [k for k in mean if k in METRICS]))


def _per_model_seconds(seconds: float | Sequence[float] | None, n_models: int) -> list[dict[str, float]]:
    """``[{"seconds": s}]`` per model (``[{}] * n`` without times); one number per model, each finite and >= 0."""
    if seconds is None:
        return [{} for _ in range(n_models)]
    values = [float(s) for s in (seconds if isinstance(seconds, (list, tuple, np.ndarray)) else [seconds])]
    if len(values) != n_models or not all(np.isfinite(v) and v >= 0 for v in values):
        raise InvalidConfigError(f"unlearn_seconds: one finite time >= 0 per model ({n_models}), got {values}")
    return [{"seconds": v} for v in values]


__all__ = ["UnlearningBenchmark", "check_same_architecture", "mean_std"]
