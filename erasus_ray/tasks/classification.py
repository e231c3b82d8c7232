"""Adapter for classifiers: items are ``(x, y)``, the model maps ``x`` to ``[B, C]`` logits; or, for token encoders
(Hugging Face ``*ForSequenceClassification``), dict items ``{input_ids, attention_mask?, labels}`` right-padded into a
dict batch whose ``input_ids`` / ``attention_mask`` are the model's keyword inputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from erasus_ray.errors import InvalidDataError, TaskMismatchError
from erasus_ray.tasks._images import check_image, expected_clip_shape
from erasus_ray.tasks.base import Task, TaskOutput, at_least_fp32, output_tensor
from erasus_ray.tasks.capabilities import Capability as C
from erasus_ray.tasks.registry import register_task


def _logits_of(raw: Any) -> torch.Tensor:
    return output_tensor(raw, "logits", "classification task expects the model to return logits [B, C]")


#: Hugging Face model classes whose forward maps one input tensor to ``[B, C]`` logits.
_HF_CLASSIFIER_SUFFIXES = ("ForImageClassification", "ForSequenceClassification", "ForAudioClassification",
                           "ForVideoClassification")


def _is_transformers_model(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__[1:]) and hasattr(model, "config")


@register_task("classification")
class ClassificationTask(Task):
    """Classification: one prediction unit per sample; items are ``(x, y)``, the model maps ``x`` to ``[B, C]``.

    ``task="auto"`` picks it for plain ``nn.Module`` models and Hugging Face ``*For...Classification`` models
    (called with the input tensor alone, or, for dict items, with ``input_ids`` and ``attention_mask``; the output
    object's ``logits`` are read).

    Args:
        head: name of the module whose *input* is the penultimate feature (default: the last ``nn.Linear``).
        pad_token_id: id that right-pads dict items' ``input_ids`` (attention 0 there); read from the model's
            config by :meth:`from_model`.
        sampling_rate: the rate (Hz) an audio model was trained at. An input given as a Hugging Face ``datasets``
            audio record ``{"array": waveform, "sampling_rate": hz}`` must match it (16 kHz for Wav2Vec2 / Whisper
            checkpoints); a waveform at another rate would be read as a different sound, so it is an error, not a
            silent resample. None: such records are accepted at any rate.
        input_shape: the shape every tensor input must have, checked in :meth:`collate` with an error naming the item
            and both shapes; :meth:`from_model` reads a video model's ``(frames, channels, height, width)`` from its
            config (VideoMAE's position embeddings fit one clip length and size: another would fail deep in the
            model with a bare size mismatch). None: not checked.
    """

    capabilities = frozenset({C.LOGITS, C.LABELS, C.FEATURES, C.HEAD, C.INDEPENDENT, C.INPUT, C.MODEL_LOGITS})
    #: the fallback for any plain module: every adapter that matches a model more specifically wins over it
    match_priority = -10
    default_metrics = ("forget_acc", "forget_loss", "retain_acc", "retain_loss", "test_acc", "test_loss",
                       "mia_loss_auc", "mia_svc_efficacy")
    gap_metrics = ("forget_acc", "retain_acc", "test_acc", "mia_svc_efficacy")
    display_metrics = ("forget_acc", "retain_acc", "test_acc", "mia_svc_efficacy", "mia_loss_auc")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if not _is_transformers_model(model):
            return True
        return type(model).__name__.endswith(_HF_CLASSIFIER_SUFFIXES)

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs: Any) -> "ClassificationTask":
        """The adapter for ``model``, with a Hugging Face model's ``pad_token_id`` (for dict items) and a video model's
        clip shape (``input_shape``) unless given."""
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        if "pad_token_id" not in kwargs and isinstance(pad, int):
            kwargs["pad_token_id"] = pad
        kwargs.setdefault("input_shape", expected_clip_shape(model))
        return cls(**kwargs)

    def __init__(self, head: str | None = None, pad_token_id: int = 0, sampling_rate: int | None = None,
                 input_shape: tuple[int, ...] | None = None) -> None:
        self.head = head
        self.pad_token_id = int(pad_token_id)
        self.sampling_rate = None if sampling_rate is None else int(sampling_rate)
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)

    def _waveform(self, record: dict, row: int) -> torch.Tensor:
        """The waveform of an audio record, checked against :attr:`sampling_rate`."""
        if "array" not in record:
            raise InvalidDataError(f"classification item {row}: a dict input must be an audio record "
                                   f"{{'array': waveform, 'sampling_rate': hz}}; got keys {sorted(record)}")
        rate = record.get("sampling_rate")
        if self.sampling_rate is not None and rate != self.sampling_rate:
            raise InvalidDataError(f"classification item {row}: audio sampled at {rate} Hz, but the model expects "
                                   f"{self.sampling_rate} Hz (sampling_rate): resample it first")
        return torch.as_tensor(record["array"], dtype=torch.float32)

    def collate(self, items: list[Any]) -> Any:
        if isinstance(items[0], dict):
            return self._collate_tokens(items)
        if isinstance(items[0], (tuple, list)) and isinstance(items[0][0], dict):
            items = [(self._waveform(it[0], row), *it[1:]) for row, it in enumerate(items)]
        elif self.input_shape is not None and isinstance(items[0], (tuple, list)):
            items = [(check_image(it[0], self.input_shape, f"classification item {row}", "pixel_values", "clips",
                                  "frames, channels, height, width"), *it[1:]) for row, it in enumerate(items)]
        x, y = default_collate(items)[:2] if isinstance(items[0], (tuple, list)) else (None, None)
        if x is None:
            raise TaskMismatchError("classification items must be (input, label) pairs or dicts with input_ids and labels")
        return x, torch.as_tensor(y).long()

    def _collate_tokens(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Dict items (a token encoder's) right-padded to the batch's longest: ``input_ids``, ``attention_mask``
        (1 on tokens, or the item's own mask), ``labels`` ``[B]``."""
        if "input_ids" not in items[0] or "labels" not in items[0]:
            raise TaskMismatchError(f"classification dict items need 'input_ids' and 'labels', got keys {sorted(items[0])}")
        seqs = [torch.as_tensor(it["input_ids"], dtype=torch.long).reshape(-1) for it in items]
        input_ids = torch.full((len(seqs), max(len(q) for q in seqs)), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, (item, seq) in enumerate(zip(items, seqs)):
            input_ids[row, :len(seq)] = seq
            mask = item.get("attention_mask")
            attention[row, :len(seq)] = 1 if mask is None else torch.as_tensor(mask, dtype=torch.long).reshape(-1)
        labels = torch.as_tensor([int(torch.as_tensor(it["labels"])) for it in items], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    def model_inputs(self, data: Any) -> tuple[tuple, dict]:
        if isinstance(data, dict):
            return (), {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
        return (data[0],), {}

    def labels_of(self, data: Any) -> torch.Tensor:
        return data["labels"] if isinstance(data, dict) else data[1]

    def relabel(self, data: Any, labels: torch.Tensor) -> Any:
        if isinstance(data, dict):
            return {**data, "labels": labels.to(data["labels"].device)}
        return data[0], labels.to(data[1].device)

    def read_output(self, raw: Any, data: Any, *, features: torch.Tensor | None = None) -> TaskOutput:
        logits = _logits_of(raw)
        targets = self.labels_of(data).to(logits.device)
        if logits.ndim != 2 or logits.shape[0] != targets.shape[0]:
            raise TaskMismatchError(
                f"classification task expects logits of shape [B, C] with B={targets.shape[0]}; "
                f"the model returned {tuple(logits.shape)}"
            )
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
            raise TaskMismatchError(
                f"labels range over [{int(targets.min())}, {int(targets.max())}] but the model has "
                f"{logits.shape[1]} output classes"
            )
        owner = torch.arange(targets.shape[0], device=logits.device)
        return TaskOutput(logits, targets, owner, int(targets.shape[0]), features)

    def dense_sample_loss(self, raw: Any, data: Any) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(at_least_fp32(_logits_of(raw)), self.labels_of(data), reduction="none")

    def dense_units(self, raw: Any, data: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = at_least_fp32(_logits_of(raw))
        return logits[:, None], self.labels_of(data)[:, None], torch.ones(logits.shape[0], 1, dtype=logits.dtype, device=logits.device)

    def head_module(self, model: nn.Module) -> nn.Module:
        if self.head is not None:
            return model.get_submodule(self.head)
        last = None
        for module in model.modules():
            if isinstance(module, nn.Linear):
                last = module
        if last is None:
            raise TaskMismatchError("no nn.Linear head found for features; pass ClassificationTask(head='name')")
        return last

    def _forward_with_features(self, model: nn.Module, args: tuple, kwargs: dict, data: Any) -> TaskOutput:
        captured: list[torch.Tensor] = []
        handle = self.head_module(model).register_forward_hook(lambda m, i, o: captured.append(i[0]))
        try:
            raw = model(*args, **kwargs)
        finally:
            handle.remove()
        feats = captured[-1].flatten(1)
        return self.read_output(raw, data, features=feats)
