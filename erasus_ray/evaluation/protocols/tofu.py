"""TOFU's metrics (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs", Sec. 2.2), registered.

Per sample, with ``P(a|q)^(1/|a|) = exp(-sample_loss)`` the length-normalised answer likelihood (the causal-LM
task's sample loss is the mean answer-token cross-entropy), the **truth ratio** is

    R_truth = (prod_k P(a_pert_k|q)^(1/|a_pert_k|))^(1/K) / P(a_para|q)^(1/|a_para|)
            = exp(L_para - mean_k L_pert_k)

(paraphrased answer ``a_para``, ``K`` perturbed wrong-fact answers; items built by
:func:`~erasus_ray.evaluation.protocols.tofu_data.tofu_dataset`). ``R < 1``: the model prefers the true fact.
Registered metrics (TOFU's aggregation, as in the reference ``aggregate_eval_stat.py``):

* ``forget_truth_ratio``: mean of ``min(R, 1/R)`` on the forget set (1 = no preference either way);
* ``retain_truth_ratio``: mean of ``max(0, 1 - R)`` on the retain set (higher = knows the facts);
* ``model_utility``: harmonic mean of ``retain_prob``, ``retain_rougeL`` and ``retain_truth_ratio`` and, for each
  set of the ``utility_sets`` option (TOFU's "Real Authors" and "World Facts", :func:`utility_set_parts`), the
  same three values on that set, TOFU's way: the probability normalised over the answer options,
  ``P(a|q) / (P(a|q) + sum_k P(a_pert_k|q))`` (length-normalised likelihoods), ROUGE-L recall, and ``max(0, 1 - R)``.
  Without ``utility_sets`` it is the retain set's three values only; each set's three are reported beside it
  (``<set>_prob``, ``<set>_rougeL``, ``<set>_truth_ratio``: ``SuiteResult.parts``, and the TOFU protocol's metrics).

**Forget quality** (:func:`forget_quality`) is the p-value of the two-sample Kolmogorov-Smirnov test between the
per-sample truth ratios of the unlearned and of the gold (retrained) model on the forget set: high (p >= 0.05) means
the two distributions cannot be told apart. It needs the gold model, which a registry metric has no access to
(``EvalContext`` holds one model), so it is a function the TOFU protocol calls, not a registered metric.

Cost: ``1 + K`` no-grad forward passes over the split (paraphrased + each perturbed answer), cached per evaluation.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from scipy.stats import hmean, ks_2samp
from torch import nn

from erasus_ray.data import IdDataset
from erasus_ray.errors import InvalidDataError
from erasus_ray.evaluation.lm import rouge_l_recall, set_references_and_answers
from erasus_ray.evaluation.metrics import METRICS, EvalContext, register_metric
from erasus_ray.evaluation.protocols.base import (
    FORGETTING, PROTOCOLS, EvalData, Protocol, StandIn, VerdictThresholds, epsilon_within,
)
from erasus_ray.evaluation.protocols.tofu_data import PARAPHRASED, PERTURBED
from erasus_ray.evaluation.stats import set_stats
from erasus_ray.evaluation.suite import MetricSuite
from erasus_ray.tasks import Capability, Task

_LM = {Capability.LOGITS, Capability.TOKENS}


def truth_ratio_from_losses(paraphrased_loss: np.ndarray, perturbed_loss: np.ndarray) -> np.ndarray:
    """Per-sample ``R_truth = exp(L_para - mean_k L_pert_k)`` from ``[N]`` and ``[N, K]`` length-normalised NLLs."""
    para = np.asarray(paraphrased_loss, dtype=np.float64).reshape(-1)
    pert = np.asarray(perturbed_loss, dtype=np.float64).reshape(len(para), -1)
    return np.exp(para - pert.mean(axis=1))


def forget_truth_ratio_stat(ratios: np.ndarray) -> float:
    """TOFU's forget-set truth ratio: mean of ``min(R, 1/R)`` (NaN if empty)."""
    ratios = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.minimum(ratios, 1.0 / ratios))) if len(ratios) else math.nan


def retain_truth_ratio_stat(ratios: np.ndarray) -> float:
    """TOFU's retain-set truth ratio: mean of ``max(0, 1 - R)`` (NaN if empty)."""
    ratios = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.maximum(0.0, 1.0 - ratios))) if len(ratios) else math.nan


def forget_quality(unlearned_ratios: np.ndarray, gold_ratios: np.ndarray) -> float:
    """p-value of the two-sample KS test between the truth ratios of the unlearned and the gold model (forget set).

    Non-finite ratios are dropped; NaN if either side is then empty. The test is invariant to any monotone map of the
    ratios, so ``R`` or ``1/R`` give the same p-value.
    """
    a, b = (np.asarray(r, dtype=np.float64) for r in (unlearned_ratios, gold_ratios))
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if not len(a) or not len(b):
        return math.nan
    return float(ks_2samp(a, b).pvalue)


def _answer_sets(data: IdDataset, split: str) -> tuple[IdDataset, list[IdDataset]]:
    """The paraphrased-answer set and the ``K`` perturbed-answer sets of ``data`` (same ids), from its items."""
    items = [data[r][1] for r in range(len(data))]
    if items and not all(isinstance(it, dict) and PARAPHRASED in it and PERTURBED in it for it in items):
        raise InvalidDataError(
            f"split {split!r}: the truth ratio needs items with {PARAPHRASED!r} and {PERTURBED!r} answers; plain QA "
            "items have none (build them with erasus_ray.evaluation.protocols.tofu_data.tofu_dataset)")
    counts = {len(it[PERTURBED]) for it in items}
    if len(counts) > 1 or 0 in counts:
        raise InvalidDataError(f"split {split!r}: every item needs the same number (>= 1) of perturbed answers, "
                               f"got {sorted(counts)}")
    k = counts.pop() if counts else 0
    rows = np.arange(len(items))
    para = IdDataset([it[PARAPHRASED] for it in items], rows, data.ids)
    pert = [IdDataset([it[PERTURBED][j] for it in items], rows, data.ids) for j in range(k)]
    return para, pert


def truth_ratios(model: nn.Module, task: Task, data: IdDataset, batch_size: int = 32, split: str = "data") -> np.ndarray:
    """Per-sample ``R_truth`` of ``model`` on ``data`` (items from ``tofu_dataset``), in ``data.ids`` order.

    Cost: ``1 + K`` no-grad forward passes over ``data``.
    """
    para, pert = _answer_sets(data, split)
    if not len(data):
        return np.zeros(0)
    para_loss = set_stats(model, task, para, batch_size).loss
    pert_loss = np.stack([set_stats(model, task, p, batch_size).loss for p in pert], axis=1)
    return truth_ratio_from_losses(para_loss, pert_loss)


def context_truth_ratios(ctx: EvalContext, split: str) -> np.ndarray:
    """:func:`truth_ratios` of the evaluation's model on ``split``, computed once per evaluation."""
    return ctx.cached(("truth_ratio", split), lambda: truth_ratios(
        ctx.model, ctx.task, ctx.splits[split], ctx.batch_size, split))


@register_metric("forget_truth_ratio", requires=_LM, splits=("forget",), item_fields=(PARAPHRASED, PERTURBED))
def forget_truth_ratio(ctx: EvalContext) -> float:
    """TOFU truth ratio on the forget set: mean ``min(R, 1/R)``."""
    return forget_truth_ratio_stat(context_truth_ratios(ctx, "forget"))


@register_metric("retain_truth_ratio", requires=_LM, splits=("retain",), item_fields=(PARAPHRASED, PERTURBED))
def retain_truth_ratio(ctx: EvalContext) -> float:
    """TOFU truth ratio on the retain set: mean ``max(0, 1 - R)``."""
    return retain_truth_ratio_stat(context_truth_ratios(ctx, "retain"))


def utility_from_parts(*parts: float) -> float:
    """TOFU's model utility: the harmonic mean of the parts (0 if any is 0, NaN if any is NaN)."""
    values = np.array(parts, dtype=np.float64)
    if np.isnan(values).any():
        return math.nan
    return 0.0 if (values <= 0).any() else float(hmean(values))


def option_probability(answer_loss: np.ndarray, perturbed_loss: np.ndarray) -> float:
    """TOFU's probability on its real-authors / world-facts sets: mean over samples of ``P(a) / (P(a) + sum_k
    P(a_pert_k))`` with ``P = exp(-loss)`` the length-normalised likelihoods (``[N]`` and ``[N, K]`` losses)."""
    true = np.exp(-np.asarray(answer_loss, dtype=np.float64).reshape(-1))
    wrong = np.exp(-np.asarray(perturbed_loss, dtype=np.float64).reshape(len(true), -1)).sum(axis=1)
    return float(np.mean(true / (true + wrong))) if len(true) else math.nan


def utility_set_parts(ctx: EvalContext, name: str, data: IdDataset) -> tuple[float, float, float]:
    """(option probability, ROUGE-L recall, ``max(0, 1 - R)``) of the evaluation's model on one utility set (cached).

    Cost: one forward pass over the answers and ``1 + K`` over the paraphrased / perturbed answers, plus greedy
    generation."""

    def compute() -> tuple[float, float, float]:
        stats, refs, answers = set_references_and_answers(ctx, data)
        _, pert = _answer_sets(data, name)
        pert_loss = np.stack([set_stats(ctx.model, ctx.task, p, ctx.batch_size).loss for p in pert], axis=1)
        rouge = float(np.mean([rouge_l_recall(r, a) for r, a in zip(refs, answers)])) if len(refs) else math.nan
        ratios = truth_ratios(ctx.model, ctx.task, data, ctx.batch_size, name)
        return option_probability(stats.loss, pert_loss), rouge, retain_truth_ratio_stat(ratios)

    return ctx.cached(("utility_set", name), compute)


@register_metric("model_utility", requires=_LM | {Capability.GENERATION}, splits=("retain",), columns=("references",),
                 display=True, item_fields=(PARAPHRASED, PERTURBED))
def model_utility(ctx: EvalContext) -> float:
    """Harmonic mean of retain answer probability, retain ROUGE-L and retain truth ratio, and of the same three on
    each ``utility_sets`` set (TOFU's model utility)."""
    prob = METRICS.get("retain_prob").compute(ctx)
    rouge_l = METRICS.get("retain_rougeL").compute(ctx)  # shares the evaluation's cached generation
    extra = []
    for name, data in sorted((ctx.options.utility_sets or {}).items()):
        parts = utility_set_parts(ctx, name, data)
        ctx.parts.update({f"{name}_{part}": value for part, value in zip(UTILITY_PARTS, parts)})
        extra += parts
    return utility_from_parts(prob, rouge_l, retain_truth_ratio(ctx), *extra)


#: the names of a utility set's parts (:func:`utility_set_parts`), reported as ``<set>_<part>`` beside the utility
UTILITY_PARTS = ("prob", "rougeL", "truth_ratio")


RETAIN_METRICS = ("model_utility", "retain_prob", "retain_rougeL", "retain_truth_ratio")
FORGET_METRICS = ("forget_prob", "forget_rougeL")
PRIVACY_METRICS = ("mia_mink_auc", "mia_loss_auc")
#: reported with include_privacy and checked against the gold model's by its own threshold (epsilon_gap)
EPSILON = ("mia_epsilon",)


@PROTOCOLS.register("tofu")
class TofuProtocol(Protocol):
    """TOFU: forget quality (KS p-value against the gold model) and model utility, plus forget-set probability and
    ROUGE-L and, with ``include_privacy``, the Min-K% and LOSS membership AUCs (forget vs test).

    Criteria (thresholds: :class:`~erasus_ray.evaluation.protocols.base.VerdictThresholds`): forgetting
    ``forget_quality >= thresholds.forget_quality``; utility ``model_utility >= utility_ratio * gold``; privacy
    both AUCs within ``privacy_gap`` of the gold model's and ``mia_epsilon`` at most ``epsilon_gap`` above it. The forget and retain items need paraphrased / perturbed
    answers (:func:`~erasus_ray.evaluation.protocols.tofu_data.tofu_dataset`).

    Cost per model and run: the shared forward pass per split, ``1 + K`` passes over forget and retain for the truth
    ratios, and greedy generation over forget and retain for ROUGE-L.
    """

    tradeoff = ("forget_quality", "model_utility")

    @classmethod
    def standin(cls, variant: str = "ci", seed: int = 0) -> StandIn:
        """The authors benchmark with the world-facts stand-in trained alongside (:class:`~erasus_ray.evaluation.
        protocols.tofu_data.TofuAuthorsBenchmark`), ``forget10``; retain evaluation on the first 40 retain QA pairs;
        the world facts are model utility's ``utility_sets``. ``variant``: an authors variant (``ci``, ``full``), or
        ``smollm`` for the pretrained SmolLM2 tier (:class:`~erasus_ray.benchmarks.authors_smollm.AuthorsSmolLMBenchmark`,
        its ``forget10x`` variant), whose utility sets are facts the pretrained model knows (world facts and real
        authors, as sentences), asked in its chat template (``spec.chat_text``), the format the fine-tune never saw."""
        from erasus_ray.benchmarks.authors_smollm import AuthorsSmolLMBenchmark
        from erasus_ray.benchmarks.base import build_benchmark
        from erasus_ray.evaluation.protocols.tofu_data import TofuAuthorsBenchmark, tofu_dataset, world_facts_dataset

        smollm = variant == "smollm"
        spec = AuthorsSmolLMBenchmark() if smollm else TofuAuthorsBenchmark(variant=variant)
        bench = build_benchmark(spec, "forget10", seed=seed)
        retain = tofu_dataset(spec, bench.retain.subset(bench.retain.ids[:40]))  # author ids: world ids sort last
        utility = ({name: world_facts_dataset(spec, set_name, spec.chat_text) for name, set_name in
                    (("world_facts", "world_facts_sentences"), ("real_authors", "real_authors"))} if smollm
                   else {"world_facts": world_facts_dataset(spec)})
        return StandIn(bench, tofu_dataset(spec, bench.forget), retain, bench.test, ("grad_diff", "npo", "simnpo"), utility)

    def names(self) -> tuple[str, ...]:
        return FORGET_METRICS + RETAIN_METRICS + (PRIVACY_METRICS + EPSILON if self.include_privacy else ())

    def prepare(self, gold: nn.Module, data: EvalData) -> dict[str, Any]:
        return {"gold_truth_ratios": truth_ratios(gold, data.task, data.forget, split="forget")}

    def measure(self, model: nn.Module, data: EvalData, seed: int, reference: Mapping[str, Any]) -> dict[str, float]:
        ratios = truth_ratios(model, data.task, data.forget, split="forget")
        values = {"forget_quality": forget_quality(ratios, reference["gold_truth_ratios"]),
                  "forget_truth_ratio": forget_truth_ratio_stat(ratios)}
        suite = MetricSuite(self.names()).run(model, data.forget, data.retain, data.test, task=data.task, seed=seed,
                                              utility_sets=data.utility_sets or None)
        return {**values, **suite.metrics, **suite.parts}  # parts: each utility set's (TOFU reports them per set)

    def criteria(self, mean: Mapping[str, float], gold: Mapping[str, float], thresholds: VerdictThresholds) -> dict[str, bool]:
        result = {
            FORGETTING: mean["forget_quality"] >= thresholds.forget_quality,
            "utility": mean["model_utility"] >= thresholds.utility_ratio * gold["model_utility"],
        }
        if self.include_privacy:
            result["privacy"] = all(abs(mean[n] - gold[n]) <= thresholds.privacy_gap for n in PRIVACY_METRICS) and (
                epsilon_within(mean, gold, thresholds))
        return result


__all__ = [
    "TofuProtocol", "context_truth_ratios", "forget_quality", "forget_truth_ratio_stat", "retain_truth_ratio_stat", "truth_ratios",
    "truth_ratio_from_losses", "option_probability", "utility_from_parts", "utility_set_parts",
]
