"""The family matrix: tiny, seeded, quickly trained models of each task family, with forget / retain / test sets.

A family is built by a registered builder (``@register_family(name, cheap=...)``), once per process
(:func:`build_family` caches it): a model trained for about a second on data generated here or shipped in a package,
its task adapter, and id datasets where the forget samples were part of training, so an unlearning effect can be
measured. ``cheap`` families (a few ms per step) are the ones a default test suite runs every algorithm on.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from erasus_ray.data import IdDataset, as_id_dataset
from erasus_ray.registry import Registry
from erasus_ray.tasks import Task
from erasus_ray.training import TrainRecipe, train_model


@dataclass
class Family:
    """One model family of the matrix.

    Attributes:
        name: the registered name.
        model: the trained model (checks clone it before changing it).
        task: its task adapter.
        forget, retain: id datasets; both were trained on.
        test: samples never trained on.
        model_factory: builds the same architecture, untrained (for ``retrain``-like algorithms).
        recipe: how ``model`` was trained.
        cheap: whether a default test suite runs every algorithm on it.
        unlearn_kwargs: runner settings a check uses with it (learning rate, batch size).
    """

    name: str
    model: nn.Module
    task: Task
    forget: IdDataset
    retain: IdDataset
    test: IdDataset
    model_factory: Callable[[], nn.Module]
    recipe: TrainRecipe
    cheap: bool = True
    unlearn_kwargs: dict[str, Any] = field(default_factory=dict)


Builder = Callable[[], Family]

#: name -> builder of a :class:`Family`.
FAMILIES: Registry[Any] = Registry("family")
_CHEAP: dict[str, bool] = {}


def register_family(name: str, *, cheap: bool) -> Callable[[Builder], Builder]:
    """Function decorator: register a family builder under ``name``; ``cheap`` puts it in the default matrix."""

    def decorator(fn: Builder) -> Builder:
        _CHEAP[name] = cheap
        return FAMILIES.register(name)(fn)  # type: ignore[arg-type,return-value]

    return decorator


def family_names(*, cheap: bool | None = None) -> list[str]:
    """Registered family names, optionally only the cheap (``True``) or the slow (``False``) ones."""
    return [n for n in FAMILIES.names() if cheap is None or _CHEAP[n] == cheap]


@functools.lru_cache(maxsize=None)
def build_family(name: str) -> Family:
    """The family ``name``, built and trained once per process (later calls return the same object: do not
    modify its model in place)."""
    return FAMILIES.get(name)()


def trained_family(name: str, factory: Callable[[], nn.Module], task: Task, data: Any, recipe: TrainRecipe, *,
                   n_forget: int, n_test: int, cheap: bool, **unlearn_kwargs: Any) -> Family:
    """Split ``data`` (seeded by ``recipe.seed``) into test / forget / retain, train ``factory()`` on forget + retain
    with ``recipe`` and wrap it all as a :class:`Family`. Cost: the training run."""
    full = as_id_dataset(data)
    order = np.random.default_rng(recipe.seed).permutation(full.ids)
    test_ids, forget_ids = np.sort(order[:n_test]), np.sort(order[n_test:n_test + n_forget])
    train = full.exclude(test_ids)
    torch.manual_seed(recipe.seed)
    model = train_model(factory(), train, task, recipe)
    return Family(name, model, task, full.subset(forget_ids), train.exclude(forget_ids), full.subset(test_ids),
                  factory, recipe, cheap, unlearn_kwargs)


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 8x8 digits: ``(x [n, 64] float32 in [0, 1], y [n] int64)`` (ships with the package)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)


def seeded(factory: Callable[[], nn.Module], seed: int = 0) -> Callable[[], nn.Module]:
    """``factory`` with its initialisation seeded (the same untrained model on every call)."""

    def build() -> nn.Module:
        torch.manual_seed(seed)
        return factory()

    return build
