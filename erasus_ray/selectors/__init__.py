"""Coreset selectors. ``SELECTORS`` maps registry names to classes; ``get_selector`` builds one by name."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from erasus_ray.selectors.base import SELECTORS, Coreset, ScoreSelector, Selector, SharedState, resolve_budget
from erasus_ray.selectors.contextual_diversity import ContextualDiversitySelector
from erasus_ray.selectors.craig import CraigSelector
from erasus_ray.selectors.el2n import EL2NSelector
from erasus_ray.selectors.farthest_first import FarthestFirstSelector
from erasus_ray.selectors.glister import GlisterSelector
from erasus_ray.selectors.gradient_norm import GradientNormSelector, per_sample_grad_norms, trainable_params
from erasus_ray.selectors.gradmatch import GradMatchSelector
from erasus_ray.selectors.herding import HerdingSelector
from erasus_ray.selectors.influence import CGSettings, DenseSettings, InfluenceSelector, KFACSettings, LissaSettings
from erasus_ray.selectors.k_center import KCenterSelector
from erasus_ray.selectors.kmeans_pp import KMeansPPSelector
from erasus_ray.selectors.random_subset import FullSelector, RandomSelector
from erasus_ray.selectors.representer import RepresenterSelector
from erasus_ray.selectors.submodular import SubmodularSelector
from erasus_ray.selectors.tracin import TracInSelector

# Every public module of this package registers itself on import: a new algorithm is a new file, no edit here.
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")


def get_selector(selector: Selector | str | None, **kwargs: Any) -> Selector:
    """An instance from a name (``None`` means ``"full"``) or pass an instance through."""
    if isinstance(selector, Selector):
        return selector
    return SELECTORS.create("full" if selector is None else selector, **kwargs)


__all__ = [
    "SELECTORS",
    "Coreset",
    "EL2NSelector",
    "FullSelector",
    "GradientNormSelector",
    "RandomSelector",
    "ScoreSelector",
    "SharedState",
    "Selector",
    "get_selector",
    "per_sample_grad_norms",
    "resolve_budget",
    "trainable_params",
]
