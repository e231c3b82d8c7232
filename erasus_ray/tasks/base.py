"""The task adapter contract: how a model family reads a batch and scores it.

Selectors, strategies and metrics are written once against :class:`Task` and never inspect the model type
(the Kronfluence ``Task`` idea). A task turns a batch into *prediction units* - one per sample for a
classifier, one per supervised token for a causal LM - each with logits, a target and the batch row that owns
it. Every per-sample quantity (loss, log-likelihood, accuracy, EL2N error) is a reduction over a sample's units,
so the same code serves both families. A new modality is a new adapter.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
import torch.nn.functional as F
from torch import nn


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 logits for a stable loss; keep float32 and float64 as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@dataclass
class TaskOutput:
    """Prediction units of one forward pass.

    Attributes:
        logits: ``[N, C]`` logits of the N units.
        targets: ``[N]`` target class / token of each unit.
        owner: ``[N]`` batch row (0..B-1) each unit belongs to.
        batch_size: B.
        features: ``[B, D]`` penultimate features, when requested.
    """

    logits: torch.Tensor
    targets: torch.Tensor
    owner: torch.Tensor
    batch_size: int
    features: torch.Tensor | None = None

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
        """``[B]`` mean cross-entropy over each sample's units (answer tokens for an LM)."""
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


class Task(ABC):
    """A model family's adapter. Subclasses define how to collate items, call the model and read its output."""

    name: str = "task"

    @abstractmethod
    def collate(self, items: list[Any]) -> Any:
        """Collate the user's dataset items (without ids) into the data part of a batch."""

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
        weights, not only the summed loss. Adapters that cannot provide them raise ``NotImplementedError``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not expose its prediction units (dense_units)")

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
        raise NotImplementedError(f"{type(self).__name__} does not provide features")

    def labels_of(self, data: Any) -> torch.Tensor | None:
        """Per-sample class labels where the task has them (classification), else None."""
        return None

    # Convenience wrappers (one forward each).
    def per_sample_loss(self, model: nn.Module, data: Any) -> torch.Tensor:
        return self.forward(model, data).sample_loss()

    def features(self, model: nn.Module, data: Any) -> torch.Tensor:
        out = self.forward(model, data, features=True)
        assert out.features is not None
        return out.features

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
