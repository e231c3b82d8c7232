"""Members of the ensemble selectors (voting, weighted fusion, auto): building them and turning each member's
coreset into a full preference over the forget ids."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from torch import nn

from erasus_ray.data import IdDataset
from erasus_ray.errors import InvalidConfigError
from erasus_ray.selectors.base import SELECTORS, Coreset, Selector
from erasus_ray.tasks import Capability
from erasus_ray.tasks import Task

MemberSpec = Any  # a registry name, (name, kwargs), {"name": ..., **kwargs} or a Selector


def build_member(spec: MemberSpec, owner: str) -> Selector:
    """A selector from a name, ``(name, kwargs)``, ``{"name": name, **kwargs}`` or an instance."""
    if isinstance(spec, Selector):
        return spec
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, Mapping) and "name" in spec:
        name, kwargs = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    elif isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping):
        name, kwargs = spec[0], dict(spec[1])
    else:
        raise InvalidConfigError(
            f"{owner}: each entry of selectors must be a name, (name, kwargs), {{'name': ..., **kwargs}} or a Selector; got {spec!r}"
        )
    if name == owner:
        raise InvalidConfigError(f"{owner} cannot contain itself")
    return SELECTORS.create(name, **kwargs)


def build_members(specs: Sequence[MemberSpec] | None, owner: str, minimum: int = 1) -> list[Selector]:
    if specs is None or isinstance(specs, (str, Selector)) or len(specs) < minimum:
        raise InvalidConfigError(f"{owner}: selectors must be a list of at least {minimum} selectors, got {specs!r}")
    return [build_member(s, owner) for s in specs]


def run_member(member: Selector, model: nn.Module, forget: IdDataset, task: Task, budget: int, seed: int, context: dict[str, Any]) -> Coreset:
    return member.select(model, forget, task=task, k=budget, seed=seed, **context)


def has_full_scores(coreset: Coreset, ids: np.ndarray) -> bool:
    return coreset.scores is not None and all(int(i) in coreset.scores for i in ids)


def oriented_scores(coreset: Coreset, ids: np.ndarray) -> np.ndarray:
    """Scores over ``ids`` oriented so that larger is preferred (negated when the member keeps the lowest)."""
    s = np.array([coreset.scores[int(i)] for i in ids], dtype=np.float64)  # type: ignore[index]
    return -s if coreset.info.get("order") == "low" else s


def borda_points(coreset: Coreset, ids: np.ndarray) -> np.ndarray:
    """``[n]`` Borda points (``n - 1`` for the member's first choice down to 0) over ``ids``.

    With scores for every id the member's full ranking is used (ties: smaller id first). Otherwise its chosen ids
    get points by pick order and the unchosen ones share the remaining points equally (their average)."""
    n = len(ids)
    points = np.zeros(n)
    if has_full_scores(coreset, ids):
        ranking = np.lexsort((ids, -oriented_scores(coreset, ids)))
        points[ranking] = np.arange(n - 1, -1, -1, dtype=np.float64)
        return points
    row_of = {int(i): r for r, i in enumerate(ids)}
    chosen = [row_of[int(i)] for i in coreset.ids]
    points[chosen] = n - 1 - np.arange(len(chosen), dtype=np.float64)
    rest = np.setdiff1d(np.arange(n), chosen)
    if len(rest):
        points[rest] = (n - 1 - len(chosen)) / 2.0  # mean of the points 0 .. n-1-len(chosen)
    return points


def minmax(x: np.ndarray) -> np.ndarray:
    span = float(x.max() - x.min()) if len(x) else 0.0
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def check_weights(weights: Sequence[float] | None, n: int, owner: str) -> list[float]:
    """One non-negative, finite weight per member (default: all 1)."""
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise InvalidConfigError(f"{owner}: weights has {len(w)} entries for {n} selectors")
    if any(not np.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise InvalidConfigError(f"{owner}: weights must be finite, >= 0 and not all 0, got {list(weights)!r}")
    return w


class EnsembleSelector(Selector):
    """Base of the selectors that combine member selectors (``voting``, ``weighted_fusion``): builds the members
    and checks their weights; subclasses set ``default_members`` and combine in ``_select``."""

    #: Members run over the whole forget set: run centrally.
    distributed_merge = "central"
    central_reason = "combines its members' rankings / normalised scores, which need every forget id at once"
    default_members: tuple[str, ...] = ("el2n", "active_learning")

    def __init__(
        self,
        batch_size: int = 128,
        selectors: Sequence[MemberSpec] | None = None,
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size)
        selectors = self.default_members if selectors is None else selectors
        self.selectors = list(selectors) if not isinstance(selectors, str) else selectors
        self.members = build_members(self.selectors, self.name)
        self.weights = check_weights(weights, len(self.members), self.name)

    def requirements(self) -> frozenset[Capability]:
        """The union of its members' requirements: it runs every member."""
        return type(self).requires.union(*(m.requirements() for m in self.members))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(selectors={self.selectors!r}, weights={self.weights!r})"
