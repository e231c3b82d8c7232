"""SISA training (Bourtoule et al., IEEE S&P 2021, "Machine Unlearning"): Sharded, Isolated, Sliced, Aggregated.

:class:`SISATrainer` splits the training ids into disjoint shards, trains one constituent model per shard slice by
slice (checkpointing after every slice), and returns a :class:`SISAEnsemble` - an ``nn.Module`` that aggregates
the constituents, so evaluation and the task adapters work on it unchanged. Unlearning a set of ids retrains only
the shards that hold one, from the checkpoint taken before the earliest slice that holds one; the ``sisa``
strategy (:mod:`erasus_ray.strategies.sisa`) is the ``ErasusUnlearner`` entry point.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from erasus_ray.data import IdDataset, as_id_dataset, make_loader
from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.tasks import Capability, Task, get_task, require
from erasus_ray.tasks.causal_lm import GreedyGenerate, accepts_position_ids
from erasus_ray.training import TrainRecipe, make_optimizer

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, vectorised over uint64 (a fixed, well-mixing hash: ids -> uniform 64-bit keys)."""
    z = values.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z


def id_keys(ids: np.ndarray, seed: int) -> np.ndarray:
    """A seeded 64-bit hash of every id; depends only on ``(seed, id)``, never on the other ids or their order."""
    offset = np.uint64((int(seed) * _GOLDEN + 1) & _MASK64)
    with np.errstate(over="ignore"):
        return _splitmix64(np.asarray(ids, dtype=np.int64).astype(np.uint64) + offset)


def _stage_seed(seed: int, shard: int, stage: int) -> int:
    """The shuffling seed of one (shard, slice) training stage."""
    key = id_keys(np.array([int(shard) * 1_000_003 + int(stage)], dtype=np.int64), seed)[0]
    return int(key) & ((1 << 63) - 1)


#: What a shard ensemble reads: the members' logits, averaged as class / next-token probabilities.
SISA_NEEDS = frozenset({Capability.LOSS, Capability.LOGITS})


@dataclass
class SISACheckpoint:
    """A constituent's state at a slice boundary: weights, optimizer state and torch's CPU RNG state."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: torch.Tensor


@dataclass
class SISAUnlearnStats:
    """What one unlearning request cost.

    Attributes:
        forget_ids: ids removed by this request (ids already removed earlier are not counted).
        shards_retrained: shards that held a forget id, each retrained from ``from_slice`` (0-based).
        from_slice: shard -> first slice retrained.
        samples_retrained: samples passed through training (epochs x samples, summed over retrained stages).
        steps: optimizer steps taken.
        full_sisa_samples: what retraining every shard from scratch on the remaining data would cost.
        full_retrain_samples: what retraining one model with the recipe on the remaining data would cost.
    """

    forget_ids: list[int]
    shards_retrained: list[int]
    from_slice: dict[int, int]
    samples_retrained: int
    steps: int
    full_sisa_samples: int
    full_retrain_samples: int
    shard_hashes_before: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["from_slice"] = {str(k): v for k, v in self.from_slice.items()}
        out["shard_hashes_before"] = {str(k): v for k, v in self.shard_hashes_before.items()}
        return out


class SISATrainer:
    """Train a SISA ensemble and retrain only what a deletion touches.

    Each training id is assigned to shard ``h(id) mod num_shards`` and, inside its shard, to slice
    ``(h(id) div num_shards) mod num_slices``, with ``h`` a seeded 64-bit hash (:func:`id_keys`). Hashing
    (instead of splitting a permutation into equal parts) keeps every remaining id in its shard and slice when ids
    are removed, which is what makes unlearning *exactly* equal to training from scratch without them; shards are
    balanced in expectation. Constituent ``s`` is built by ``model_factory`` under ``torch.manual_seed`` of a
    per-shard seed, then trained on slices ``1..r`` for ``r = 1..num_slices`` (the paper's incremental training);
    stage ``r`` runs ``slice_epochs[r]`` epochs, by default the paper's ``round(2 * recipe.epochs / (R + 1))``
    (at least 1) so that a sliced shard costs about as much as an unsliced one. One optimizer (the recipe's) lives
    across a shard's stages; the loader of stage ``(s, r)`` is shuffled with a seed derived from ``(seed, s, r)``;
    a :class:`SISACheckpoint` (weights, optimizer state, RNG state) is kept in memory before the first slice and
    after every slice.

    Unlearning ids retrains each affected shard from the checkpoint before the earliest slice holding one of them,
    on that shard's remaining ids, through the same stage function: the result is bit-for-bit the model that
    :meth:`fit` would train without those ids, and unaffected shards are untouched.

    Args:
        model_factory: builds a fresh constituent (the same architecture as a single model).
        recipe: optimizer, lr, batch size, weight decay and epochs per stage (see above); ``recipe.seed`` is unused,
            ``seed`` governs everything.
        num_shards: S, number of constituents (>= 1).
        num_slices: R, slices per shard (>= 1).
        seed: seeds the id hash, constituent initialisation and shuffling.
        task: the task adapter: ``"classification"`` (the ensemble aggregates class probabilities),
            ``"causal_lm"`` (it aggregates next-token probabilities at every position, and decodes greedily from them)
            or ``"auto"`` (default: read off a model built by ``model_factory``, as ``get_task("auto", model)``).
        aggregation: ``"softmax"`` (mean of the constituents' class probabilities) or ``"vote"`` (majority vote,
            ties broken by the mean probability).
        slice_epochs: epochs of each of the R stages (overrides the default split).

    Cost: training, S models on n/S samples each (about the cost of one model, in S independent jobs); memory for
    ``S x (R + 1)`` checkpoints. Unlearning: ``(R - r0) / R`` of one shard's stages for each affected shard, i.e.
    about ``1/S`` (or less, with slices) of a full retrain when the forget ids fall into one shard.

    Example:
        >>> ensemble = SISATrainer(factory, TrainRecipe(epochs=30), num_shards=5, num_slices=4, seed=0).fit(train)
        >>> result = ErasusUnlearner(ensemble, strategy="sisa", selector=None).fit(forget_data=forget)
        >>> result.report.info["shards_retrained"], result.report.info["samples_retrained"]
    """

    def __init__(
        self,
        model_factory: Callable[[], nn.Module],
        recipe: TrainRecipe | None = None,
        num_shards: int = 5,
        num_slices: int = 1,
        seed: int = 0,
        *,
        task: Task | str = "auto",
        aggregation: str = "softmax",
        slice_epochs: Iterable[int] | None = None,
    ) -> None:
        if not callable(model_factory):
            raise InvalidConfigError("model_factory must be a callable that builds a fresh model")
        for name, value in (("num_shards", num_shards), ("num_slices", num_slices)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InvalidConfigError(f"{name} must be a positive integer, got {value!r}")
        if aggregation not in ("softmax", "vote"):
            raise InvalidConfigError(f"aggregation must be 'softmax' or 'vote', got {aggregation!r}")
        self.model_factory = model_factory
        self.recipe = recipe or TrainRecipe()
        self.num_shards = int(num_shards)
        self.num_slices = int(num_slices)
        self.seed = int(seed)
        if task == "auto":
            with torch.random.fork_rng(devices=[]):  # probing the architecture must not move the seeded RNG
                task = get_task("auto", model_factory())
        self.task = get_task(task)
        require(self.task, SISA_NEEDS, algorithm="SISATrainer (it aggregates the shards' class or next-token probabilities)")
        self.aggregation = aggregation
        if slice_epochs is None:
            per = max(1, int(round(2 * self.recipe.epochs / (self.num_slices + 1))))
            self.slice_epochs = [per] * self.num_slices
        else:
            self.slice_epochs = [int(e) for e in slice_epochs]
            if len(self.slice_epochs) != self.num_slices or min(self.slice_epochs) < 1:
                raise InvalidConfigError(
                    f"slice_epochs must give num_slices={self.num_slices} positive epoch counts, got {self.slice_epochs}"
                )
        self.data: IdDataset | None = None
        self.shard_of: dict[int, int] = {}
        self.slice_of: dict[int, int] = {}
        self.removed: set[int] = set()
        self.checkpoints: list[list[SISACheckpoint]] = []

    def __deepcopy__(self, memo: dict[int, Any]) -> "SISATrainer":
        # Copies (e.g. ErasusUnlearner's clone of the ensemble) get their own checkpoints and removal record, but
        # share the training data, the task adapter and the factory, which unlearning only reads.
        for shared in (self.data, self.task, self.model_factory):
            memo[id(shared)] = shared
        new = object.__new__(type(self))
        memo[id(self)] = new
        for key, value in vars(self).items():
            setattr(new, key, copy.deepcopy(value, memo))
        return new

    # --- assignment --------------------------------------------------------------------------------------
    def assign(self, ids: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(shard, slice)`` of every id: a function of ``(seed, id)`` alone."""
        keys = id_keys(np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64), self.seed)
        shards = (keys % np.uint64(self.num_shards)).astype(np.int64)
        slices = ((keys // np.uint64(self.num_shards)) % np.uint64(self.num_slices)).astype(np.int64)
        return shards, slices

    def shard_ids(self, shard: int, upto_slice: int | None = None) -> np.ndarray:
        """The remaining (not removed) ids of ``shard`` in slices ``0..upto_slice`` (all slices if None), sorted."""
        last = self.num_slices - 1 if upto_slice is None else upto_slice
        ids = [i for i, s in self.shard_of.items() if s == shard and self.slice_of[i] <= last and i not in self.removed]
        return np.sort(np.asarray(ids, dtype=np.int64))

    # --- training ----------------------------------------------------------------------------------------
    def _shard_seed(self, shard: int) -> int:
        return _stage_seed(self.seed, shard, 1_000_000)

    def _fresh_model(self, shard: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._shard_seed(shard))
            return self.model_factory()

    def _checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> SISACheckpoint:
        return SISACheckpoint(
            model={k: v.detach().clone() for k, v in model.state_dict().items()},
            optimizer=copy.deepcopy(optimizer.state_dict()),
            rng=torch.get_rng_state(),
        )

    def _train_stage(self, model: nn.Module, optimizer: torch.optim.Optimizer, shard: int, stage: int) -> tuple[int, int]:
        """Train stage ``stage`` of ``shard`` (slices ``0..stage``); returns ``(samples, steps)``."""
        assert self.data is not None
        ids = self.shard_ids(shard, stage)
        if len(ids) == 0:
            return 0, 0
        loader = make_loader(
            self.data.subset(ids), self.task.collate, batch_size=self.recipe.batch_size, shuffle=True,
            seed=_stage_seed(self.seed, shard, stage),
        )
        device = next(model.parameters()).device
        model.train()
        steps = 0
        for _ in range(self.slice_epochs[stage]):
            for batch in loader:
                batch = batch.to(device)
                loss = self.task.forward(model, batch.data).sample_loss().mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
        model.eval()
        return self.slice_epochs[stage] * len(ids), steps

    def _train_shard(self, shard: int, from_stage: int = 0) -> tuple[nn.Module, int, int]:
        """(Re)train ``shard`` from the checkpoint before ``from_stage``; refreshes the later checkpoints."""
        model = self._fresh_model(shard)
        optimizer = make_optimizer(
            self.recipe.optimizer, [p for p in model.parameters() if p.requires_grad], self.recipe.lr, self.recipe.weight_decay
        )
        samples = steps = 0
        with torch.random.fork_rng(devices=[]):
            if from_stage == 0 and not self.checkpoints[shard]:
                torch.manual_seed(self._shard_seed(shard))
                self.checkpoints[shard].append(self._checkpoint(model, optimizer))
            start = self.checkpoints[shard][from_stage]
            model.load_state_dict(start.model)
            optimizer.load_state_dict(copy.deepcopy(start.optimizer))
            torch.set_rng_state(start.rng)
            del self.checkpoints[shard][from_stage + 1 :]
            for stage in range(from_stage, self.num_slices):
                n, k = self._train_stage(model, optimizer, shard, stage)
                samples, steps = samples + n, steps + k
                self.checkpoints[shard].append(self._checkpoint(model, optimizer))
        return model, samples, steps

    def fit(self, data: Any) -> "SISAEnsemble":
        """Train the S constituents on ``data`` (Dataset / Subset / DataLoader / IdDataset) and return the ensemble."""
        dataset = as_id_dataset(data).sorted()
        if len(dataset) == 0:
            raise InvalidDataError("SISATrainer.fit: data is empty")
        self.data = dataset
        shards, slices = self.assign(dataset.ids)
        self.shard_of = {int(i): int(s) for i, s in zip(dataset.ids, shards)}
        self.slice_of = {int(i): int(r) for i, r in zip(dataset.ids, slices)}
        self.removed = set()
        self.checkpoints = [[] for _ in range(self.num_shards)]
        constituents = [self._train_shard(s)[0] for s in range(self.num_shards)]
        return SISAEnsemble(constituents, self, aggregation=self.aggregation)

    def stage_cost(self, shard: int, from_stage: int = 0) -> int:
        """Samples that (re)training ``shard`` from ``from_stage`` passes through training, on the remaining ids."""
        return sum(self.slice_epochs[r] * len(self.shard_ids(shard, r)) for r in range(from_stage, self.num_slices))

    def unlearn(self, ensemble: "SISAEnsemble", forget_ids: Iterable[int]) -> SISAUnlearnStats:
        """Remove ``forget_ids``: retrain each affected shard from the checkpoint before its earliest affected slice
        and load the result into ``ensemble``. Ids never trained on raise :class:`InvalidDataError`; ids removed
        by an earlier request are ignored."""
        from erasus_ray.utils import model_hash

        if self.data is None:
            raise InvalidConfigError("this SISATrainer has not been fitted; call fit(data) first")
        ids = np.unique(np.asarray(list(forget_ids) if not isinstance(forget_ids, np.ndarray) else forget_ids, dtype=np.int64))
        unknown = [int(i) for i in ids if int(i) not in self.shard_of]
        if unknown:
            raise InvalidDataError(f"forget ids not in the SISA training data: {unknown[:20]}")
        new = [int(i) for i in ids if int(i) not in self.removed]
        from_slice: dict[int, int] = {}
        for i in new:
            s, r = self.shard_of[i], self.slice_of[i]
            from_slice[s] = min(r, from_slice.get(s, r))
        hashes = {s: model_hash(ensemble.constituents[s]) for s in sorted(from_slice)}
        self.removed.update(new)
        samples = steps = 0
        for s in sorted(from_slice):
            model, n, k = self._train_shard(s, from_slice[s])
            ensemble.constituents[s].load_state_dict(model.state_dict())
            samples, steps = samples + n, steps + k
        ensemble.eval()
        remaining = len(self.data) - len(self.removed)
        return SISAUnlearnStats(
            forget_ids=new,
            shards_retrained=sorted(from_slice),
            from_slice=dict(sorted(from_slice.items())),
            samples_retrained=samples,
            steps=steps,
            full_sisa_samples=sum(self.stage_cost(s) for s in range(self.num_shards)),
            full_retrain_samples=self.recipe.epochs * remaining,
            shard_hashes_before=hashes,
        )


class SISAEnsemble(GreedyGenerate, nn.Module):
    """The aggregate of a SISA ensemble's constituents; returns log-probabilities over the last axis (``[B, C]``
    classes, or ``[B, T, V]`` next tokens for causal LMs: the paper's label aggregation applied per position).

    ``aggregation="softmax"``: ``log(mean_s softmax(f_s(x)))``. ``"vote"``: the log of
    ``(votes + mean softmax) / (S + 1)``, whose argmax is the majority vote (ties broken by the mean probability).
    Inputs are passed to every constituent unchanged (a tensor, or Hugging Face keyword inputs); for LMs,
    :meth:`generate` decodes greedily from the aggregate. ``sisa`` holds the :class:`SISATrainer` (shard
    assignment and checkpoints) that unlearning needs.
    """

    def __init__(self, constituents: list[nn.Module], trainer: SISATrainer, aggregation: str = "softmax") -> None:
        super().__init__()
        self.constituents = nn.ModuleList(constituents)
        self.sisa = trainer
        self.aggregation = aggregation
        # the adapter the constituents were trained with: task="auto" resolves to it (see erasus_ray.tasks.get_task)
        self.task_adapter = getattr(trainer, "task", None)
        first = constituents[0] if constituents else None
        # what evaluation reads off a Hugging Face model (eos / pad ids): the constituents share it
        for attr in ("config", "generation_config"):
            if getattr(first, attr, None) is not None:
                setattr(self, attr, getattr(first, attr))

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("output_hidden_states"):
            raise InvalidConfigError("a SISA ensemble has no single hidden state: features are not available")
        outs = [m(*args, **kwargs) for m in self.constituents]
        logits = torch.stack([getattr(o, "logits", o) for o in outs])  # [S, B, (T,) C]
        probs = logits.float().softmax(-1)
        mean = probs.mean(0)
        if self.aggregation == "vote":
            votes = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).sum(0).to(mean.dtype)
            return ((votes + mean) / (len(self.constituents) + 1)).clamp_min(1e-12).log()
        return mean.clamp_min(1e-12).log()

    def _decode_positions(self) -> bool:  # greedy generate (GreedyGenerate) from the aggregated distribution
        return accepts_position_ids(self.constituents[0])

    def forget(self, ids: Iterable[int]) -> SISAUnlearnStats:
        """Unlearn ``ids`` in place (see :meth:`SISATrainer.unlearn`)."""
        return self.sisa.unlearn(self, ids)
