"""Shared pieces of the inference-time strategies (``dexperts``, ``activation_steering``) and the locate-and-edit
ones (``causal_tracing``, ``attention_surgery``): a wrapper base class whose forward returns the model's output with
new logits (so task adapters, ``evaluate`` and ``model_hash`` accept it unchanged), a greedy ``generate`` for causal
LMs, and helpers to read and replace a module's activation.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from erasus_ray.errors import InvalidConfigError
from erasus_ray.strategies.base import UnlearnContext
from erasus_ray.tasks.base import output_tensor
from erasus_ray.tasks.causal_lm import IGNORE, GreedyGenerate, accepts_position_ids


def logits_of(raw: Any) -> torch.Tensor:
    """The logits of a model's raw output (a tensor, an object with ``.logits`` or a tuple led by the logits)."""
    return output_tensor(raw, "logits", "cannot read logits from this model output")


def with_logits(raw: Any, logits: torch.Tensor) -> Any:
    """``raw`` with its logits replaced, keeping its type (tensor, Hugging Face ``ModelOutput``, tuple)."""
    if isinstance(raw, torch.Tensor):
        return logits
    if isinstance(getattr(raw, "logits", None), torch.Tensor):
        raw.logits = logits  # ModelOutput keeps attribute and key in sync
        return raw
    if isinstance(raw, tuple):
        return (logits, *raw[1:])
    if isinstance(raw, list):
        return [logits, *raw[1:]]
    raise InvalidConfigError(f"cannot replace logits in a model output of type {type(raw).__name__}")


def first_tensor(output: Any) -> torch.Tensor:
    """The activation a module produced (transformer blocks return tuples led by the hidden state)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InvalidConfigError(f"the hooked module returned {type(output).__name__}, not a tensor")


def replace_first(output: Any, value: torch.Tensor) -> Any:
    """``output`` with its leading tensor replaced by ``value`` (same container type)."""
    if isinstance(output, torch.Tensor):
        return value
    if isinstance(output, tuple):
        return (value, *output[1:])
    return [value, *output[1:]]


def get_module(model: nn.Module, name: str, who: str) -> nn.Module:
    """``model.get_submodule(name)`` with an error that names the argument and lists some valid names."""
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        names = [n for n, _ in model.named_modules() if n][:40]
        raise InvalidConfigError(f"{who}: layer {name!r} is not a module of the model; some names: {names}") from err


def head_module(ctx: UnlearnContext, model: nn.Module | None = None) -> nn.Module:
    """The module whose *input* is the adapter's penultimate feature: a classifier's head, an LM's output embedding."""
    return ctx.task.head_module(model or ctx.model)


def answer_position_mask(data: Any, length: int) -> torch.Tensor | None:
    """``[B, T]`` float mask of the LM positions whose logits predict a supervised token (None for a classifier).

    Rows without any supervised token fall back to their attention mask.
    """
    if not isinstance(data, dict) or "labels" not in data:
        return None
    labels = data["labels"]
    mask = torch.zeros(labels.shape[0], length, dtype=torch.float32, device=labels.device)
    mask[:, : length - 1] = (labels[:, 1:length] != IGNORE).float()  # position t predicts token t + 1
    empty = mask.sum(1) == 0
    if bool(empty.any()):
        mask[empty] = data["attention_mask"][empty, :length].float()
    return mask


def pooled(acts: torch.Tensor, data: Any) -> torch.Tensor:
    """``[B, D]``: a classifier's ``[B, D]`` activation as is; an LM's ``[B, T, D]`` averaged over the positions that
    predict supervised (answer) tokens. Other shapes are flattened to ``[B, -1]``."""
    if acts.ndim == 3 and isinstance(data, dict):
        mask = answer_position_mask(data, acts.shape[1]).to(acts.device, acts.dtype)
        return (acts * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    return acts.flatten(1)


def copy_config_for_wrapper(model: nn.Module) -> Any:
    """The base model's config with ``architectures`` naming the base class, so ``get_task('auto', wrapper)``
    resolves the wrapper to the same adapter as the base model."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    config = copy.copy(config)
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]
    return config


def sub_context(ctx: UnlearnContext, model: nn.Module) -> UnlearnContext:
    """A copy of ``ctx`` that trains ``model`` instead (fresh scratch state)."""
    return replace(ctx, model=model, state={})


class InferenceWrapper(GreedyGenerate, nn.Module):
    """Base class of the models that inference-time strategies return.

    Subclasses implement :meth:`combine` (raw outputs of the members -> logits). ``forward`` takes the base model's
    arguments and returns the base model's output type with the new logits, so task adapters, ``evaluate`` and
    ``model_hash`` (its ``state_dict`` holds every member and the coefficients as buffers) work unchanged. For
    Hugging Face causal LMs :meth:`generate` decodes greedily with the combined logits (no KV cache: one full
    forward of every member per new token, fine for evaluation-size prompts).
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.config = copy_config_for_wrapper(base)
        self.generation_config = copy.deepcopy(getattr(base, "generation_config", None))
        self._takes_positions = accepts_position_ids(base)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def _decode_positions(self) -> bool:  # greedy generate (GreedyGenerate) with the wrapper's logits
        return self._takes_positions
