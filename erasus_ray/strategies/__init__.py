"""Unlearning strategies. ``STRATEGIES`` maps registry names to classes; ``get_strategy`` builds one by name."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from erasus_ray.errors import InvalidConfigError
from erasus_ray.strategies.base import STRATEGIES, Strategy, UnlearnContext, weighted_mean
from erasus_ray.strategies.fine_tune import FineTune
from erasus_ray.strategies.grad_diff import GradDiff
from erasus_ray.strategies.gradient_ascent import GradientAscent
from erasus_ray.strategies.npo import NPO, npo_loss
from erasus_ray.strategies.retrain import Retrain
from erasus_ray.strategies.negative_gradient import NegativeGradient
from erasus_ray.strategies.neggrad_plus import NegGradPlus
from erasus_ray.strategies.random_label import RandomLabel
from erasus_ray.strategies.rmu import RMU
from erasus_ray.strategies.simnpo import SimNPO, simnpo_loss
from erasus_ray.strategies.wga import WGA
from erasus_ray.strategies.fisher_forgetting import FisherForgetting
from erasus_ray.strategies.knowledge_distillation import KnowledgeDistillation
from erasus_ray.strategies.l1_sparse import L1Sparse
from erasus_ray.strategies.saliency_unlearning import SaliencyUnlearning
from erasus_ray.strategies.scrub import SCRUB
from erasus_ray.strategies.ssd import SSD

# Every public module of this package registers itself on import: a new algorithm is a new file, no edit here.
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")


def get_strategy(strategy: Strategy | str, **kwargs: Any) -> Strategy:
    """An instance from a registry name, or pass an instance through."""
    if isinstance(strategy, Strategy):
        if kwargs:
            raise InvalidConfigError(
                f"hyperparameters {sorted(kwargs)} go to the strategy's constructor when passing an instance"
            )
        return strategy
    return STRATEGIES.create(strategy, **kwargs)


__all__ = [
    "STRATEGIES",
    "FineTune",
    "FisherForgetting",
    "GradDiff",
    "GradientAscent",
    "KnowledgeDistillation",
    "L1Sparse",
    "NPO",
    "Retrain",
    "SCRUB",
    "SSD",
    "SaliencyUnlearning",
    "Strategy",
    "UnlearnContext",
    "get_strategy",
    "npo_loss",
    "weighted_mean",
]
