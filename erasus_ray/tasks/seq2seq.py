"""Adapter for Hugging Face encoder-decoder models (T5, BART, Whisper, ...): teacher-forced label tokens are the units.

Items are dicts with ``labels`` and the encoder input: ``input_ids`` (text, optionally ``attention_mask``) or
``input_features`` (audio, e.g. Whisper's log-mel frames, equal shapes within a batch). The decoder reads the labels
shifted right behind ``decoder_start_token_id`` (T5's ``_shift_right``); logits at position ``t`` predict label ``t``
(no causal shift of the output, unlike :mod:`~erasus_ray.tasks.causal_lm`). Label ``-100`` and padding are never
supervised. The feature of a sample is the mean of the encoder's last hidden state over its unpadded positions.
Generation is greedy decoding from the encoder input (:meth:`Seq2SeqTask.greedy_decode`: transcripts, translations),
which the word error rate (``<split>_wer``, :mod:`~erasus_ray.evaluation.asr`) reads.

Cost: one encoder and one teacher-forced decoder pass per batch.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from erasus_ray.errors import TaskMismatchError
from erasus_ray.tasks.base import Task, TaskOutput, at_least_fp32
from erasus_ray.tasks.capabilities import Capability as C
from erasus_ray.tasks.causal_lm import IGNORE
from erasus_ray.tasks.registry import register_task
from erasus_ray.utils import model_device


def _rows(items: list[dict], key: str, pad: int) -> torch.Tensor:
    return pad_sequence([torch.as_tensor(it[key], dtype=torch.long).reshape(-1) for it in items], batch_first=True,
                        padding_value=pad)


@register_task("seq2seq")
class Seq2SeqTask(Task):
    """Encoder-decoder sequence-to-sequence objective: mean cross-entropy over a sample's label tokens.

    ``task="auto"`` picks it for every model whose config says ``is_encoder_decoder`` (T5, BART, Whisper, ...).

    Args:
        pad_token_id: pads ``input_ids`` and the decoder inputs.
        decoder_start_token_id: the first decoder input (T5: the pad id; Whisper: ``<|startoftranscript|>``).
    """

    capabilities = frozenset({C.LOGITS, C.FEATURES, C.INDEPENDENT, C.MODEL_LOGITS, C.GENERATION})
    # above the causal LM (an encoder-decoder is not a decoder-only LM, whatever its class name says)
    match_priority = 15

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs: Any) -> "Seq2SeqTask":
        """The adapter with the pad and decoder-start ids read from the model's config unless given."""
        config = getattr(model, "config", None)
        for key in ("pad_token_id", "decoder_start_token_id"):
            value = getattr(config, key, None)
            if key not in kwargs and isinstance(value, int):
                kwargs[key] = value
        return cls(**kwargs)

    def __init__(self, pad_token_id: int = 0, decoder_start_token_id: int | None = None) -> None:
        self.pad_token_id = int(pad_token_id)
        self.decoder_start_token_id = self.pad_token_id if decoder_start_token_id is None else int(decoder_start_token_id)

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        first = items[0]
        if not isinstance(first, dict) or "labels" not in first or not ({"input_ids", "input_features"} & set(first)):
            raise TaskMismatchError("seq2seq items must be dicts with 'labels' and 'input_ids' or 'input_features'")
        labels = _rows(items, "labels", IGNORE)
        start = torch.full((len(items), 1), self.decoder_start_token_id, dtype=torch.long)
        data = {"labels": labels, "decoder_input_ids": torch.cat([start, labels[:, :-1]], 1)}
        data["decoder_input_ids"].masked_fill_(data["decoder_input_ids"] == IGNORE, self.pad_token_id)
        if "input_features" in first:
            data["input_features"] = torch.stack([torch.as_tensor(it["input_features"]) for it in items])
            return data
        data["input_ids"] = _rows(items, "input_ids", self.pad_token_id)
        lengths = torch.tensor([torch.as_tensor(it["input_ids"]).numel() for it in items])
        data["attention_mask"] = (torch.arange(data["input_ids"].shape[1]) < lengths[:, None]).long()
        return data

    def model_inputs(self, data: Any) -> tuple[tuple, dict]:
        keys = ("input_features",) if "input_features" in data else ("input_ids", "attention_mask")
        return (), {**{k: data[k] for k in keys}, "decoder_input_ids": data["decoder_input_ids"]}

    def functional_inputs(self, data: Any) -> tuple[tuple, dict]:
        # Hugging Face turns a 2D padding mask into a 4D one behind a data-dependent "is anything padded?" check that
        # vmap cannot trace; an already prepared 4D additive mask is used as it is (same numbers, no check).
        args, kwargs = self.model_inputs(data)
        if "attention_mask" in kwargs:
            mask = kwargs["attention_mask"][:, None, None, :].float()
            kwargs["attention_mask"] = (1.0 - mask) * torch.finfo(torch.float32).min
        return args, kwargs

    def batch_size(self, data: Any) -> int:
        return int(data["labels"].shape[0])

    def read_output(self, raw: Any, data: Any, *, features: torch.Tensor | None = None) -> TaskOutput:
        logits = getattr(raw, "logits", raw)
        labels = data["labels"]
        if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or logits.shape[:2] != labels.shape:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(raw).__name__
            raise TaskMismatchError(f"seq2seq task expects decoder logits [B, T, V] matching labels {tuple(labels.shape)}; got {shape}")
        labels = labels.to(logits.device)
        rows, cols = (labels != IGNORE).nonzero(as_tuple=True)
        targets = labels[rows, cols]
        if targets.numel() and int(targets.max()) >= logits.shape[-1]:
            raise TaskMismatchError(f"label token {int(targets.max())} >= vocabulary size {logits.shape[-1]}")
        return TaskOutput(logits[rows, cols], targets, rows, int(labels.shape[0]), features)

    def dense_units(self, raw: Any, data: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = at_least_fp32(getattr(raw, "logits", raw))
        labels = data["labels"]
        mask = (labels != IGNORE).to(logits.dtype)
        return logits, labels.clamp_min(0), mask / mask.sum(1, keepdim=True).clamp_min(1)

    def dense_sample_loss(self, raw: Any, data: Any) -> torch.Tensor:
        logits, targets, weights = self.dense_units(raw, data)
        unit = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        return (unit.view_as(weights) * weights).sum(1)

    @torch.no_grad()
    def greedy_decode(self, model: nn.Module, data: Any, max_new_tokens: int, eos_token_ids: Iterable[int]) -> list[list[int]]:
        """Each sample's greedy output tokens after the decoder start, cut before the first of ``eos_token_ids``, at
        most ``max_new_tokens``, from a collated batch. A plain loop over the model's forward rather than
        ``model.generate``: Whisper's ``generate`` adds language / task prompts and timestamp rules that a model built
        from a small config lacks, and the loop runs on any encoder-decoder (or a scripted stand-in). Cost: up to
        ``max_new_tokens`` encoder + decoder passes (no cache: the sequences here are a few tokens), ending early once
        every row has ended."""
        eos = set(int(t) for t in eos_token_ids)
        device = model_device(model)
        _, kwargs = self.model_inputs(data)
        inputs = {k: v.to(device) for k, v in kwargs.items() if k != "decoder_input_ids"}
        tokens = torch.full((self.batch_size(data), 1), self.decoder_start_token_id, dtype=torch.long, device=device)
        for _ in range(max_new_tokens):
            logits = model(**inputs, decoder_input_ids=tokens).logits[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
            if all(eos & set(row) for row in tokens[:, 1:].tolist()):
                break
        return [next((row[:i] for i, t in enumerate(row) if t in eos), row) for row in tokens[:, 1:].tolist()]

    def _forward_with_features(self, model: nn.Module, args: tuple, kwargs: dict, data: Any) -> TaskOutput:
        raw = model(*args, **kwargs)
        hidden = raw.encoder_last_hidden_state
        mask = data.get("attention_mask")
        mask = torch.ones(hidden.shape[:2], device=hidden.device) if mask is None else mask.to(hidden.device)
        mask = mask.to(hidden.dtype).unsqueeze(-1)
        return self.read_output(raw, data, features=(hidden * mask).sum(1) / mask.sum(1).clamp_min(1))

    def __repr__(self) -> str:
        return f"Seq2SeqTask(pad_token_id={self.pad_token_id}, decoder_start_token_id={self.decoder_start_token_id})"
