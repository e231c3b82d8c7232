"""Composable primitives for users with their own training loop (the seed's ``erasus.fabric``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from erasus_ray.data import as_id_dataset
from erasus_ray.evaluation import evaluate, gap_metrics, gap_names_for, metric_names_for, run_metrics
from erasus_ray.selectors import Coreset, get_selector
from erasus_ray.tasks import Task, get_task
from erasus_ray.unlearner import ErasusUnlearner, UnlearningResult


def select_coreset(
    name: str,
    model: nn.Module,
    data: Any,
    *,
    k: int | None = None,
    fraction: float | None = None,
    task: Task | str = "auto",
    seed: int = 0,
    retain: Any = None,
    **selector_kwargs: Any,
) -> Coreset:
    """Select ``k`` (or ``fraction`` of) samples of ``data`` with selector ``name``; returns dataset ids.

    ``retain`` is passed to selectors that use it (e.g. ``glister``'s default validation set, influence Hessians).
    """
    context = {} if retain is None else {"retain": as_id_dataset(retain)}
    return get_selector(name, **selector_kwargs).select(
        model, data, task=get_task(task, model), k=k, fraction=fraction, seed=seed, **context
    )


def unlearn(
    name: str,
    model: nn.Module,
    forget: Any,
    retain: Any = None,
    *,
    task: Task | str = "auto",
    seed: int = 0,
    inplace: bool = True,
    **kwargs: Any,
) -> UnlearningResult:
    """Run strategy ``name`` on all of ``forget`` (no selection), in place by default.

    ``kwargs`` are :class:`ErasusUnlearner` arguments (``lr``, ``epochs``, ...) and strategy hyperparameters.
    """
    return ErasusUnlearner(model, strategy=name, selector=None, fraction=None, task=task, seed=seed, inplace=inplace, **kwargs).fit(
        forget_data=forget, retain_data=retain
    )


def apply_gradient_ascent(model: nn.Module, forget: Any, *, lr: float = 1e-4, epochs: int = 3, **kwargs: Any) -> UnlearningResult:
    """The seed's primitive: gradient ascent on ``forget``, in place."""
    return unlearn("gradient_ascent", model, forget, lr=lr, epochs=epochs, **kwargs)


def compute_forgetting_quality(
    model: nn.Module,
    forget: Any,
    retain: Any = None,
    test: Any = None,
    *,
    task: Task | str = "auto",
    gold: nn.Module | None = None,
    seed: int = 0,
    **options: Any,
) -> dict[str, float]:
    """The seed's ``compute_forgetting_quality``, onto our evaluation: the task's metric suite
    (:func:`~erasus_ray.evaluation.metric_names_for`) on the splits given - for a classifier ``forget_acc`` /
    ``forget_loss`` from ``forget`` alone, ``retain_*`` and ``test_*`` with those sets, the membership-inference
    scores (``mia_loss_auc``, ``mia_svc_efficacy``: can an attacker still tell forget samples from unseen ones) with
    ``test``; for a causal LM the forget/retain loss, probability, ROUGE-L and Min-K% MIA. Lower forget accuracy /
    probability and an MIA AUC near 0.5 mean more forgotten. With ``gold`` (a model retrained without the forget set)
    also ``gold_<m>``, ``gap_<m>`` and ``avg_gap`` (the Avg.Gap of Fan et al. 2024: the closer to 0, the closer to
    retraining). Returns fractions in [0, 1] (losses as they are). Cost: one no-grad forward pass per split per model.
    """
    task = get_task(task, model)
    splits = {name: None if data is None else as_id_dataset(data)
              for name, data in (("forget", forget), ("retain", retain), ("test", test))}
    names = metric_names_for(task)
    result = run_metrics(model, task, splits, names, seed=seed, **options)
    if gold is not None:
        reference = run_metrics(gold, task, splits, names, seed=seed, **options)
        keys = gap_names_for(task, names)
        result.update({f"gold_{k}": reference[k] for k in keys if k in reference})
        result.update(gap_metrics(result, reference, keys))
    return result


__all__ = ["apply_gradient_ascent", "compute_forgetting_quality", "evaluate", "select_coreset", "unlearn"]
