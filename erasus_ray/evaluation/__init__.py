"""Evaluation against the retrained (gold) model.

``evaluate(model, forget=, retain=, test=, task=, gold=)`` runs the metric suite of the task (classification or
causal LM) and, given the gold model (or its metrics), the per-metric absolute gaps and their mean, ``avg_gap``
(the Avg.Gap of Fan et al. 2024 / Jia et al. 2023). Metrics are fractions in [0, 1]; tables print points (x100).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from erasus_ray.data import as_id_dataset
from erasus_ray.evaluation.classification import GAP_KEYS as CLASSIFICATION_GAP_KEYS
from erasus_ray.evaluation.classification import evaluate_classification
from erasus_ray.tasks import Task, get_task


def _evaluate_lm(*args: Any, **kwargs: Any) -> dict[str, float]:
    from erasus_ray.evaluation.lm import evaluate_lm

    return evaluate_lm(*args, **kwargs)


@dataclass(frozen=True)
class Suite:
    """A task's metric suite: the function, the metrics whose gaps to gold make up Avg.Gap, and what tables show."""

    run: Callable[..., dict[str, float]]
    gap_keys: tuple[str, ...]
    display_keys: tuple[str, ...]


#: task name -> metric suite. A new adapter registers its suite here.
SUITES: dict[str, Suite] = {
    "classification": Suite(
        evaluate_classification,
        CLASSIFICATION_GAP_KEYS,
        ("forget_acc", "retain_acc", "test_acc", "mia_svc_efficacy", "mia_loss_auc"),
    ),
    "causal_lm": Suite(
        _evaluate_lm,
        ("forget_rougeL", "retain_rougeL", "forget_prob", "retain_prob", "mia_mink_auc"),
        ("forget_rougeL", "retain_rougeL", "test_rougeL", "forget_loss", "retain_loss", "test_loss", "mia_mink_auc"),
    ),
}


def gap_metrics(metrics: dict[str, float], gold: dict[str, float], keys: tuple[str, ...]) -> dict[str, float]:
    """``gap_<k> = |metrics[k] - gold[k]|`` for each key present in both, and ``avg_gap`` their mean."""
    gaps = {
        f"gap_{k}": abs(metrics[k] - gold[k])
        for k in keys
        if k in metrics and k in gold and not (math.isnan(metrics[k]) or math.isnan(gold[k]))
    }
    gaps["avg_gap"] = sum(gaps.values()) / len(gaps) if gaps else float("nan")
    return gaps


def evaluate(
    model: nn.Module,
    *,
    forget: Any,
    retain: Any,
    test: Any,
    task: Task | str = "auto",
    gold: nn.Module | None = None,
    gold_metrics: dict[str, float] | None = None,
    seed: int = 0,
    **options: Any,
) -> dict[str, float]:
    """Metrics of ``model`` and, with ``gold`` (or precomputed ``gold_metrics``), its gaps to the retrained model.

    Returns a flat dict: the suite's metrics, ``gold_<k>`` and ``gap_<k>`` per gap metric, ``avg_gap`` and ``seed``.
    """
    task = get_task(task, model)
    if task.name not in SUITES:
        raise KeyError(f"no metric suite for task {task.name!r}; known: {sorted(SUITES)}")
    suite = SUITES[task.name]
    keys = suite.gap_keys
    data = {"forget": as_id_dataset(forget), "retain": as_id_dataset(retain), "test": as_id_dataset(test)}
    metrics = suite.run(model, task, seed=seed, **data, **options)
    if gold is not None and gold_metrics is None:
        gold_metrics = suite.run(gold, task, seed=seed, **data, **options)
    if gold_metrics is not None:
        metrics.update({f"gold_{k}": gold_metrics[k] for k in keys if k in gold_metrics})
        metrics.update(gap_metrics(metrics, gold_metrics, keys))
    metrics["seed"] = seed
    return metrics


__all__ = ["SUITES", "Suite", "evaluate", "evaluate_classification", "gap_metrics"]
