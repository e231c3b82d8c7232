"""Composable primitives for users with their own training loop (the seed's ``erasus.fabric``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from erasus_ray.data import as_id_dataset
from erasus_ray.evaluation import evaluate
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


__all__ = ["apply_gradient_ascent", "evaluate", "select_coreset", "unlearn"]
