"""Evaluation against the retrained (gold) model.

``evaluate(model, forget=, retain=, test=, task=, gold=, metrics=None)`` runs the task's default metric suite (its
``default_metrics``, or every registered metric it can run) or the given metric names, and, given the gold model (or
its metrics), the per-metric absolute gaps and their mean, ``avg_gap`` (the Avg.Gap of Fan et al. 2024 / Jia et al.
2023). Metrics register themselves (:mod:`erasus_ray.evaluation.metrics`); accuracies, probabilities and attack
scores are fractions in [0, 1] and tables print points (x100).
"""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from erasus_ray.data import as_id_dataset

# the built-in metrics register themselves on import
from erasus_ray.evaluation import loss_metrics as _loss_metrics  # noqa: F401
from erasus_ray.evaluation import classification as _classification  # noqa: F401
from erasus_ray.evaluation import lm as _lm  # noqa: F401
from erasus_ray.evaluation import diffusion as _diffusion  # noqa: F401
from erasus_ray.evaluation import privacy as _privacy  # noqa: F401
from erasus_ray.evaluation import lira as _lira  # noqa: F401
from erasus_ray.evaluation import cost as _cost  # noqa: F401
from erasus_ray.evaluation import retrieval as _retrieval  # noqa: F401
from erasus_ray.evaluation import asr as _asr  # noqa: F401
from erasus_ray.evaluation.classification import evaluate_classification
from erasus_ray.evaluation.metrics import (
    METRICS,
    EvalContext,
    Metric,
    MetricOptions,
    display_names_for,
    display_names_for_row,
    gap_metrics,
    gap_names_for,
    metric_names_for,
    register_column,
    register_metric,
    register_split_metric,
    run_metrics,
)
from erasus_ray.tasks import Task, get_task


def evaluate(
    model: nn.Module,
    *,
    forget: Any,
    retain: Any,
    test: Any,
    task: Task | str = "auto",
    gold: nn.Module | None = None,
    gold_metrics: dict[str, float] | None = None,
    metrics: Iterable[str] | None = None,
    seed: int = 0,
    **options: Any,
) -> dict[str, float]:
    """Metrics of ``model`` and, with ``gold`` (or precomputed ``gold_metrics``), its gaps to the retrained model.

    ``metrics``: registered metric names to run (default: the task's suite, :func:`metric_names_for`); a named
    metric the task cannot run raises :class:`~erasus_ray.tasks.CapabilityError`. ``options``: the fields of
    :class:`MetricOptions` (``batch_size``, ``max_new_tokens``, ``mink_k``, ``eos_token_id``).
    Returns a flat dict: the metrics, ``gold_<k>`` and ``gap_<k>`` per gap metric (:func:`gap_names_for`),
    ``avg_gap`` and ``seed``. Cost: one forward pass per split per model (see :func:`run_metrics`).
    """
    task = get_task(task, model)
    names = metric_names_for(task) if metrics is None else tuple(metrics)
    keys = gap_names_for(task, names)
    data = {"forget": as_id_dataset(forget), "retain": as_id_dataset(retain), "test": as_id_dataset(test)}
    result = run_metrics(model, task, data, names, seed=seed, **options)
    if gold is not None and gold_metrics is None:
        gold_metrics = run_metrics(gold, task, data, names, seed=seed, **options)
    if gold_metrics is not None:
        result.update({f"gold_{k}": gold_metrics[k] for k in keys if k in gold_metrics})
        result.update(gap_metrics(result, gold_metrics, keys))
    result["seed"] = seed
    return result


__all__ = [
    "METRICS",
    "EvalContext",
    "Metric",
    "MetricOptions",
    "display_names_for",
    "display_names_for_row",
    "evaluate",
    "evaluate_classification",
    "gap_metrics",
    "gap_names_for",
    "metric_names_for",
    "register_column",
    "register_metric",
    "register_split_metric",
    "run_metrics",
]

# protocol metrics (TOFU) register last: their modules build on the metrics above
from erasus_ray.evaluation import protocols as _protocols  # noqa: E402,F401
