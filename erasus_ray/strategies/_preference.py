"""Preference pairs and per-sample reductions shared by the LLM unlearning objectives.

Preference-style unlearning (DPO, IdkPO, AltPO, FLAT) compares the forget response ``y_r`` ("rejected") of a
forget sample with one or more *chosen* responses ``y_c`` to the same input. This module builds those chosen
responses offline, once per run, and keys them by sample id:

* **Causal LM.** A forget row is split into its prompt (tokens before ``answer_start``; at least the first token)
  and its answer. A chosen row is ``prompt + response`` with ``answer_start = len(prompt)``, collated by the task
  adapter, so only the response tokens are supervised. Responses are token-id lists and come from

  - ``"refusal"``: a fixed list of "I don't know"-style strings, each tokenised as ``" " + text`` (answers in the
    authors benchmark start with a space) followed by eos, with the tokenizer passed to the strategy or the
    task's ``tokenizer`` attribute; or explicit ``refusal_ids``. Without either, the refusal is the empty answer
    (eos only: the model stops instead of stating the fact). One refusal per sample, drawn with ``(seed, id)``.
  - ``"alternative"``: the answers of the ``k`` pool samples (retain set by default) whose prompts are most similar
    to the forget prompt (Jaccard similarity of the prompt token sets; ties broken with ``(seed, id)``), skipping
    answers identical to the forget answer. In a templated QA set (authors: "In which city was X born?") these are
    other entities' answers to the same question: in-domain, plausible and false for this entity.

* **Classifier.** A response is a label: ``k`` distinct labels other than ``y``, drawn with ``(seed, id)``.

Cost: building the pairs is one pass over the forget set plus (``"alternative"``) one over the pool; reference
log-likelihoods of every chosen and rejected response are one frozen forward each, cached by id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from erasus_ray.data import Batch, IdDataset, make_loader
from erasus_ray.errors import InvalidConfigError
from erasus_ray.strategies.base import UnlearnContext
from erasus_ray.tasks import Capability, TaskOutput, require

#: Refusal answers in the style of TOFU's ``idontknow.jsonl`` (Maini et al. 2024).
DEFAULT_REFUSALS: tuple[str, ...] = (
    "I don't know.",
    "I'm not sure.",
    "I have no information about that.",
    "I cannot answer that.",
    "That is not something I know.",
)


#: What the preference objectives read: log-likelihoods of chosen and rejected responses (``sample_logprob``).
#: Responses are token sequences on a task with ``tokens``, other labels on one with ``labels`` (checked in
#: :func:`build_pairs`, which needs one of the two).
PREFERENCE_NEEDS = frozenset({Capability.LOSS, Capability.LOGITS})
#: ...and responses to compare: answer tokens (``tokens``) or class labels (``labels``), one of the two.
PREFERENCE_RESPONSES = frozenset({Capability.TOKENS, Capability.LABELS})


def has_tokens(ctx: UnlearnContext) -> bool:
    """Whether the task's samples are token sequences with a prompt/answer split (responses are tokens), rather
    than inputs with a class label (responses are labels)."""
    return ctx.task.provides(Capability.TOKENS)


def sample_mean(out: TaskOutput, unit_values: torch.Tensor) -> torch.Tensor:
    """``[B]`` mean of ``unit_values`` over each sample's units (answer tokens; one unit for a classifier)."""
    return out._per_sample(unit_values, "mean")


def sample_sum(out: TaskOutput, unit_values: torch.Tensor) -> torch.Tensor:
    return out._per_sample(unit_values, "sum")


def eos_id(ctx: UnlearnContext) -> int | None:
    for source in (getattr(ctx.model, "generation_config", None), getattr(ctx.model, "config", None)):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return int(eos[0] if isinstance(eos, (list, tuple)) else eos)
    return None


# --- reading rows ---------------------------------------------------------------------------------------------
def lm_rows(data: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(prompt, answer)`` token tensors of every row of a collated causal-LM batch (padding removed)."""
    rows = []
    for r in range(data["input_ids"].shape[0]):
        length = int(data["attention_mask"][r].sum())
        start = max(int(data["answer_start"][r]), 1)
        ids = data["input_ids"][r, :length].cpu()
        rows.append((ids[:start], ids[start:]))
    return rows


def iter_rows(ctx: UnlearnContext, dataset: IdDataset, batch_size: int = 64):
    """``(id, prompt, answer)`` for an LM or ``(id, x, label)`` for a classifier, over ``dataset`` in row order."""
    for batch in make_loader(dataset, ctx.task.collate, batch_size=batch_size):
        ids = batch.ids.tolist()
        if has_tokens(ctx):
            for i, (prompt, answer) in zip(ids, lm_rows(batch.data)):
                yield i, prompt, answer
        else:
            labels = ctx.task.labels_of(batch.data)
            for j, i in enumerate(ids):
                yield i, None, int(labels[j])


def chosen_batch(ctx: UnlearnContext, batch: Batch, responses: Sequence[Any]) -> Batch:
    """The batch with each row's response replaced by ``responses[row]`` (token ids for an LM, a label otherwise).

    LM rows become ``prompt + response`` with ``answer_start = len(prompt)``; ids and weights are kept.
    """
    if len(responses) != len(batch):
        raise InvalidConfigError(f"{len(responses)} responses for a batch of {len(batch)}")
    if has_tokens(ctx):
        items = []
        conditions = ctx.task.condition_inputs(batch.data)  # e.g. the row's image: the new answer is about it
        for row, ((prompt, _), resp) in enumerate(zip(lm_rows(batch.data), responses)):
            seq = torch.cat([prompt, torch.as_tensor(list(resp), dtype=torch.long)])
            items.append({**{k: v[row].cpu() for k, v in conditions.items()}, "input_ids": seq, "answer_start": len(prompt)})
        data = ctx.task.collate(items)
        return Batch(batch.ids, data, batch.weights).to(ctx.device)
    labels = torch.as_tensor([int(r) for r in responses], dtype=torch.long)
    return Batch(batch.ids, ctx.task.relabel(batch.data, labels), batch.weights)


# --- building responses ---------------------------------------------------------------------------------------
def refusal_token_ids(
    ctx: UnlearnContext,
    refusals: Sequence[str],
    tokenizer: Any = None,
    refusal_ids: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """Token ids of the refusal answers (see the module docstring for the order of sources)."""
    if refusal_ids is not None:
        out = [list(map(int, r)) for r in refusal_ids]
        if not out or any(len(r) == 0 for r in out):
            raise InvalidConfigError("refusal_ids must be a non-empty list of non-empty token-id lists")
        return out
    tokenizer = tokenizer if tokenizer is not None else getattr(ctx.task, "tokenizer", None)
    eos = eos_id(ctx)
    if tokenizer is None:
        if eos is None:
            raise InvalidConfigError(
                "no tokenizer for the refusal strings and no eos token: pass tokenizer= or refusal_ids="
            )
        return [[eos]]
    out = []
    for text in refusals:
        ids = list(tokenizer(" " + text, add_special_tokens=False)["input_ids"])
        tok_eos = getattr(tokenizer, "eos_token_id", None)
        end = tok_eos if tok_eos is not None else eos
        out.append(ids + ([int(end)] if end is not None else []))
    return out


def _rng(seed: int, sample_id: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(sample_id) & 0xFFFFFFFF])


def alternative_answers(
    ctx: UnlearnContext, forget: IdDataset, pool: IdDataset, k: int, seed: int
) -> dict[int, list[list[int]]]:
    """For each forget id, the answers of the ``k`` pool samples with the most similar prompts (module docstring)."""
    pool_rows = [(i, set(p.tolist()), a.tolist()) for i, p, a in iter_rows(ctx, pool)]
    out: dict[int, list[list[int]]] = {}
    for fid, prompt, answer in iter_rows(ctx, forget):
        fset, fans = set(prompt.tolist()), answer.tolist()
        noise = _rng(seed, fid).random(len(pool_rows)) * 1e-6
        scored = []
        for (pid, pset, pans), eps in zip(pool_rows, noise):
            if pid == fid or pans == fans or not pans:
                continue
            jac = len(fset & pset) / max(len(fset | pset), 1)
            scored.append((jac + eps, pans))
        scored.sort(key=lambda t: -t[0])
        picks = [ans for _, ans in scored[:k]]
        if not picks:
            raise InvalidConfigError(f"no alternative answer for forget id {fid}: the pool has no other answers")
        while len(picks) < k:  # a tiny pool: reuse the best ones
            picks.append(picks[len(picks) % max(len(scored), 1)])
        out[fid] = picks
    return out


def other_labels(label: int, n_classes: int, k: int, seed: int, sample_id: int) -> list[int]:
    """``k`` distinct labels other than ``label`` (with repetition only when ``k >= n_classes``), seeded by id."""
    if n_classes < 2:
        raise InvalidConfigError("a classifier needs at least 2 classes for a preference pair")
    others = [c for c in range(n_classes) if c != label]
    perm = _rng(seed, sample_id).permutation(len(others))
    return [others[perm[j % len(others)]] for j in range(k)]


@dataclass
class PreferencePairs:
    """Chosen responses and reference log-likelihoods, keyed by forget sample id.

    Attributes:
        chosen: id -> the ``k`` chosen responses (token-id lists for an LM, labels for a classifier).
        ref_rejected: id -> ``log pi_ref(y_r|x)`` of the forget response (summed over its tokens).
        ref_chosen: id -> ``[log pi_ref(y_c^j|x)]`` for each chosen response.
    """

    chosen: dict[int, list[Any]]
    ref_rejected: dict[int, float] = field(default_factory=dict)
    ref_chosen: dict[int, list[float]] = field(default_factory=dict)

    def responses(self, batch: Batch, j: int) -> list[Any]:
        return [self.chosen[int(i)][j] for i in batch.ids]

    def ref(self, batch: Batch, j: int | None, like: torch.Tensor) -> torch.Tensor:
        """Reference log-likelihoods for the batch: of the rejected response (``j=None``) or chosen response ``j``."""
        vals = [self.ref_rejected[int(i)] if j is None else self.ref_chosen[int(i)][j] for i in batch.ids]
        return torch.tensor(vals, device=like.device, dtype=like.dtype)


@torch.no_grad()
def build_pairs(
    ctx: UnlearnContext,
    source: str,
    *,
    k: int = 1,
    refusals: Sequence[str] = DEFAULT_REFUSALS,
    tokenizer: Any = None,
    refusal_ids: Sequence[Sequence[int]] | None = None,
    with_reference: bool = True,
) -> PreferencePairs:
    """Chosen responses for every forget sample (``source``: ``"refusal"`` or ``"alternative"``) and, with
    ``with_reference``, the current model's log-likelihoods of chosen and rejected responses (the reference)."""
    seed = int(ctx.seed)
    chosen: dict[int, list[Any]] = {}
    if not has_tokens(ctx):  # responses are then other labels
        require(ctx.task, {Capability.LABELS}, algorithm="a preference objective on a task without 'tokens'")
    if has_tokens(ctx):
        if source == "refusal":
            options = refusal_token_ids(ctx, refusals, tokenizer, refusal_ids)
            for fid, _, _ in iter_rows(ctx, ctx.forget):
                order = _rng(seed, fid).permutation(len(options))
                chosen[fid] = [options[order[j % len(options)]] for j in range(k)]
        elif source == "alternative":
            pool = ctx.retain if ctx.retain is not None and len(ctx.retain) else (ctx.full_forget or ctx.forget)
            chosen = alternative_answers(ctx, ctx.forget, pool, k, seed)
        else:
            raise InvalidConfigError(f"unknown chosen-response source {source!r}; known: refusal, alternative")
    else:
        first = next(iter(make_loader(ctx.forget, ctx.task.collate, batch_size=2))).to(ctx.device)
        n_classes = int(ctx.forward(first).logits.shape[-1])
        for fid, _, label in iter_rows(ctx, ctx.forget):
            chosen[fid] = other_labels(label, n_classes, k, seed, fid)
    pairs = PreferencePairs(chosen)
    if with_reference:
        was_training = ctx.model.training
        ctx.model.eval()
        for batch in make_loader(ctx.forget, ctx.task.collate, batch_size=64):
            batch = batch.to(ctx.device)
            ids = batch.ids.tolist()
            pairs.ref_rejected.update(zip(ids, ctx.forward(batch).sample_logprob().float().cpu().tolist()))
            per_j = [ctx.forward(chosen_batch(ctx, batch, pairs.responses(batch, j))).sample_logprob().float().cpu().tolist()
                     for j in range(k)]
            for row, i in enumerate(ids):
                pairs.ref_chosen[i] = [per_j[j][row] for j in range(k)]
        ctx.model.train(was_training)
    return pairs


def retain_nll(ctx: UnlearnContext, retain: Batch | None, alpha: float, like: torch.Tensor) -> torch.Tensor:
    """``alpha > 0``: mean NLL of the retain batch (the ``+RT`` term of TOFU-style objectives); else 0."""
    if retain is None or alpha <= 0:
        return like.new_zeros(())
    return ctx.forward(retain).sample_loss().mean()
