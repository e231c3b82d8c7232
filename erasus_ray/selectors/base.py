"""The selector contract: choose a coreset of forget ids.

Every selector works on the forget set rebuilt as an :class:`~erasus_ray.data.IdDataset` sorted by id, scores or
picks samples, and returns a :class:`Coreset` of *dataset ids* - never loader positions - so the result does not
depend on how the user's loader orders or shuffles the data. Ties are broken by id.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch
from torch import nn

from erasus_ray.checks import check_int, check_real
from erasus_ray.data import IdDataset, as_id_dataset, make_loader
from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.registry import Registry
from erasus_ray.tasks import Capability, Task, capability_set, get_task, require, require_one_of
from erasus_ray.utils import model_device

SELECTORS: Registry["Selector"] = Registry("selector")


@dataclass
class Coreset:
    """A chosen subset of the forget set.

    Attributes:
        ids: chosen forget ids (int64), in selection order.
        weights: one weight per chosen id: how many forget samples it stands for (``n / k`` unless the selector
            computes its own, e.g. cluster sizes). Strategies use them normalised to mean 1.
        scores: every forget id's score, or None for selectors without scores.
        selector: the selector's registry name.
        info: anything the selector wants to report (e.g. a fallback it took).
    """

    ids: np.ndarray
    weights: np.ndarray
    scores: dict[int, float] | None = None
    selector: str = "full"
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(len(self.ids))

    def __iter__(self) -> Iterator[int]:
        """The chosen ids, in selection order (the seed's ``select_coreset`` returned the indices themselves)."""
        return (int(i) for i in self.ids)

    def __getitem__(self, position: int | slice) -> int | list[int]:
        """The ``position``-th chosen id (a slice: a list of ids)."""
        if isinstance(position, slice):
            return [int(i) for i in self.ids[position]]
        return int(self.ids[position])

    def weight_map(self) -> dict[int, float]:
        w = np.asarray(self.weights, dtype=np.float64)
        w = w / w.mean() if len(w) and w.mean() > 0 else np.ones_like(w)
        return {int(i): float(x) for i, x in zip(self.ids, w)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "selector": self.selector,
            "size": len(self),
            "ids": [int(i) for i in self.ids],
            "weights": [float(w) for w in self.weights],
            "scores": None if self.scores is None else {str(k): float(v) for k, v in self.scores.items()},
            "info": self.info,
        }

    @classmethod
    def full(cls, forget: IdDataset) -> "Coreset":
        ids = np.sort(forget.ids)
        return cls(ids=ids, weights=np.ones(len(ids)), scores=None, selector="full")


def resolve_budget(n: int, k: int | None = None, fraction: float | None = None) -> int:
    """Number of samples to select from ``n``: ``k``, or ``ceil(fraction * n)`` (at least 1), or all ``n``."""
    if k is not None and fraction is not None:
        raise InvalidConfigError("pass k or fraction, not both")
    if k is not None:
        check_int("k", k, low=1)
        if k > n:
            raise InvalidConfigError(f"k={k} is larger than the forget set ({n} samples)")
        return int(k)
    if fraction is not None:
        frac = check_real("fraction", fraction, low=0.0, high=1.0, low_open=True)
        return max(1, min(n, math.ceil(frac * n - 1e-9)))
    return n


class Selector:
    """Base class. Subclasses implement :meth:`_select` (or :meth:`score`, via :class:`ScoreSelector`).

    The constructor only stores parameters; all work happens in :meth:`select`.
    """

    name: ClassVar[str] = "selector"
    #: True when the selector only needs forward passes (no gradients).
    forward_only: ClassVar[bool] = True
    #: How a sharded (Ray) run merges shards: ``"scores"`` (score every shard, global top-k: identical to one
    #: process), ``"greedi"`` (local selection per shard, then the selector again over the union: GreeDi,
    #: Mirzasoleiman et al. 2013), ``"central"`` (cheap or model-free: run in the driver).
    distributed_merge: ClassVar[str] = "greedi"
    #: For ``distributed_merge = "central"``: why the selector runs once in the driver instead of per shard (what
    #: it needs that a shard does not have). The scoring pool reports it in ``Coreset.info["distributed"]``.
    central_reason: ClassVar[str] = ""
    #: Whether a larger (``"max"``) or smaller (``"min"``) :meth:`set_objective` is better; None: no set objective.
    objective_sense: ClassVar[str | None] = None
    #: The task capabilities this selector reads (:class:`~erasus_ray.tasks.Capability`; ``loss`` is always
    #: included). Parsed at class definition (a misspelt name fails at import) and checked at the start of
    #: :meth:`select` (:meth:`check_task`), before any forward pass.
    requires: ClassVar[frozenset[Capability]] = frozenset({Capability.LOSS})
    #: At least one of these must be provided too (empty: no constraint), e.g. a preference objective's responses are
    #: answer tokens (``tokens``) or class labels (``labels``). Checked with ``requires`` by :meth:`check_task`.
    requires_one_of: ClassVar[frozenset[Capability]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.requires = capability_set(cls.requires, f"selector {cls.__name__}.requires") | {Capability.LOSS}
        cls.requires_one_of = capability_set(cls.requires_one_of, f"selector {cls.__name__}.requires_one_of")

    def __init__(self, batch_size: int = 128) -> None:
        self.batch_size = int(batch_size)

    def requirements(self) -> frozenset[Capability]:
        """What this configured instance reads: the class's ``requires``, refined where a parameter changes it (an
        ``embedding="gradient"`` geometry selector also reads logits)."""
        return type(self).requires

    def check_task(self, task: Task) -> None:
        """Raise :class:`~erasus_ray.tasks.CapabilityError` naming this selector, the task and what is missing
        unless ``task`` provides :meth:`requirements`. Cost: a set difference."""
        require(task, self.requirements(), algorithm=f"selector {self.name!r}")
        require_one_of(task, self.requires_one_of, algorithm=f"selector {self.name!r}")

    def set_objective(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, **context: Any) -> Callable[[np.ndarray], float]:
        """``f(ids)``: the selector's objective of a candidate coreset (dataset ids of ``forget``) evaluated on the
        whole ``forget`` set (e.g. facility location over every forget sample, or the k-center radius), built once
        (one embedding pass). GreeDi uses it to return the better of its merged and local solutions; selectors
        with ``objective_sense = None`` do not define it."""
        raise NotImplementedError(f"{self.name} defines no set objective")

    def select(
        self,
        model: nn.Module,
        forget_data: Any,
        *,
        task: Task | str = "auto",
        k: int | None = None,
        fraction: float | None = None,
        seed: int = 0,
        **context: Any,
    ) -> Coreset:
        """Choose ``k`` (or ``fraction`` of the) forget samples. Returns a :class:`Coreset` of dataset ids."""
        forget = as_id_dataset(forget_data).sorted()
        if len(forget) == 0:
            raise InvalidDataError("the forget set is empty: nothing to select")
        budget = resolve_budget(len(forget), k, fraction)
        task = get_task(task, model)
        self.check_task(task)
        was_training = model.training
        model.eval()
        try:
            coreset = self._select(model, forget, task, budget, int(seed), **context)
        finally:
            model.train(was_training)
        coreset.selector = self.name
        return coreset

    def _select(self, model: nn.Module, forget: IdDataset, task: Task, budget: int, seed: int, **context: Any) -> Coreset:
        raise NotImplementedError

    def loader(self, forget: IdDataset, task: Task):
        return make_loader(forget, task.collate, batch_size=self.batch_size, shuffle=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


@dataclass
class SharedState:
    """Set-level statistics a score selector computes once over the *whole* forget set (and retain data) - an
    inverse-Hessian factorisation, the mean forget gradient - and every shard then reuses, so that scores computed
    on shards equal the single-process ones. ``value`` is the selector's own object (it must pickle: the Ray pool
    ships it to the scoring actors once, through the object store); ``info`` goes into ``coreset.info``."""

    value: Any = None
    info: dict[str, Any] = field(default_factory=dict)


class ScoreSelector(Selector):
    """A selector that scores every forget sample and keeps the top ``budget`` (ties broken by smaller id).

    ``order="high"`` keeps the highest scores, ``"low"`` the lowest.

    Scores that depend on the whole set (a Hessian, a set-level target) come from :meth:`shared_state`, computed
    once before scoring - by :meth:`select` in one process, or on the driver by the Ray pool, which passes it to
    every shard's :meth:`score` as ``shared=``. Per-sample scores that depend only on the sample need neither.
    """

    default_order: ClassVar[str] = "high"
    distributed_merge: ClassVar[str] = "scores"

    def __init__(self, batch_size: int = 128, order: str | None = None) -> None:
        super().__init__(batch_size=batch_size)
        order = order or self.default_order
        if order not in ("high", "low"):
            raise InvalidConfigError(f"order must be 'high' or 'low', got {order!r}")
        self.order = order

    def score(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, **context: Any) -> np.ndarray:
        """One score per row of ``forget`` (which is sorted by id). Receives ``shared=`` (a :class:`SharedState`)
        when :meth:`shared_state` returns one."""
        raise NotImplementedError

    def shared_state(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, **context: Any) -> SharedState | None:
        """Set-level state over the whole ``forget`` set that every shard's :meth:`score` must share (default: none)."""
        return None

    def _select(self, model: nn.Module, forget: IdDataset, task: Task, budget: int, seed: int, **context: Any) -> Coreset:
        state = self.shared_state(model, forget, task, seed, **context)
        extra = {} if state is None else {"shared": state}
        coreset = self.coreset_from_scores(forget.ids, self.score(model, forget, task, seed, **extra, **context), budget)
        if state is not None:
            coreset.info.update(state.info)
        return coreset

    def coreset_from_scores(self, ids: np.ndarray, scores: np.ndarray, budget: int) -> Coreset:
        """The top ``budget`` ids by score (ties: smaller id first). Also merges shards scored in parallel."""
        ids = np.asarray(ids, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != ids.shape:
            raise RuntimeError(f"{self.name} returned {scores.shape} scores for {len(ids)} samples")
        if not np.all(np.isfinite(scores)):
            raise InvalidDataError(f"{self.name} produced non-finite scores for ids {ids[~np.isfinite(scores)][:10].tolist()}")
        key = -scores if self.order == "high" else scores
        order = np.lexsort((ids, key))[:budget]
        info: dict[str, Any] = {"order": self.order}
        if len(scores) > 1 and float(np.ptp(scores)) == 0.0:
            # every sample scored the same: the "top" ids are the smallest ids, a choice that carries no information
            why = (f"selector {self.name!r} scored every one of the {len(scores)} forget samples {scores[0]:.6g}: the "
                   "coreset is the smallest ids, not the most informative ones")
            warnings.warn(why, RuntimeWarning, stacklevel=3)
            info["uninformative_scores"] = why
        return Coreset(
            ids=ids[order].copy(),
            weights=np.full(budget, len(ids) / budget),
            scores={int(i): float(s) for i, s in zip(ids, scores)},
            info=info,
        )

    @torch.no_grad()
    def forward_scores(self, model: nn.Module, forget: IdDataset, task: Task, fn) -> np.ndarray:
        """Apply ``fn(TaskOutput) -> [B]`` over the forget set in batches (no gradients)."""
        device = model_device(model)
        out = [fn(task.forward(model, b.to(device).data)).float().cpu() for b in self.loader(forget, task)]
        return torch.cat(out).numpy()
