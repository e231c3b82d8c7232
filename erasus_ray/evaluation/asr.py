"""Word error rate (WER) for speech recognition: how a Whisper-style model's transcripts of forget vs retain
utterances compare (the audio part of the multimodal issue).

``WER = (substitutions + deletions + insertions) / reference words``, summed over a corpus before dividing (as
``jiwer`` and the NIST ``sclite`` scorer do, so long utterances weigh more than short ones), from the word-level
Levenshtein distance. It can exceed 1 (a hypothesis with many insertions). Cost: O(len(ref) * len(hyp)) per pair.

Registered as ``forget_wer`` / ``retain_wer`` / ``test_wer`` for task adapters that generate by greedy decoding from
an encoder input (``greedy_decode``: the seq2seq adapter, so Whisper transcripts); token ids count as words, so a
one-word utterance scores 0 or its edits. Each counts in Avg.Gap (forgetting moves forget WER towards the retrained
model's, and retain / test WER should stay).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from erasus_ray.data import make_loader
from erasus_ray.errors import InvalidDataError
from erasus_ray.evaluation.lm import _eos_ids, _max_new_tokens
from erasus_ray.evaluation.metrics import SPLITS, EvalContext, register_split_metric
from erasus_ray.tasks import Capability


def _words(text: str | Sequence[Any]) -> list[Any]:
    """A string's whitespace-separated words, or a sequence's items as they are (token ids count as words)."""
    return text.split() if isinstance(text, str) else list(text)


def word_edit_distance(reference: str | Sequence[Any], hypothesis: str | Sequence[Any]) -> int:
    """The fewest word substitutions, deletions and insertions that turn ``reference`` into ``hypothesis``."""
    ref, hyp = _words(reference), _words(hypothesis)
    prev = list(range(len(hyp) + 1))  # distance from the empty reference prefix: j insertions
    for i, r in enumerate(ref, start=1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            cur[j] = min(prev[j - 1] + (r != h), prev[j] + 1, cur[j - 1] + 1)
        prev = cur
    return prev[-1]


def word_error_rate(references: Sequence[str | Sequence[Any]], hypotheses: Sequence[str | Sequence[Any]]) -> float:
    """Corpus WER: total word edit distance over total reference words. Each reference / hypothesis is a string
    (split on whitespace) or a sequence of words or token ids. Refuses (InvalidDataError naming the argument) lists
    of different lengths and references without a single word."""
    if len(references) != len(hypotheses):
        raise InvalidDataError(f"references and hypotheses must pair up: {len(references)} references, "
                               f"{len(hypotheses)} hypotheses")
    total = sum(len(_words(r)) for r in references)
    if total == 0:
        raise InvalidDataError("references: WER needs at least one reference word (got none)")
    return sum(word_edit_distance(r, h) for r, h in zip(references, hypotheses)) / total


def split_transcripts(ctx: EvalContext, split: str) -> list[list[int]]:
    """The split's greedy transcripts (``task.greedy_decode`` per batch, up to the longest reference + 2 tokens unless
    ``max_new_tokens`` is set), decoded once per evaluation and shared by the split's metrics."""
    max_new = ctx.cached("max_new_tokens", lambda: _max_new_tokens(ctx))
    eos = _eos_ids(ctx.model, ctx.options.eos_token_id)

    def decode() -> list[list[int]]:
        loader = make_loader(ctx.splits[split], ctx.task.collate, batch_size=ctx.batch_size)
        return [t for batch in loader for t in ctx.task.greedy_decode(ctx.model, batch.data, max_new, eos)]

    return ctx.cached(("transcripts", split), decode)


@register_split_metric("wer", requires={Capability.LOGITS, Capability.GENERATION}, columns=("references",),
                       gap=SPLITS, task_attrs=("greedy_decode",))
def split_wer(ctx: EvalContext, split: str) -> float:
    """Corpus word error rate of the greedy transcripts against the reference transcripts (the supervised label
    tokens without the end token; token ids as words)."""
    refs = ctx.stats(split).columns["references"]
    if not sum(len(r) for r in refs):
        return math.nan
    return word_error_rate(refs, split_transcripts(ctx, split))


__all__ = ["split_transcripts", "split_wer", "word_edit_distance", "word_error_rate"]
