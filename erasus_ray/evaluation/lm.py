"""Language-model unlearning metrics (TOFU-style), written against the :class:`~erasus_ray.tasks.Task` interface and
registered in :data:`~erasus_ray.evaluation.metrics.METRICS` with the capabilities they need.

For each of the forget / retain / test sets (id datasets of QA items):

* ``<split>_loss`` (:mod:`.loss_metrics`): mean over samples of the sample's mean answer-token cross-entropy.
* ``<split>_prob``: mean over samples of ``exp(-sample_loss)``, i.e. the geometric mean of the answer tokens'
  target probabilities, averaged over samples (TOFU's length-normalised ``P(a|q)``; 1 = answered with certainty).
* ``<split>_exact``: answer accuracy, the fraction of greedy answers equal to the reference (short answers).
* ``<split>_rougeL``: mean ROUGE-L recall (Lin 2004) of the greedy-decoded answer against the reference answer,
  on token ids: ``LCS(reference, candidate) / len(reference)``. The reference is the sample's supervised tokens
  without the final eos; decoding starts from the prompt (tokens before ``answer_start``) and stops at eos.

* ``<split>_extraction_strength``: extraction strength (Carlini et al. 2021, "Extracting Training Data from Large
  Language Models"; the definition and name as in open-unlearning's ``extraction_strength`` metric, locuslab/
  open-unlearning, used by Wang et al. 2025, "Towards Effective Evaluations and Comparisons for LLM Unlearning
  Methods"): for an answer ``y`` of ``L`` tokens, ``ES = 1 - k / L`` with ``k`` the shortest prefix ``y[:k]`` after
  which the model's teacher-forced argmax reproduces the whole rest ``y[k:]`` (greedy decoding from the prompt plus
  ``y[:k]`` then yields ``y[k:]`` exactly: the same condition). 1 = the answer is extracted from the prompt alone,
  0 = not even the last token is. Averaged over samples. (open-unlearning's loop gives ``1/L`` instead of 0 when no
  suffix is reproduced; we give 0.) Read from the shared forward pass: no generation.

and membership inference, forget set (members) against test set (non-members):

* ``mia_mink_auc``: ROC AUC of Min-K% Prob (Shi et al. 2023, "Detecting Pretraining Data from Large Language
  Models"): a sample's score is the mean of its lowest ``k`` fraction (``ceil(k * n)``, at least one) of answer-token
  log-probabilities; higher score = member. 0.5 = the forget set looks like unseen data; 1.0 = clearly memorised.
* ``mia_minkpp_auc``: the same AUC with the Min-K%++ score (Zhang et al. 2024; :func:`minkpp_unit_scores`).
* ``mia_loss_auc`` (:mod:`.loss_metrics`): the same AUC with ``-sample_loss`` as the score (the LOSS attack).

Cost: the shared forward pass per split (Min-K% scores and references are columns of it) plus greedy generation
(``max_new_tokens`` forward steps per batch) once per split for ROUGE. Through :func:`evaluate_lm` a set that is
empty (or ``None``) is skipped: its keys are absent; through ``evaluate`` an empty set gives NaN.

Example::

    metrics = evaluate_lm(model, task, forget=bench.forget, retain=bench.retain, test=bench.test)
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from erasus_ray.data import IdDataset, make_loader
from erasus_ray.evaluation.loss_metrics import membership_auc
from erasus_ray.evaluation.metrics import (
    EvalContext,
    MetricOptions,
    metric_names_for,
    register_column,
    register_metric,
    register_split_metric,
    run_metrics,
)
from erasus_ray.evaluation.stats import Column, set_stats
from erasus_ray.tasks import Capability, Task, TaskOutput
from erasus_ray.utils import model_device


def lcs_length(reference: Sequence[Any], candidate: Sequence[Any]) -> int:
    """Length of the longest common subsequence of two sequences (dynamic programme, O(len(ref) * len(cand)))."""
    ref, cand = list(reference), list(candidate)
    prev = [0] * (len(cand) + 1)
    for r in ref:
        cur = [0] * (len(cand) + 1)
        for j, c in enumerate(cand, start=1):
            cur[j] = prev[j - 1] + 1 if r == c else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l_recall(reference: Sequence[Any], candidate: Sequence[Any]) -> float:
    """ROUGE-L recall: length of the longest common subsequence of the two sequences over ``len(reference)`` (TOFU's
    ROUGE, Maini et al. 2024). Returns 0.0 when either sequence is empty (as the ``rouge_score`` package does)."""
    ref, cand = list(reference), list(candidate)
    if not ref or not cand:
        return 0.0
    return lcs_length(ref, cand) / len(ref)


def _porter_stemmer() -> Any:
    """NLTK's Porter stemmer in its default mode, the one ``rouge_score(use_stemmer=True)`` builds."""
    try:
        from nltk.stem import porter
    except ImportError as err:  # the hf extra pins it
        raise ImportError("ROUGE with stemming needs nltk: pip install 'erasus-ray[hf]' (nltk==3.10.4)") from err
    return porter.PorterStemmer()


_STEMMER: Any = None


def rouge_words(text: str, stem: bool = False) -> list[str]:
    """``rouge_score``'s tokenisation (``tokenize.tokenize``): lowercase, every run of characters other than ``a-z0-9``
    a separator; with ``stem``, words longer than 3 characters reduced by the Porter stemmer as
    ``RougeScorer(use_stemmer=True)`` does (NLTK's ``PorterStemmer()``: "memorised" and "memorising" -> "memoris")."""
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    if not stem:
        return words
    global _STEMMER
    if _STEMMER is None:
        _STEMMER = _porter_stemmer()
    return [w for w in (_STEMMER.stem(w) if len(w) > 3 else w for w in words) if re.fullmatch(r"[a-z0-9]+", w)]


def rouge_l_f1_words(reference: str, candidate: str, stem: bool = True) -> float:
    """ROUGE-L F1 on words, ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem).score(reference,
    candidate)["rougeL"].fmeasure`` (MUSE's ROUGE, with open-unlearning's ``use_stemmer=True`` by default):
    ``2 P R / (P + R)`` with ``P = LCS / len(candidate)``, ``R = LCS / len(reference)`` over :func:`rouge_words`;
    0.0 when either is empty or nothing is shared."""
    ref, cand = rouge_words(reference, stem), rouge_words(candidate, stem)
    lcs = lcs_length(ref, cand) if ref and cand else 0
    if not lcs:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def _units_by_sample(out: TaskOutput, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit ``values`` laid out as a ``[B, max_units]`` matrix (row = sample, unit order kept) and a validity mask."""
    owner = out.owner
    counts = torch.bincount(owner, minlength=out.batch_size)
    order = torch.argsort(owner, stable=True)
    owner_sorted = owner[order]
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(owner.numel(), device=owner.device) - starts[owner_sorted]
    width = int(counts.max()) if owner.numel() else 0
    matrix = torch.zeros(out.batch_size, width, dtype=values.dtype, device=values.device)
    mask = torch.zeros(out.batch_size, width, dtype=torch.bool, device=values.device)
    matrix[owner_sorted, col] = values[order]
    mask[owner_sorted, col] = True
    return matrix, mask


def lowest_k_mean(out: TaskOutput, unit_values: torch.Tensor, k: float = 0.2) -> torch.Tensor:
    """``[B]`` mean of each sample's lowest ``ceil(k * n_units)`` unit values (NaN if no units): Min-K% pooling."""
    if not 0 < k <= 1:
        raise ValueError(f"mink_k must be in (0, 1], got {k}")
    matrix, mask = _units_by_sample(out, unit_values)
    n = mask.sum(1)
    matrix = torch.where(mask, matrix, torch.full_like(matrix, math.inf)).sort(dim=1).values
    keep = torch.ceil(n.to(matrix.dtype) * k).clamp_min(1)
    take = torch.arange(matrix.shape[1], device=matrix.device)[None, :] < keep[:, None]
    total = torch.where(take & torch.isfinite(matrix), matrix, torch.zeros_like(matrix)).sum(1)
    return torch.where(n > 0, total / keep, torch.full_like(total, math.nan))


def mink_scores(out: TaskOutput, k: float = 0.2) -> torch.Tensor:
    """``[B]`` Min-K% Prob score: mean of each sample's lowest ``ceil(k * n_units)`` unit log-probs (NaN if no units)."""
    return lowest_k_mean(out, -out.unit_loss(), k)


def minkpp_unit_scores(out: TaskOutput) -> torch.Tensor:
    """``[N]`` Min-K%++ unit scores (Zhang et al. 2024, "Min-K%++: Improved Baseline for Detecting Pre-Training
    Data from Large Language Models", Eq. 2): the target's log-prob standardised over the model's own next-token
    distribution, ``(log p(x_t) - mu_t) / sigma_t`` with ``mu_t = E_{z~p} log p(z)`` and ``sigma_t^2 = Var_{z~p}
    log p(z)``. A memorised token sits at a local maximum of the likelihood: far above the mean log-prob."""
    logp = torch.log_softmax(out.logits.double(), dim=-1)
    target = logp.gather(1, out.targets.long().unsqueeze(1)).squeeze(1)
    prob = logp.exp()
    mu = (prob * logp).sum(-1)
    var = (prob * logp.pow(2)).sum(-1) - mu.pow(2)
    return ((target - mu) / var.clamp_min(1e-12).sqrt()).float()


def minkpp_scores(out: TaskOutput, k: float = 0.2) -> torch.Tensor:
    """``[B]`` Min-K%++ score: the mean of each sample's lowest ``k`` fraction of :func:`minkpp_unit_scores`."""
    return lowest_k_mean(out, minkpp_unit_scores(out), k)


@register_column("mink")
def mink_column(options: MetricOptions, model: nn.Module) -> Column:
    """Per-sample Min-K% Prob score (``options.mink_k``)."""
    return lambda out: mink_scores(out, options.mink_k).cpu().numpy()


@register_column("minkpp")
def minkpp_column(options: MetricOptions, model: nn.Module) -> Column:
    """Per-sample Min-K%++ score (``options.mink_k``)."""
    return lambda out: minkpp_scores(out, options.mink_k).cpu().numpy()


def extraction_strengths(out: TaskOutput) -> torch.Tensor:
    """``[B]`` extraction strength per sample (module docstring) from the teacher-forced argmax; NaN if no units."""
    hits, mask = _units_by_sample(out, (out.logits.argmax(-1) == out.targets).to(torch.long))
    length = mask.sum(1)
    # a unit "misses" if it is valid and wrong; k = one past the last miss (0 if none)
    miss = (mask & (hits == 0)).to(torch.long)
    position = torch.arange(1, miss.shape[1] + 1, device=miss.device)[None, :]
    k = (miss * position).amax(1) if miss.shape[1] else torch.zeros_like(length)
    es = 1.0 - k.double() / length.clamp_min(1).double()
    return torch.where(length > 0, es, torch.full_like(es, math.nan)).float()


@register_column("extraction")
def extraction_column(options: MetricOptions, model: nn.Module) -> Column:
    """Per-sample extraction strength (teacher-forced; :func:`extraction_strengths`)."""
    return lambda out: extraction_strengths(out).cpu().numpy()


@register_column("references")
def references_column(options: MetricOptions, model: nn.Module) -> Column:
    """Per-sample reference answer: the supervised target tokens without a final eos (lists of token ids)."""
    eos = _eos_ids(model, options.eos_token_id)

    def references(out: TaskOutput) -> list[list[int]]:
        targets, mask = _units_by_sample(out, out.targets)
        refs = []
        for row, valid in zip(targets.tolist(), mask.tolist()):
            ref = [t for t, ok in zip(row, valid) if ok]
            refs.append(ref[:-1] if ref and ref[-1] in eos else ref)
        return refs

    return references


def _eos_ids(model: nn.Module, eos_token_id: int | None = None) -> set[int]:
    if eos_token_id is not None:
        return {int(eos_token_id)}
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
    return set()


@torch.no_grad()
def greedy_answers(
    model: nn.Module,
    task: Task,
    dataset: IdDataset,
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    eos_token_id: int | None = None,
) -> list[list[int]]:
    """Greedy-decoded answer token ids for each sample (in dataset order), truncated before the first eos.

    Prompts (``task.prompts``) are left-padded into one batch and decoded with ``model.generate`` (HF API).
    """
    device = model_device(model)
    pad = int(getattr(task, "pad_token_id", 0))
    eos = _eos_ids(model, eos_token_id)
    answers: list[list[int]] = []
    for batch in make_loader(dataset, task.collate, batch_size=batch_size):
        prompts = task.prompts(batch.data)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p) :] = p
            attention[row, width - len(p) :] = 1
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            eos_token_id=sorted(eos) if eos else None,
            **{k: v.to(device) for k, v in task.condition_inputs(batch.data).items()},
        )
        for row in generated[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            answers.append(row[:cut])
    return answers


@register_split_metric("prob", requires={Capability.LOGITS}, gap=("forget", "retain"), display=())
def split_prob(ctx: EvalContext, split: str) -> float:
    """Mean over samples of ``exp(-sample_loss)`` (TOFU's length-normalised answer probability)."""
    loss = ctx.stats(split).loss
    return float(np.mean(np.exp(-loss))) if len(loss) else math.nan


def _max_new_tokens(ctx: EvalContext) -> int:
    """The option, else the longest reference answer over the evaluation's splits + 2 (the same for every split)."""
    if ctx.options.max_new_tokens is not None:
        return ctx.options.max_new_tokens
    return max((len(r) for s in ctx.splits for r in ctx.stats(s).columns["references"]), default=0) + 2


def context_answers(ctx: EvalContext, split: str) -> list[list[int]]:
    """The split's greedy answers, decoded once per evaluation (ROUGE-L and answer accuracy share them)."""
    max_new = ctx.cached("max_new_tokens", lambda: _max_new_tokens(ctx))
    return ctx.cached(("answers", split), lambda: greedy_answers(
        ctx.model, ctx.task, ctx.splits[split], max_new_tokens=max_new, batch_size=ctx.batch_size,
        eos_token_id=ctx.options.eos_token_id))


def set_references_and_answers(ctx: EvalContext, data: IdDataset) -> tuple[Any, list[list[int]], list[list[int]]]:
    """``(stats, references, greedy answers)`` of the evaluation's model on ``data``, a set beside the evaluation's
    splits (MUSE's KnowMem QA, TOFU's world-facts stand-in): one forward pass with the references column, then greedy
    decoding up to the longest reference + 2 tokens. The caller caches it."""
    stats = set_stats(ctx.model, ctx.task, data, ctx.batch_size,
                      {"references": references_column(ctx.options, ctx.model)})
    refs = stats.columns["references"]
    answers = greedy_answers(ctx.model, ctx.task, data, max_new_tokens=max((len(r) for r in refs), default=0) + 2,
                             batch_size=ctx.batch_size, eos_token_id=ctx.options.eos_token_id) if len(refs) else []
    return stats, refs, answers


@register_split_metric("rougeL", requires={Capability.LOGITS, Capability.TOKENS, Capability.GENERATION},
                       columns=("references",), gap=("forget", "retain"))
def split_rouge_l(ctx: EvalContext, split: str) -> float:
    """Mean ROUGE-L recall of the greedy answer against the reference answer."""
    refs = ctx.stats(split).columns["references"]
    if not len(refs):
        return math.nan
    answers = context_answers(ctx, split)
    return float(np.mean([rouge_l_recall(r, a) for r, a in zip(refs, answers)]))


@register_split_metric("exact", requires={Capability.LOGITS, Capability.TOKENS, Capability.GENERATION},
                       columns=("references",), gap=("forget", "retain", "test"), display=())
def split_exact(ctx: EvalContext, split: str) -> float:
    """Answer accuracy: the fraction of samples whose greedy answer is exactly the reference answer (a VLM's
    "what digit is this?"), from the same greedy answers as ROUGE-L."""
    refs = ctx.stats(split).columns["references"]
    if not len(refs):
        return math.nan
    answers = context_answers(ctx, split)
    return float(np.mean([list(r) == list(a) for r, a in zip(refs, answers)]))


@register_split_metric("extraction_strength", requires={Capability.LOGITS, Capability.TOKENS},
                       columns=("extraction",), display=())
def split_extraction_strength(ctx: EvalContext, split: str) -> float:
    """Mean extraction strength (Carlini et al. 2021; open-unlearning's definition): 1 - shortest prefix fraction
    after which the teacher-forced argmax reproduces the rest of the answer."""
    values = np.asarray(ctx.stats(split).columns["extraction"], dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan


@register_metric("mia_mink_auc", requires={Capability.LOGITS}, splits=("forget", "test"), columns=("mink",),
                 gap=True, display=True)
def mia_mink_auc(ctx: EvalContext) -> float:
    """Min-K% Prob AUC, forget (members) vs test (non-members)."""
    return membership_auc(ctx.stats("forget").columns["mink"], ctx.stats("test").columns["mink"])


@register_metric("mia_minkpp_auc", requires={Capability.LOGITS}, splits=("forget", "test"), columns=("minkpp",),
                 display=True)
def mia_minkpp_auc(ctx: EvalContext) -> float:
    """Min-K%++ AUC, forget (members) vs test (non-members) (the attack of MUSE's PrivLeak)."""
    return membership_auc(ctx.stats("forget").columns["minkpp"], ctx.stats("test").columns["minkpp"])


def evaluate_lm(
    model: nn.Module,
    task: Task,
    *,
    forget: IdDataset | None,
    retain: IdDataset | None,
    test: IdDataset | None,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    mink_k: float = 0.2,
    eos_token_id: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """TOFU-style metrics of ``model`` on the forget / retain / test sets (see the module docstring for definitions):
    the task's default suite through :func:`~erasus_ray.evaluation.metrics.run_metrics`, empty sets left out.

    ``max_new_tokens`` defaults to the longest reference answer (over all sets) + 2. ``eos_token_id`` defaults to
    the model's generation / model config. Decoding is greedy, so nothing here is random. The model is left in the
    train/eval mode it came in.
    """
    sets = {name: ds for name, ds in (("forget", forget), ("retain", retain), ("test", test)) if ds is not None and len(ds)}
    return run_metrics(model, task, sets, metric_names_for(task), batch_size=batch_size, max_new_tokens=max_new_tokens,
                       mink_k=mink_k, eos_token_id=eos_token_id, seed=seed)


__all__ = ["evaluate_lm", "extraction_strengths", "lcs_length", "rouge_l_f1_words", "rouge_l_recall", "rouge_words", "mink_scores", "minkpp_scores", "minkpp_unit_scores", "lowest_k_mean", "membership_auc", "greedy_answers"]
