"""MUSE's metrics (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models", Sec. 3), on
the offline corpus of :mod:`.muse_data`, registered, and the ``muse`` protocol.

Items: a biography (``answer_start`` after the VerbMem prompt) carrying ``"knowmem"``, its author's QA items
(:meth:`~erasus_ray.evaluation.protocols.muse_data.MuseCorpusBenchmark.muse_split`). The splits: forget (the forget
authors), retain (other trained authors), test (held-out authors, never trained on).

* **VerbMem** ``forget_verbmem``: ROUGE-L of the greedy continuation of each forget-text prompt against the true
  continuation (MUSE: C1, "no verbatim memorisation"); the same generation as ``forget_rougeL``.
* **KnowMem** ``forget_knowmem`` / ``retain_knowmem``: ROUGE-L of the greedy answers to the QA pairs (C2, "no
  knowledge memorisation" on forget; C4, "utility preservation" on retain).
* **PrivLeak** (:func:`privleak`): ``(AUC_unlearned - AUC_retrain) / AUC_retrain`` of the Min-K%++ membership
  attack, forget text (members) vs held-out text (non-members) (C3, "no privacy leakage"): ~0 = the unlearned model
  looks like the retrained one; large positive = under-unlearning, large negative = over-unlearning. It needs the
  retrained model's AUC, so the protocol computes it (as TOFU's forget quality), not a registered metric.

ROUGE-L here is MUSE's: F1 on words (:func:`~erasus_ray.evaluation.lm.rouge_l_f1_words`, the ``rouge_score``
package's tokenisation: lowercase, split on non-alphanumerics, Porter-stemmed as ``RougeScorer(["rougeL"],
use_stemmer=True)``, open-unlearning's setting; NLTK's stemmer, equal to the package's scores in the tests), of the
reference and the greedy output both decoded with the task's tokenizer (``CausalLMTask(tokenizer=...)``; a task
without one is refused). TOFU's ``<split>_rougeL`` stays ROUGE-L recall on token ids, TOFU's definition. On
the corpus differences see :mod:`.muse_data`.

Cost per model: the shared forward pass over forget / test, greedy generation over the forget biographies and over
the forget and retain QA pairs.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from torch import nn

from erasus_ray.data import IdDataset
from erasus_ray.errors import InvalidConfigError
from erasus_ray.evaluation.lm import context_answers, rouge_l_f1_words, set_references_and_answers
from erasus_ray.evaluation.metrics import EvalContext, register_metric
from erasus_ray.evaluation.protocols.base import (
    FORGETTING, PROTOCOLS, EvalData, Protocol, StandIn, VerdictThresholds, epsilon_within,
)
from erasus_ray.evaluation.protocols.muse_data import KNOWMEM
from erasus_ray.evaluation.suite import MetricSuite
from erasus_ray.tasks import Capability

_GEN = {Capability.LOGITS, Capability.TOKENS, Capability.GENERATION}


def privleak(auc_unlearned: float, auc_retrain: float) -> float:
    """MUSE's PrivLeak: ``(AUC_unlearned - AUC_retrain) / AUC_retrain`` (NaN if the retrained AUC is 0 or NaN)."""
    if not auc_retrain or not math.isfinite(auc_retrain):
        return math.nan
    return (auc_unlearned - auc_retrain) / auc_retrain


def word_rouge_f1(ctx: EvalContext, references: list[list[int]], outputs: list[list[int]]) -> float:
    """Mean ROUGE-L F1 on words of token-id ``outputs`` against ``references``, both decoded with the task's
    tokenizer (special tokens skipped); NaN if there are none."""
    tokenizer = getattr(ctx.task, "tokenizer", None)
    if tokenizer is None:
        raise InvalidConfigError("task: MUSE's ROUGE-L is on words, so the task needs the model's tokenizer "
                                 "(CausalLMTask(tokenizer=...))")
    if not len(references):
        return math.nan
    text = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)  # noqa: E731
    return float(np.mean([rouge_l_f1_words(text(r), text(o)) for r, o in zip(references, outputs)]))


@register_metric("forget_verbmem", requires=_GEN, splits=("forget",), columns=("references",), display=True,
                 task_attrs=("tokenizer",))
def forget_verbmem(ctx: EvalContext) -> float:
    """MUSE VerbMem: ROUGE-L F1 on words of the greedy continuation of the forget-text prompts."""
    # the same cached generation as forget_rougeL
    return word_rouge_f1(ctx, ctx.stats("forget").columns["references"], context_answers(ctx, "forget"))


def _knowmem_set(data: IdDataset) -> IdDataset:
    """The QA items of every item of ``data`` (``"knowmem"``), flattened; ids: position in that order."""
    qa = [q for r in range(len(data)) for q in data[r][1][KNOWMEM]]
    return IdDataset(qa, np.arange(len(qa)), np.arange(len(qa)))


def knowmem(ctx: EvalContext, split: str) -> float:
    """Mean ROUGE-L F1 on words of the greedy answers to the split's KnowMem QA pairs (cached per evaluation)."""
    qa = ctx.cached(("knowmem", split), lambda: _knowmem_set(ctx.splits[split]))
    if not len(qa):
        return math.nan
    _, refs, answers = set_references_and_answers(ctx, qa)
    return word_rouge_f1(ctx, refs, answers)


@register_metric("forget_knowmem", requires=_GEN, splits=("forget",), display=True, item_fields=(KNOWMEM,),
                 task_attrs=("tokenizer",))
def forget_knowmem(ctx: EvalContext) -> float:
    """MUSE KnowMem on the forget QA pairs (ROUGE-L F1 on words of greedy answers)."""
    return knowmem(ctx, "forget")


@register_metric("retain_knowmem", requires=_GEN, splits=("retain",), display=True, item_fields=(KNOWMEM,),
                 task_attrs=("tokenizer",))
def retain_knowmem(ctx: EvalContext) -> float:
    """MUSE KnowMem on the retain QA pairs: utility preservation."""
    return knowmem(ctx, "retain")


MUSE_METRICS = ("forget_verbmem", "forget_knowmem", "retain_knowmem", "mia_minkpp_auc")


@PROTOCOLS.register("muse")
class MuseProtocol(Protocol):
    """MUSE: VerbMem, KnowMem (forget, retain), PrivLeak of Min-K%++ against the gold (retrained) model, and with
    ``include_privacy`` the empirical epsilon lower bound (``mia_epsilon``).

    Criteria (thresholds: :class:`~erasus_ray.evaluation.protocols.base.VerdictThresholds`), MUSE's C1-C4 with the
    retrained model as reference: forgetting ``forget_verbmem`` and ``forget_knowmem`` each at most ``max_gap``
    above the gold model's (MUSE: lower than or equal to the retrained model); utility ``retain_knowmem >=
    utility_ratio * gold``; privacy ``|privleak| <= thresholds.privleak`` (MUSE calls [-5%, 5%] no leak) and, with
    ``include_privacy``, ``mia_epsilon`` at most ``epsilon_gap`` nats above the gold model's.
    Needs a ``test`` split (PrivLeak's non-members) whatever ``include_privacy`` says.
    """

    tradeoff = ("forget_knowmem", "retain_knowmem")

    @classmethod
    def standin(cls, variant: str = "ci", seed: int = 0) -> StandIn:
        """The biography corpus, ``forget10``; retain evaluation on 10 retain authors."""
        from erasus_ray.benchmarks.base import build_benchmark
        from erasus_ray.evaluation.protocols.muse_data import MuseCorpusBenchmark

        spec = MuseCorpusBenchmark(variant=variant)
        bench = build_benchmark(spec, "forget10", seed=seed)
        forget, retain, holdout = spec.muse_splits(bench.info["forget_author_index"], n_retain=10)
        return StandIn(bench, forget, retain, holdout, ("grad_diff", "npo", "simnpo"))

    def names(self) -> tuple[str, ...]:
        return MUSE_METRICS + (("mia_epsilon",) if self.include_privacy else ())

    def prepare(self, gold: nn.Module, data: EvalData) -> dict[str, Any]:
        if data.test is None:
            raise InvalidConfigError("test: the muse protocol needs held-out text (PrivLeak's non-members)")
        suite = MetricSuite(("mia_minkpp_auc",)).run(gold, data.forget, data.retain, data.test, task=data.task)
        return {"gold_minkpp_auc": suite["mia_minkpp_auc"]}

    def measure(self, model: nn.Module, data: EvalData, seed: int, reference: Mapping[str, Any]) -> dict[str, float]:
        values = MetricSuite(self.names()).run(model, data.forget, data.retain, data.test, task=data.task, seed=seed).metrics
        return {**values, "privleak": privleak(values["mia_minkpp_auc"], reference["gold_minkpp_auc"])}

    def criteria(self, mean: Mapping[str, float], gold: Mapping[str, float], thresholds: VerdictThresholds) -> dict[str, bool]:
        no_mem = all(mean[n] <= gold[n] + thresholds.max_gap for n in ("forget_verbmem", "forget_knowmem"))
        privacy = abs(mean["privleak"]) <= thresholds.privleak and epsilon_within(mean, gold, thresholds)
        return {FORGETTING: no_mem, "utility": mean["retain_knowmem"] >= thresholds.utility_ratio * gold["retain_knowmem"],
                "privacy": privacy}


__all__ = ["MUSE_METRICS", "MuseProtocol", "knowmem", "privleak", "word_rouge_f1"]
