"""A Ray actor pool that shards the forget set for coreset selection.

Each actor receives the model once (through the object store) and a shard of forget ids, and returns either
per-id scores (score selectors: the driver takes the global top-k, identical to a single-process run) or a
local coreset (greedy/geometric selectors: the two-round GreeDi scheme of Mirzasoleiman et al., NeurIPS 2013,
"Distributed Submodular Maximization" - local greedy per shard, greedy again over the union, and the better of
that merged solution and the best local one, evaluated on the whole forget set). Pool size, resources and restart
policy come from ``actors/scoring.yaml``.

Scores that depend on set-level statistics (influence's Hessian and set targets, TracIn's mean forget gradient)
are computed once on the driver over the whole forget set (``ScoreSelector.shared_state``) and shipped to every
actor through the object store, so a sharded run equals one process.

Selectors with ``distributed_merge = "central"`` run once in the driver, on the whole forget set, and say why in
``Coreset.info["distributed"]`` (``Selector.central_reason``):

* ``random``, ``full``: no model pass at all - nothing worth sharding;
* ``forgetting_events``: needs the whole set's training dynamics (given, or a replayed proxy training over
  forget + retain);
* ``grand_ensemble``: trains an ensemble of fresh models on forget + retain before scoring;
* ``valuation_network``: fits one value network on the reference set before scoring;
* ``data_shapley``: a Shapley value depends on every player;
* ``cal``: its neighbour pool is the reference set or, without one, the rest of the whole forget set;
* ``voting``, ``weighted_fusion``: combine rankings / normalised scores that need every id;
* ``auto``: chooses from whole-forget-set statistics, then runs its choice in the driver.

Ray starts in-process on one machine (embedded default) or joins ``RAY_ADDRESS``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.data import Dataset

from erasus_ray.data import IdDataset
from erasus_ray.errors import InvalidConfigError, InvalidDataError, ScoringPoolError
from erasus_ray.selectors.base import Coreset, Selector, SharedState, resolve_budget
from erasus_ray.tasks import Task
from erasus_ray.utils.shipping import shippable, unshipped

#: ``distributed="auto"`` uses the pool when Ray is already initialised or the forget set is at least this large.
#: Measured (benchmarks/selector_scoring, crossover part: MNIST-5k CNN tiled, gradient_norm, 2-core machine): a cold
#: pool (ray.init + 2 actors + one request, ~8 s of fixed cost) is 0.81x in-process speed at 64k samples, 0.97x at
#: 96k and 1.06x at 128k, so it breaks even near 100k. On a running Ray the pool pays off from ~250 samples.
AUTO_THRESHOLD = 100_000
#: GreeDi also runs the selector centrally, to report the centralised objective, up to this many forget samples
#: (the size up to which the geometric selectors hold a dense similarity matrix).
CENTRAL_OBJECTIVE_MAX = 5000
#: When every actor of a request is lost, the pool waits this long for one that Ray restarts (``max_restarts``)
#: before it gives up with :class:`~erasus_ray.errors.ScoringPoolError` (an actor restart on a 2-core machine under
#: load takes ~3-20 s: a new worker process importing torch).
RESTART_WAIT_S = 60.0


def require_ray() -> Any:
    try:
        import ray
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("distributed='ray' needs Ray: pip install 'erasus-ray[ray]'") from err
    return ray


def ensure_ray(num_cpus: int | None = None) -> Any:
    """Initialise Ray if needed: join ``RAY_ADDRESS`` when set, else start a local in-process cluster."""
    ray = require_ray()
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # address="local": our own embedded cluster, never one another process left running on this machine
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024**2)
    return ray


@dataclass
class PoolSpec:
    """Size, resources and fault tolerance of the scoring pool (see ``actors/scoring.yaml``)."""

    num_actors: int = 2
    num_cpus: float = 1
    num_gpus: float = 0
    #: Ray restarts a crashed actor this many times (it then serves later shards and requests).
    max_restarts: int = 1
    #: The pool re-runs a shard whose actor was lost (killed, its node gone) on a surviving or restarted actor up to
    #: this many times. The pool does this itself rather than through Ray's task retries, which wait for the lost
    #: actor to come back (after a node loss: Ray's node health check, then a restart that may find no free CPU).
    max_task_retries: int = 1
    torch_threads: int = 1
    #: glibc only: allocations up to this many MiB come from the actor's heap and freed memory stays in the actor
    #: for the next batch (:func:`erasus_ray.utils.malloc.hold_freed_memory`); None keeps glibc's defaults, which
    #: page-fault every batch's gradient buffers in again (a fresh actor scored 2x slower than the driver here).
    malloc_mmap_threshold_mb: int | None = 512

    def __post_init__(self) -> None:
        if not isinstance(self.num_actors, int) or self.num_actors < 1:
            raise InvalidConfigError(f"num_actors must be a positive integer, got {self.num_actors!r}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise InvalidConfigError("num_cpus and num_gpus must be >= 0")
        m = self.malloc_mmap_threshold_mb
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= 2047):
            raise InvalidConfigError(f"malloc_mmap_threshold_mb must be None or an integer in [0, 2047], got {m!r}")

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "PoolSpec":
        """From ``path``, else ``$ERASUS_RAY_ACTORS/scoring.yaml``, else ``./actors/scoring.yaml``, else defaults."""
        candidates = [Path(path)] if path else []
        if os.environ.get("ERASUS_RAY_ACTORS"):
            candidates.append(Path(os.environ["ERASUS_RAY_ACTORS"]) / "scoring.yaml")
        candidates.append(Path.cwd() / "actors" / "scoring.yaml")
        for candidate in candidates:
            if candidate.exists():
                data = yaml.safe_load(candidate.read_text()) or {}
                known = {f.name for f in fields(cls)}
                unknown = sorted(set(data) - known)
                if unknown:
                    raise InvalidConfigError(f"{candidate}: unknown key(s) {unknown}; known: {sorted(known)}")
                return cls(**data)
            if path and candidate == Path(path):
                raise InvalidConfigError(f"actor spec {path} does not exist")
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SCALARS = (bool, int, float, str, bytes, np.integer, np.floating, np.bool_)


def _flat_row(row: Any) -> tuple[list[Any], Any]:
    """``(leaves, spec)`` of one row; rows that are flat tuples of tensors and scalars (``(x, y)``, the common case)
    skip the pytree walk (~14 us a row) and have ``spec`` = their length."""
    if type(row) is tuple and all(isinstance(v, (torch.Tensor, *_SCALARS)) for v in row):
        return list(row), len(row)
    return tree_flatten(row)


class ColumnRows(Dataset):
    """Rows of the same structure stored column-wise: every tensor leaf stacked into one tensor, other leaves kept
    as lists. Pickles as a few large buffers instead of one object per sample (a 4000-row MNIST shard ships in
    milliseconds instead of about a second). Build with :meth:`from_rows`, which says None when the rows differ in
    structure, or a tensor leaf in shape or dtype."""

    def __init__(self, columns: list[Any], spec: Any, n: int) -> None:
        self.columns, self.spec, self.n = columns, spec, n

    @classmethod
    def from_rows(cls, rows: list[Any]) -> "ColumnRows | None":
        if not rows:
            return None
        flat = [_flat_row(r) for r in rows]  # one pass over the rows
        spec = flat[0][1]
        if any(f[1] != spec for f in flat):
            return None
        columns: list[Any] = []
        for col in zip(*(f[0] for f in flat)):
            first = col[0]
            if isinstance(first, torch.Tensor):
                if not all(isinstance(c, torch.Tensor) and c.shape == first.shape and c.dtype == first.dtype for c in col):
                    return None
                columns.append(torch.stack(col))
            else:
                if any(isinstance(c, torch.Tensor) for c in col):
                    return None
                columns.append(list(col))
        return cls(columns, spec, len(rows))

    def own(self) -> "ColumnRows":
        """Copy the tensors into this process's memory. Tensors unpickled from Ray's object store are views of its
        shared-memory buffers; computing on them measured ~2x slower (MNIST-5k CNN scoring: 3.2 s vs 1.9 s) before
        the actors' malloc thresholds were fixed, which may have been the same page-fault effect
        (:mod:`erasus_ray.utils.malloc`). The copy costs milliseconds, so it stays."""
        self.columns = [c.clone() if isinstance(c, torch.Tensor) else c for c in self.columns]
        return self

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if isinstance(self.spec, int):  # a flat tuple row
            return tuple(c[i] for c in self.columns)
        return tree_unflatten([c[i] for c in self.columns], self.spec)


def _compact(item: Any) -> Any:
    # a row is often a view into the dataset's one big tensor, and pickling a view ships the whole storage
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, item)


def materialise(dataset: IdDataset) -> IdDataset:
    """A self-contained copy holding only these rows (tensors copied out of any shared storage), so a shard ships
    without the whole base dataset; column-wise (:class:`ColumnRows`) where the rows allow it (fixed-shape tensors),
    else a list of rows (e.g. token sequences of different lengths)."""
    base_in = dataset.base
    if isinstance(base_in, ColumnRows):  # a subset of materialised rows: slice the columns
        index = torch.as_tensor(np.asarray(dataset.positions, dtype=np.int64))
        columns = [c[index] if isinstance(c, torch.Tensor) else [c[int(p)] for p in dataset.positions] for c in base_in.columns]
        return IdDataset(ColumnRows(columns, base_in.spec, len(index)), np.arange(len(index)), dataset.ids.copy())
    rows = [base_in[int(p)] for p in dataset.positions]
    base: Any = ColumnRows.from_rows(rows)
    if base is None:
        base = [_compact(r) for r in rows]
    return IdDataset(base, np.arange(len(rows)), dataset.ids.copy())


def own_in_process(value: Any) -> Any:
    """Copy what arrived through the object store into this process's memory: a model's parameters and buffers,
    an IdDataset's column storage (see :meth:`ColumnRows.own`)."""
    if isinstance(value, nn.Module):
        with torch.no_grad():
            for t in list(value.parameters()) + list(value.buffers()):
                t.data = t.data.clone()
    elif isinstance(value, IdDataset) and isinstance(value.base, ColumnRows):
        value.base.own()
    return value


def shard_ids(ids: np.ndarray, num_shards: int) -> list[np.ndarray]:
    """Split sorted ids into at most ``num_shards`` contiguous, non-empty shards."""
    ids = np.sort(np.asarray(ids, dtype=np.int64))
    if len(ids) == 0:
        raise InvalidDataError("the forget set is empty: nothing to shard")
    return [s for s in np.array_split(ids, min(num_shards, len(ids))) if len(s)]


class _ScoringWorker:
    """A long-lived scoring process: receives the model of each request (an object-store reference, fetched once per
    request) and scores or selects on the shards it is given. Its constructor takes no object-store arguments, so a
    restarted actor (``max_restarts``) comes back without depending on objects that may be gone."""

    def __init__(self, task: Task, torch_threads: int = 1, malloc_mmap_threshold_mb: int | None = None) -> None:
        import torch

        from erasus_ray.utils.malloc import hold_freed_memory

        torch.set_num_threads(max(1, int(torch_threads)))
        self.malloc_tuned = hold_freed_memory(malloc_mmap_threshold_mb)
        self.task = task

    def ready(self) -> bool:
        return True

    def malloc_tuned_here(self) -> bool:
        """Whether this actor's glibc thresholds were set (for tests and diagnostics)."""
        return self.malloc_tuned

    @staticmethod
    def _own(model: nn.Module, shard: IdDataset, context: dict[str, Any]) -> tuple[nn.Module, IdDataset, dict[str, Any]]:
        return own_in_process(unshipped(model)).eval(), own_in_process(shard), {k: own_in_process(v) for k, v in context.items()}

    def score(
        self, model: nn.Module, selector: Selector, shard: IdDataset, seed: int, context: dict[str, Any],
        shared: SharedState | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        model, shard, context = self._own(model, shard, context)
        extra = {} if shared is None else {"shared": shared}
        return shard.ids, np.asarray(selector.score(model, shard, self.task, seed, **extra, **context), dtype=np.float64)

    def select(self, model: nn.Module, selector: Selector, shard: IdDataset, k: int, seed: int, context: dict[str, Any]) -> Coreset:
        model, shard, context = self._own(model, shard, context)
        return selector.select(model, shard, task=self.task, k=min(k, len(shard)), seed=seed, **context)


class ScoringPool:
    """Shards the forget set over Ray actors and merges their results into one coreset.

    The actors start on the first :meth:`select` and are reused by later ones (a continual-unlearning service or a
    benchmark pays their start-up once); :meth:`close` (or leaving a ``with`` block) ends them, and so does
    ``ray.shutdown()``. Each request ships its model once through the object store. A shard whose actor is lost
    mid-request (killed, or its node gone) is re-run on a surviving actor (:meth:`_gather`), so the coreset is the
    undisturbed one; after such a loss the next request starts a fresh set of actors. Only when no actor is left
    (and none comes back within ``RESTART_WAIT_S``) does the select fail, with
    :class:`~erasus_ray.errors.ScoringPoolError` saying what to change in ``actors/scoring.yaml``.

    Example:
        >>> with ScoringPool(PoolSpec(num_actors=2)) as pool:
        ...     coreset = pool.select(get_selector("el2n"), model, forget, task=task, fraction=0.1)
    """

    def __init__(
        self,
        spec: PoolSpec | None = None,
        on_dispatch: Callable[[list[Any]], None] | None = None,
        compare_central: bool | None = None,
    ) -> None:
        self.spec = spec or PoolSpec.load()
        # Called with the actor handles right after the shard tasks are submitted (fault-injection tests kill one).
        self.on_dispatch = on_dispatch
        # GreeDi: also run the selector centrally to report its objective (None: up to CENTRAL_OBJECTIVE_MAX samples)
        self.compare_central = compare_central
        self._handles: list[Any] = []
        self._handles_for: tuple[Any, ...] | None = None  # (Ray session, task) the actors were started for
        self._losses: dict[str, int] = {}  # what the last request lost (see _gather)

    def _actors(self, task: Task) -> list[Any]:
        """The pool's actors, started on first use (or when Ray was restarted, or for another task adapter)."""
        ray = ensure_ray()
        key = (ray.get_runtime_context().get_job_id(), repr(task))
        if self._handles and self._handles_for == key:
            return self._handles
        self.close()
        worker = ray.remote(
            num_cpus=self.spec.num_cpus,
            num_gpus=self.spec.num_gpus,
            max_restarts=self.spec.max_restarts,
            max_task_retries=0,  # a lost actor's shard is re-run by the pool on another actor (_gather)
        )(_ScoringWorker)
        # Never ask for more actors than the cluster can place (pending actors would block forever); shards are
        # dealt round-robin, so fewer actors just take more shards each.
        count = self.spec.num_actors
        total_cpu = float(ray.cluster_resources().get("CPU", 0))
        if self.spec.num_cpus > 0 and total_cpu > 0:
            count = max(1, min(count, int(total_cpu // self.spec.num_cpus)))
        self._handles = [worker.remote(task, self.spec.torch_threads, self.spec.malloc_mmap_threshold_mb) for _ in range(count)]
        self._handles_for = key
        return self._handles

    def start(self, task: Task) -> "ScoringPool":
        """Start the actors now (and wait until they are up) instead of on the first :meth:`select`."""
        ray = ensure_ray()
        ray.get([a.ready.remote() for a in self._actors(task)])
        return self

    def close(self) -> None:
        """End the actors (their CPUs go back to the cluster)."""
        if self._handles:
            try:
                import ray

                if ray.is_initialized():
                    for actor in self._handles:
                        ray.kill(actor)
            finally:
                self._handles, self._handles_for = [], None

    def __enter__(self) -> "ScoringPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _dispatched(self, actors: list[Any]) -> None:
        if self.on_dispatch is not None:
            self.on_dispatch(actors)

    def select(
        self,
        selector: Selector,
        model: nn.Module,
        forget: IdDataset,
        *,
        task: Task,
        k: int | None = None,
        fraction: float | None = None,
        seed: int = 0,
        **context: Any,
    ) -> Coreset:
        forget = forget.sorted()
        if len(forget) == 0:
            raise InvalidDataError("the forget set is empty: nothing to select")
        budget = resolve_budget(len(forget), k, fraction)
        if selector.distributed_merge == "central":
            coreset = selector.select(model, forget, task=task, k=budget, seed=seed, **context)
            reason = selector.central_reason or "the selector runs on the whole forget set"
            coreset.info["distributed"] = f"central: {reason}"
            return coreset
        ray = ensure_ray()
        context = {k2: (materialise(v) if isinstance(v, IdDataset) else v) for k2, v in context.items()}
        context_ref = ray.put(context)
        rows = materialise(forget)  # one pass over the dataset; shards slice its columns
        shards = [materialise(rows.subset(s)) for s in shard_ids(forget.ids, self.spec.num_actors)]
        actors = self._actors(task)
        was_training = model.training
        model.eval()
        # this request's weights, shipped once; each actor fetches them once (shippable: a parametrized module,
        # e.g. Wav2Vec2's weight-normed convolution, cannot be pickled as it is)
        model_ref = ray.put(shippable(model))
        try:
            if selector.distributed_merge == "scores":
                # set-level statistics once, over the whole forget set, on the driver; every shard reuses them
                shared_state = getattr(selector, "shared_state", None)
                state = None if shared_state is None else shared_state(model, rows, task, seed, **context)
                state_ref = None if state is None else ray.put(state)
                parts = self._gather(actors, shards, lambda a, shard: a.score.remote(model_ref, selector, shard, seed,
                                                                                      context_ref, state_ref))
                ids = np.concatenate([p[0] for p in parts])
                scores = np.concatenate([p[1] for p in parts])
                coreset = selector.coreset_from_scores(ids, scores, budget)
                if state is not None:
                    coreset.info.update(state.info)
            else:
                local = self._gather(actors, shards, lambda a, shard: a.select.remote(model_ref, selector, shard, budget,
                                                                                       seed, context_ref))
                coreset = self._greedi(selector, model, forget, task, budget, seed, local, context)
        finally:
            model.train(was_training)
        coreset.selector = selector.name
        coreset.info.update({"distributed": f"ray:{selector.distributed_merge}", "shards": len(shards), "pool": self.spec.to_dict(),
                             **self._losses})
        return coreset

    def _gather(self, actors: list[Any], shards: list[IdDataset], submit: Callable[[Any, IdDataset], Any]) -> list[Any]:
        """Run ``submit(actor, shard)`` for every shard (dealt round-robin) and return the results in shard order.

        A shard whose actor is lost (``RayActorError``: killed, crashed, its node removed) is submitted again to a
        live actor, at most ``max_task_retries`` times per shard; the lost actor is not used again in this request
        and the pool's actors are replaced before the next one. Ray reports such a loss within seconds (the task's
        connection to the actor breaks), so a node loss costs about one shard's re-run instead of Ray's wait for the
        node's death and the actor's restart (measured in ``tests/pool_node_loss_worker.py``). ``self._losses``
        (copied into ``Coreset.info``): ``lost_actors`` and ``reassigned_shards`` when anything was lost."""
        ray = require_ray()
        live = list(actors)
        pending = {submit(actors[i % len(actors)], shard): (i, actors[i % len(actors)], 0) for i, shard in enumerate(shards)}
        self._dispatched(actors)
        results: list[Any] = [None] * len(shards)
        lost: list[Any] = []
        reassigned = 0
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            i, actor, tries = pending.pop(ref)
            try:
                results[i] = ray.get(ref)
                continue
            except ray.exceptions.RayActorError as err:
                if actor in live:
                    live.remove(actor)
                    lost.append(actor)
                if tries >= self.spec.max_task_retries:
                    self.close()
                    raise ScoringPoolError(
                        f"shard {i} of {len(shards)} lost its actor {tries + 1} time(s) ({type(err).__name__}); "
                        f"raise max_task_retries (now {self.spec.max_task_retries}) in actors/scoring.yaml to re-run it "
                        "on another actor"
                    ) from err
                live = live or self._restarted(lost)
                if not live:
                    self.close()
                    raise ScoringPoolError(
                        f"all {len(actors)} scoring actors were lost during this request ({type(err).__name__}) and none "
                        f"came back within {RESTART_WAIT_S:.0f} s; raise max_restarts (now {self.spec.max_restarts}) "
                        "or num_actors in actors/scoring.yaml, or check the Ray cluster's nodes"
                    ) from err
            target = live[i % len(live)]
            pending[submit(target, shards[i])] = (i, target, tries + 1)
            reassigned += 1
        self._losses = {"lost_actors": len(lost), "reassigned_shards": reassigned} if lost else {}
        if lost:
            self.close()  # the next request starts a full, fresh set of actors
        return results

    @staticmethod
    def _restarted(lost: list[Any]) -> list[Any]:
        """The lost actors that Ray brought back (``max_restarts``) within ``RESTART_WAIT_S``; removed from ``lost``."""
        ray = require_ray()
        probes = {a.ready.remote(): a for a in lost}
        done, _ = ray.wait(list(probes), num_returns=len(probes), timeout=RESTART_WAIT_S, fetch_local=False)
        back = []
        for ref in done:
            try:
                ray.get(ref)
                back.append(probes[ref])
            except ray.exceptions.RayActorError:
                pass
        for a in back:
            lost.remove(a)
        return back

    def _greedi(
        self, selector: Selector, model: nn.Module, forget: IdDataset, task: Task, budget: int, seed: int,
        local: list[Coreset], context: dict[str, Any],
    ) -> Coreset:
        """GreeDi's second round (Mirzasoleiman et al. 2013): greedy over the union of the local solutions, then the
        better of that merged solution and the best full-size local one under the selector's objective on the whole
        forget set (:meth:`Selector.set_objective`). ``info``: ``greedi_objective`` (merged), ``greedi_local_objectives``,
        ``greedi_choice``, ``objective_full`` (of the returned coreset) and, when the centralised run is affordable,
        ``centralised_objective`` and ``greedi_vs_centralised`` (``f(GreeDi) / f(central)`` for a maximised objective,
        ``f(central) / f(GreeDi)`` for a minimised one: 1.0 is as good as centralised, below 1 worse)."""
        union = np.unique(np.concatenate([c.ids for c in local]))
        merged = selector.select(model, forget.subset(union), task=task, k=min(budget, len(union)), seed=seed, **context)
        info: dict[str, Any] = {"greedi_union": int(len(union))}
        sense = selector.objective_sense
        if sense is None:
            merged.info.update(info, greedi_choice="merged (the selector defines no set objective to compare with)")
            return merged
        f = selector.set_objective(model, forget, task, seed, **context)
        better = max if sense == "max" else min
        candidates = [("merged", merged)] + [(f"shard {i}", c) for i, c in enumerate(local) if len(c.ids) == budget]
        values = {name: f(c.ids) for name, c in candidates}
        choice = better(values, key=lambda name: values[name])  # ties keep the merged solution (first)
        if choice == "merged":
            coreset = merged
        else:
            chosen = dict(candidates)[choice]
            # a local solution's scores and weights describe its shard only: keep the ids and relative weights
            coreset = Coreset(ids=chosen.ids.copy(), weights=np.asarray(chosen.weights, dtype=np.float64), scores=None,
                              info=dict(chosen.info))
        info.update({
            "objective_sense": sense,
            "greedi_objective": values["merged"],
            "greedi_local_objectives": [values[n] for n, _ in candidates[1:]],
            "greedi_choice": choice,
            "objective_full": values[choice],
        })
        central = self.compare_central if self.compare_central is not None else len(forget) <= CENTRAL_OBJECTIVE_MAX
        if central:
            f_central = f(selector.select(model, forget, task=task, k=budget, seed=seed, **context).ids)
            info["centralised_objective"] = f_central
            mine = values[choice]
            ratio = (mine / f_central if f_central else 1.0) if sense == "max" else (f_central / mine if mine else 1.0)
            info["greedi_vs_centralised"] = float(ratio)
        else:
            info["centralised_objective"] = None  # not run: the forget set is larger than CENTRAL_OBJECTIVE_MAX
        coreset.info.update(info)
        return coreset
