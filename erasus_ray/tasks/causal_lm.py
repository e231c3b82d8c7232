"""Adapter for Hugging Face causal LMs (GPT-2, Llama, ...): dict batches, shifted labels, masked padding.

Items are dicts with ``input_ids`` and optionally ``attention_mask``, ``labels`` (``-100`` = not supervised) and
``answer_start`` (index of the first answer token, for answer-only loss and for prompting generation).
Position ``t``'s logits predict token ``t+1``; padding and ``-100`` labels are never supervised.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from erasus_ray.errors import InvalidConfigError, TaskMismatchError
from erasus_ray.tasks.base import Task, TaskOutput, at_least_fp32
from erasus_ray.tasks.capabilities import Capability as C
from erasus_ray.tasks.registry import register_task

IGNORE = -100


def looks_like_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face causal LM, by its config's architectures or its class name (``*CausalLM``, ``*LMHeadModel``)."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    archs = getattr(config, "architectures", None) or []
    cls = type(model).__name__
    return any("CausalLM" in a or "LMHead" in a for a in archs) or "CausalLM" in cls or "LMHeadModel" in cls


@register_task("causal_lm")
class CausalLMTask(Task):
    """Causal language modelling: one prediction unit per supervised (shifted) label token.

    Args:
        pad_token_id: id used to right-pad ``input_ids`` (its positions get attention 0 and label -100).
        answer_only: when an item has ``answer_start``, supervise only tokens from there on.
        tokenizer: optional tokenizer of the model, for strategies that tokenise text of their own (e.g. the refusal
            answers of ``idk_dpo`` / ``flat``); never used to read batches.
    """

    capabilities = frozenset({C.LOGITS, C.FEATURES, C.HEAD, C.INDEPENDENT, C.TOKENS, C.GENERATION, C.INPUT,
                              C.MODEL_LOGITS})
    match_priority = 10
    default_metrics = tuple(f"{s}_{m}" for s in ("forget", "retain", "test") for m in ("loss", "prob", "rougeL")) + (
        "mia_mink_auc", "mia_loss_auc")
    gap_metrics = ("forget_rougeL", "retain_rougeL", "forget_prob", "retain_prob", "mia_mink_auc")
    display_metrics = ("forget_rougeL", "retain_rougeL", "test_rougeL", "forget_loss", "retain_loss", "test_loss",
                       "mia_mink_auc")
    eval_batch_size = 32  # [B, T, V] logits

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return looks_like_causal_lm(model)

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs: Any) -> "CausalLMTask":
        """The adapter for ``model``, with the pad token id read from its config (else its EOS id) unless given."""
        config = getattr(model, "config", None)
        pad = getattr(config, "pad_token_id", None)
        if pad is None:
            pad = getattr(config, "eos_token_id", None)
        if "pad_token_id" not in kwargs and isinstance(pad, int):
            kwargs["pad_token_id"] = pad
        return cls(**kwargs)

    def __init__(self, pad_token_id: int = 0, answer_only: bool = True, tokenizer: Any = None) -> None:
        self.pad_token_id = int(pad_token_id)
        self.answer_only = answer_only
        self.tokenizer = tokenizer

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        if not isinstance(items[0], dict) or "input_ids" not in items[0]:
            raise TaskMismatchError("causal_lm items must be dicts with 'input_ids'")
        seqs = [torch.as_tensor(it["input_ids"], dtype=torch.long).reshape(-1) for it in items]
        length = max(len(s) for s in seqs)
        n = len(seqs)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((n, length), dtype=torch.long)
        labels = torch.full((n, length), IGNORE, dtype=torch.long)
        answer_start = torch.zeros(n, dtype=torch.long)
        for row, (item, seq) in enumerate(zip(items, seqs)):
            m = len(seq)
            input_ids[row, :m] = seq
            mask = item.get("attention_mask")
            attention[row, :m] = 1 if mask is None else torch.as_tensor(mask, dtype=torch.long).reshape(-1)
            lab = item.get("labels")
            lab = seq.clone() if lab is None else torch.as_tensor(lab, dtype=torch.long).reshape(-1)
            lab = torch.where(attention[row, :m] > 0, lab, torch.full_like(lab, IGNORE))
            start = int(item.get("answer_start", 0))
            answer_start[row] = start
            if self.answer_only and start > 0:
                lab[:start] = IGNORE
            labels[row, :m] = lab
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "answer_start": answer_start}

    def model_inputs(self, data: Any) -> tuple[tuple, dict]:
        return (), {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}

    def functional_inputs(self, data: Any) -> tuple[tuple, dict]:
        # Padding is on the right and attention is causal, so a sample's supervised logits are the same with or
        # without the mask; dropping it avoids the mask-building control flow that vmap cannot trace.
        return (), {"input_ids": data["input_ids"]}

    @contextlib.contextmanager
    def functional_context(self, model: nn.Module) -> Iterator[None]:
        # Hugging Face models check ``pad_token_id in input_ids`` to warn about missing masks; that data-dependent
        # check cannot run under vmap, and right padding needs no mask (see functional_inputs).
        config = getattr(model, "config", None)
        pad = getattr(config, "pad_token_id", None)
        if config is not None and pad is not None:
            config.pad_token_id = None
        try:
            yield
        finally:
            if config is not None and pad is not None:
                config.pad_token_id = pad

    def batch_size(self, data: Any) -> int:
        return int(data["input_ids"].shape[0])

    @staticmethod
    def shifted_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, cols)`` of logits positions that are supervised, i.e. where ``labels[:, 1:] != -100``."""
        shifted = labels[:, 1:]
        rows, cols = (shifted != IGNORE).nonzero(as_tuple=True)
        return rows, cols

    def read_output(self, raw: Any, data: Any, *, features: torch.Tensor | None = None) -> TaskOutput:
        logits = getattr(raw, "logits", raw)
        labels = data["labels"].to(logits.device) if isinstance(logits, torch.Tensor) else None
        if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or logits.shape[:2] != labels.shape:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(raw).__name__
            raise TaskMismatchError(
                f"causal_lm task expects logits [B, T, V] matching input_ids {tuple(data['input_ids'].shape)}; got {shape}"
            )
        rows, cols = self.shifted_targets(labels)
        targets = labels[rows, cols + 1]
        if targets.numel() and int(targets.max()) >= logits.shape[-1]:
            raise TaskMismatchError(f"label token {int(targets.max())} >= vocabulary size {logits.shape[-1]}")
        return TaskOutput(logits[rows, cols], targets, rows, int(labels.shape[0]), features)

    def dense_sample_loss(self, raw: Any, data: Any) -> torch.Tensor:
        logits = at_least_fp32(getattr(raw, "logits", raw)[:, :-1])
        labels = data["labels"][:, 1:]
        mask = (labels != IGNORE).float()
        unit = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.clamp_min(0).reshape(-1), reduction="none"
        ).view_as(mask)
        return (unit * mask).sum(1) / mask.sum(1).clamp_min(1)

    def dense_units(self, raw: Any, data: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # every position but the last is a unit; unsupervised ones (padding, prompt) get weight 0
        logits = at_least_fp32(getattr(raw, "logits", raw)[:, :-1])
        labels = data["labels"][:, 1:]
        mask = (labels != IGNORE).to(logits.dtype)
        return logits, labels.clamp_min(0), mask / mask.sum(1, keepdim=True).clamp_min(1)

    def _forward_with_features(self, model: nn.Module, args: tuple, kwargs: dict, data: Any) -> TaskOutput:
        raw = model(*args, **kwargs, output_hidden_states=True)
        hidden = raw.hidden_states[-1]
        labels = data["labels"].to(hidden.device)
        # Mean of the final hidden state over the positions that predict supervised tokens.
        mask = torch.zeros_like(labels, dtype=hidden.dtype)
        mask[:, :-1] = (labels[:, 1:] != IGNORE).to(hidden.dtype)
        empty = mask.sum(1) == 0
        mask[empty] = data["attention_mask"].to(hidden.device)[empty].to(hidden.dtype)
        feats = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return self.read_output(raw, data, features=feats)

    def head_module(self, model: nn.Module) -> nn.Module:
        """The output embedding (``lm_head``): its input is the final hidden state, the adapter's feature."""
        get_out = getattr(model, "get_output_embeddings", None)
        out = get_out() if get_out is not None else None
        if out is None:
            raise TaskMismatchError(f"causal_lm: {type(model).__name__} has no get_output_embeddings() head")
        return out

    def prompts(self, data: Any) -> list[torch.Tensor]:
        """The prompt (tokens before ``answer_start``) of each row, for generation."""
        out = []
        for row in range(data["input_ids"].shape[0]):
            start = int(data["answer_start"][row])
            out.append(data["input_ids"][row, :start] if start > 0 else data["input_ids"][row, :1])
        return out


def accepts_position_ids(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``position_ids`` (Hugging Face causal LMs do)."""
    import inspect

    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def greedy_decode(
    forward: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 20,
    pad_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    position_ids: bool = True,
) -> torch.Tensor:
    """Greedy decoding with any model-like ``forward(input_ids=, attention_mask=[, position_ids=])`` whose output is
    logits ``[B, T, V]`` (a tensor or an object with ``.logits``): the subset of Hugging Face ``generate`` that
    evaluation uses, for wrappers and ensembles that have no ``generate`` of their own. Left padding is handled as
    Hugging Face does (``position_ids`` from the attention mask, when ``position_ids=True``); finished rows are
    padded with ``pad_token_id``. Returns ``[B, prompt + new]``. No KV cache: one full forward per new token, fine
    for evaluation-size answers."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    eos = sorted({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or []))
    pad = 0 if pad_token_id is None else int(pad_token_id)
    ids = input_ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(int(max_new_tokens)):
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if position_ids:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
        raw = forward(**kwargs)
        nxt = getattr(raw, "logits", raw)[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, (~done).to(mask.dtype)[:, None]], dim=1)
        if eos:
            done = done | torch.isin(nxt, torch.tensor(eos, device=nxt.device))
            if bool(done.all()):
                break
    return ids


class GreedyGenerate:
    """``generate`` for model-like wrappers and ensembles without one of their own (a mixin for ``nn.Module``
    subclasses): :func:`greedy_decode` on the wrapper's own forward; sampling and beam search are refused, not
    ignored. Subclasses say, through :meth:`_decode_positions`, whether their forward takes ``position_ids``."""

    def _decode_positions(self) -> bool:
        return True

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 20,
        pad_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        do_sample: bool = False,
        num_beams: int = 1,
        **_: Any,
    ) -> torch.Tensor:
        """Greedy decoding: ``[B, prompt + new]`` token ids, finished rows padded with ``pad_token_id``."""
        if do_sample or num_beams != 1:
            raise InvalidConfigError(f"{type(self).__name__}.generate decodes greedily only (do_sample=False, num_beams=1)")
        return greedy_decode(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                             eos_token_id=eos_token_id, position_ids=self._decode_positions())
