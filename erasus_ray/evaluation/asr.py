"""Word error rate (WER) for speech recognition: how a Whisper-style model's transcripts of forget vs retain
utterances compare (the audio part of the multimodal issue).

``WER = (substitutions + deletions + insertions) / reference words``, summed over a corpus before dividing (as
``jiwer`` and the NIST ``sclite`` scorer do, so long utterances weigh more than short ones), from the word-level
Levenshtein distance. It can exceed 1 (a hypothesis with many insertions). Cost: O(len(ref) * len(hyp)) per pair.
"""

from __future__ import annotations

from typing import Any, Sequence

from erasus_ray.errors import InvalidDataError


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


__all__ = ["word_edit_distance", "word_error_rate"]
