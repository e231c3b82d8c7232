"""The task adapter contract: how a model family reads a batch and scores it.

Selectors, strategies and metrics are written once against :class:`Task` and never inspect the model type
(the Kronfluence ``Task`` idea). The contract is loss-first: the one mandatory thing a task gives is a per-sample
objective, batched (``forward(...).sample_loss()``) and in the fixed-shape form ``torch.func`` needs
(:meth:`Task.dense_sample_loss`). Everything else - categorical prediction units, labels, features, a head module,
per-sample independence, tokens, generation - is a declared :class:`~erasus_ray.tasks.capabilities.Capability`
that algorithms ask for through ``requires`` and :func:`~erasus_ray.tasks.registry.require`.

A task with categorical predictions turns a batch into *prediction units* - one per sample for a classifier, one per
supervised token for a causal LM - each with logits, a target and the batch row that owns it, and every per-sample
quantity is a reduction over a sample's units. A task whose objective is random (a denoising loss draws timesteps
and noise) makes the randomness part of the batch: its ``collate`` receives the sample ids and draws from a
generator keyed by id, so a sample is scored with the same draws every time, for every model compared.

A new model family is a new adapter registered with :func:`~erasus_ray.tasks.registry.register_task`
(README: "Write an adapter").
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, ClassVar, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from erasus_ray.errors import TaskMismatchError
from erasus_ray.tasks.capabilities import Capability, CapabilityError, capability_set


def output_tensor(raw: Any, attribute: str, expected: str) -> torch.Tensor:
    """The main tensor of a model's raw output: the output itself when it is a tensor, its ``attribute`` (``logits``
    of a Hugging Face output, ``sample`` of a diffusers one), or the first element of a tuple; else a
    :class:`TaskMismatchError` saying ``expected`` and what came instead."""
    if isinstance(raw, torch.Tensor):
        return raw
    value = getattr(raw, attribute, None)
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(raw, (tuple, list)) and raw and isinstance(raw[0], torch.Tensor):
        return raw[0]
    raise TaskMismatchError(f"{expected}; got {type(raw).__name__}")


def parameters_reached(model: nn.Module, output: torch.Tensor) -> list[str]:
    """Names of the trainable parameters of ``model`` that ``output`` depends on in the autograd graph (whether
    or not their gradient happens to be zero here). Cost: one backward pass of ``output.sum()``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(output.sum(), [p for _, p in named], allow_unused=True, retain_graph=True)
    return [n for (n, _), g in zip(named, grads) if g is not None]


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 logits for a stable loss; keep float32 and float64 as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class TaskOutput:
    """What one forward pass gives: a per-sample objective always, categorical prediction units when the task has them.

    A task with categorical predictions (``Capability.LOGITS``) fills ``logits``/``targets``/``owner`` and every
    per-sample quantity (loss, log-likelihood, accuracy, EL2N error) is a reduction over a sample's units. A task
    whose objective has no logits (a denoising loss) fills ``losses`` instead; asking it for logits raises
    :class:`~erasus_ray.tasks.capabilities.CapabilityError` naming what is missing, never a silent zero.

    Attributes:
        logits: ``[N, C]`` logits of the N units (``None`` for a loss-only task).
        targets: ``[N]`` target class / token of each unit.
        owner: ``[N]`` batch row (0..B-1) each unit belongs to.
        batch_size: B.
        features: ``[B, D]`` penultimate features, when requested.
        losses: ``[B]`` per-sample objective of a loss-only task (derived from the units otherwise).
    """

    __slots__ = ("_logits", "targets", "owner", "batch_size", "features", "losses")

    def __init__(
        self,
        logits: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        owner: torch.Tensor | None = None,
        batch_size: int | None = None,
        features: torch.Tensor | None = None,
        *,
        losses: torch.Tensor | None = None,
    ) -> None:
        if logits is None and losses is None:
            raise ValueError("TaskOutput needs logits (with targets and owner) or per-sample losses")
        if logits is not None and (targets is None or owner is None):
            raise ValueError("TaskOutput with logits needs targets and owner")
        self._logits = logits
        self.targets = targets
        self.owner = owner
        self.batch_size = int(batch_size if batch_size is not None else losses.shape[0])  # type: ignore[union-attr]
        self.features = features
        self.losses = losses

    @property
    def has_logits(self) -> bool:
        return self._logits is not None

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            raise CapabilityError(
                "this task's output has no logits (a loss-only objective): an algorithm that reads logits must "
                "declare requires={'logits'} so that it is refused up front with the task named"
            )
        return self._logits

    def _per_sample(self, unit_values: torch.Tensor, reduce: str) -> torch.Tensor:
        out = torch.zeros(self.batch_size, dtype=unit_values.dtype, device=unit_values.device)
        out = out.index_add(0, self.owner, unit_values)
        if reduce == "sum":
            return out
        counts = torch.zeros(self.batch_size, dtype=unit_values.dtype, device=unit_values.device)
        counts = counts.index_add(0, self.owner, torch.ones_like(unit_values))
        return out / counts.clamp_min(1)

    def unit_loss(self) -> torch.Tensor:
        return F.cross_entropy(at_least_fp32(self.logits), self.targets, reduction="none")

    def sample_loss(self) -> torch.Tensor:
        """``[B]`` the task's per-sample objective: mean cross-entropy over each sample's units (answer tokens for
        an LM), or the loss-only task's own objective."""
        if self._logits is None:
            return self.losses  # type: ignore[return-value]
        return self._per_sample(self.unit_loss(), "mean")

    def sample_logprob(self) -> torch.Tensor:
        """``[B]`` log-likelihood of each sample's targets: ``log p(y|x)``, summed over an LM's tokens."""
        return self._per_sample(-self.unit_loss(), "sum")

    def sample_units(self) -> torch.Tensor:
        """``[B]`` number of units (1 for a classifier, supervised tokens for an LM)."""
        return self._per_sample(torch.ones_like(self.targets, dtype=torch.float32), "sum")

    def sample_accuracy(self) -> torch.Tensor:
        """``[B]`` fraction of each sample's units predicted correctly (argmax)."""
        return self._per_sample((self.logits.argmax(-1) == self.targets).float(), "mean")

    def sample_el2n(self) -> torch.Tensor:
        """``[B]`` EL2N error ``||softmax(logits) - onehot(target)||_2`` averaged over units (Paul et al. 2021)."""
        probs = at_least_fp32(self.logits).softmax(-1)
        onehot = F.one_hot(self.targets, probs.shape[-1]).to(probs.dtype)
        return self._per_sample((probs - onehot).norm(dim=-1), "mean")

    def unit_target_prob(self) -> torch.Tensor:
        return torch.exp(-self.unit_loss())

    def replace(self, **changes: Any) -> "TaskOutput":
        """A copy with some fields replaced (``out.replace(logits=z)``, as ``dataclasses.replace``)."""
        fields = {"logits": self._logits, "targets": self.targets, "owner": self.owner,
                  "batch_size": self.batch_size, "features": self.features, "losses": self.losses}
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"TaskOutput.replace: unknown field(s) {sorted(unknown)}")
        fields.update(changes)
        losses = fields.pop("losses")
        return TaskOutput(**fields, losses=losses)

    def __repr__(self) -> str:
        kind = f"logits={tuple(self._logits.shape)}" if self._logits is not None else "losses"
        return f"TaskOutput(batch_size={self.batch_size}, {kind})"


class Task(ABC):
    """A model family's adapter. Subclasses define how to collate items, call the model and read its output, and
    declare what they can give beyond the per-sample objective.

    Class attributes:
        name: the registered name (set by :func:`~erasus_ray.tasks.registry.register_task`).
        capabilities: the declared :class:`Capability` set (``loss`` is always included).
        match_priority: order among tasks whose :meth:`matches` accepts a model (higher first) for ``task="auto"``.
        default_metrics: the registered metric names ``evaluate`` runs by default, in output order (None: every
            registered metric whose requirements the task meets; see :mod:`erasus_ray.evaluation.metrics`).
        gap_metrics / display_metrics: which of those make up Avg.Gap / which tables show, in order (None: each
            metric's own ``gap`` / ``display`` flag).
        eval_batch_size: batch size of evaluation forward passes.
    """

    name: ClassVar[str] = "task"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.LOSS})
    match_priority: ClassVar[int] = 0
    default_metrics: ClassVar[tuple[str, ...] | None] = None
    gap_metrics: ClassVar[tuple[str, ...] | None] = None
    display_metrics: ClassVar[tuple[str, ...] | None] = None
    eval_batch_size: ClassVar[int] = 256

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # parsed once at class definition: a misspelt capability fails here, and LOSS is always declared
        cls.capabilities = capability_set(cls.capabilities, f"task {cls.__name__}") | {Capability.LOSS}

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether ``task="auto"`` should pick this adapter for ``model`` (default: never; only by name)."""
        return False

    @property
    def shared_inputs(self) -> bool:
        """Whether the forward feeds some layer inputs that belong to no single sample (a caption set encoded once
        per batch). Then a layer's gradient is a sum over shared rows, and per-sample gradients come from
        ``torch.func`` rather than layer factors. Default False: every layer input row belongs to one sample."""
        return False

    def training_task(self) -> "Task":
        """The adapter to train a model from scratch with (:func:`erasus_ray.training.train_model`: the benchmarks'
        original and gold models, ``retrain``). Default: this one. A task whose scored objective uses fixed, id-keyed
        draws returns a variant that draws afresh every step (a diffusion model trained on a few fixed (timestep,
        noise) pairs per image would not learn the whole noise schedule)."""
        return self

    def provides(self, capability: Capability | str) -> bool:
        """Whether this task declares ``capability``."""
        return Capability(capability) in self.capabilities

    @abstractmethod
    def collate(self, items: list[Any]) -> Any:
        """Collate the user's dataset items (without ids) into the data part of a batch.

        An adapter whose objective is random declares ``collate(self, items, ids=None)``: the loaders then pass the
        batch's sample ids, from which it draws the per-sample randomness (same draws for the same id, always).
        """

    @abstractmethod
    def model_inputs(self, data: Any) -> tuple[tuple, dict]:
        """``(args, kwargs)`` to call the model with on ``data`` (also used by ``torch.func.functional_call``)."""

    def functional_inputs(self, data: Any) -> tuple[tuple, dict]:
        """Inputs for one sample under ``torch.func`` (``vmap``); defaults to :meth:`model_inputs`."""
        return self.model_inputs(data)

    def functional_context(self, model: nn.Module) -> ContextManager[None]:
        """A context in which the model may be called under ``vmap`` (e.g. with data-dependent checks off)."""
        return contextlib.nullcontext()

    @abstractmethod
    def read_output(self, raw: Any, data: Any, *, features: torch.Tensor | None = None) -> TaskOutput:
        """Turn the model's raw output into prediction units; validate that it fits the data."""

    @abstractmethod
    def dense_sample_loss(self, raw: Any, data: Any) -> torch.Tensor:
        """``[B]`` per-sample loss from raw output using only fixed-shape ops (safe under ``torch.func.vmap``).

        Equals ``read_output(raw, data).sample_loss()``; used for per-sample gradients.
        """

    def dense_units(self, raw: Any, data: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits [B, U, C], targets [B, U], weights [B, U])`` with fixed shapes (safe under ``vmap``) such that
        ``dense_sample_loss(raw, data) == (weights * cross_entropy(logits, targets)).sum(1)``.

        Curvature estimates (Gauss-Newton / Fisher with labels sampled from the model) need the units and their
        weights, not only the summed loss. Part of ``Capability.LOGITS``; a task without it raises :class:`CapabilityError`.
        """
        raise CapabilityError(f"task {self.name!r} has no prediction units (capability 'logits'): no dense_units")

    def batch_size(self, data: Any) -> int:
        args, kwargs = self.model_inputs(data)
        first = args[0] if args else next(iter(kwargs.values()))
        return int(first.shape[0])

    def forward(self, model: nn.Module, data: Any, *, features: bool = False) -> TaskOutput:
        """Run the model on ``data``; with ``features=True`` also capture penultimate features."""
        args, kwargs = self.model_inputs(data)
        if not features:
            return self.read_output(model(*args, **kwargs), data)
        return self._forward_with_features(model, args, kwargs, data)

    def _forward_with_features(self, model: nn.Module, args: tuple, kwargs: dict, data: Any) -> TaskOutput:
        raise CapabilityError(f"task {self.name!r} does not provide features (capability 'features')")

    def condition_inputs(self, data: Any) -> dict[str, torch.Tensor]:
        """Model inputs besides the tokens that a token-editing or generating algorithm must carry along (an image's
        ``pixel_values`` for a vision-language model), each with the batch as its first dimension: ``greedy_answers``
        passes them to ``generate``, and a preference batch rebuilt from a row's prompt keeps its row. Default: none."""
        return {}

    def labels_of(self, data: Any) -> torch.Tensor | None:
        """Per-sample class labels where the task has them (``Capability.LABELS``), else None."""
        return None

    def relabel(self, data: Any, labels: torch.Tensor) -> Any:
        """``data`` with each sample's class label replaced by ``labels`` (``Capability.LABELS``)."""
        raise CapabilityError(f"task {self.name!r} has no class labels to replace (capability 'labels')")

    def head_module(self, model: nn.Module) -> nn.Module:
        """The module whose input is the feature (``Capability.HEAD``)."""
        raise CapabilityError(f"task {self.name!r} declares no head module (capability 'head')")

    def tower_parameters(self, model: nn.Module, data: Any) -> dict[str, list[str]]:
        """``{"vision": names, "text": names}``: the trainable parameters of each modality's tower
        (``Capability.TOWERS``); ``data`` is a batch the adapter may run to find them."""
        raise CapabilityError(f"task {self.name!r} declares no vision/text towers (capability 'towers')")

    def pair_embeddings(self, model: nn.Module, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image [B, D], text [B, D])`` L2-normalised embeddings of each sample's own image-text pair in the joint
        space (``Capability.JOINT_SPACE``); their row-wise dot product is the pair's cosine similarity."""
        raise CapabilityError(f"task {self.name!r} has no joint image-text space (capability 'joint_space')")

    # Convenience wrappers (one forward each).
    def per_sample_loss(self, model: nn.Module, data: Any) -> torch.Tensor:
        return self.forward(model, data).sample_loss()

    def features(self, model: nn.Module, data: Any) -> torch.Tensor:
        out = self.forward(model, data, features=True)
        assert out.features is not None
        return out.features

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
