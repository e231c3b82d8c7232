"""Language-model unlearning metrics (TOFU-style), written against the :class:`~erasus_ray.tasks.Task` interface.

For each of the forget / retain / test sets (id datasets of QA items):

* ``<split>_loss``: mean over samples of the sample's mean answer-token cross-entropy (``TaskOutput.sample_loss``).
* ``<split>_prob``: mean over samples of ``exp(-sample_loss)``, i.e. the geometric mean of the answer tokens'
  target probabilities, averaged over samples (TOFU's length-normalised ``P(a|q)``; 1 = answered with certainty).
* ``<split>_rougeL``: mean ROUGE-L recall (Lin 2004) of the greedy-decoded answer against the reference answer,
  on token ids: ``LCS(reference, candidate) / len(reference)``. The reference is the sample's supervised tokens
  without the final eos; decoding starts from the prompt (tokens before ``answer_start``) and stops at eos.

and membership inference, forget set (members) against test set (non-members):

* ``mia_mink_auc``: ROC AUC of Min-K% Prob (Shi et al. 2023, "Detecting Pretraining Data from Large Language
  Models"): a sample's score is the mean of its lowest ``k`` fraction (``ceil(k * n)``, at least one) of answer-token
  log-probabilities; higher score = member. 0.5 = the forget set looks like unseen data; 1.0 = clearly memorised.
* ``mia_loss_auc``: the same AUC with ``-sample_loss`` as the score (the LOSS attack, Yeom et al. 2018).

Cost: one forward pass per sample plus greedy generation (``max_new_tokens`` forward steps per batch).
A set that is empty (or ``None``) is skipped: its keys are absent.

Example::

    metrics = evaluate_lm(model, task, forget=bench.forget, retain=bench.retain, test=bench.test)
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from erasus_ray.data import IdDataset, make_loader
from erasus_ray.tasks import Task, TaskOutput
from erasus_ray.utils import model_device


def rouge_l_recall(reference: Sequence[Any], candidate: Sequence[Any]) -> float:
    """ROUGE-L recall: length of the longest common subsequence of the two sequences over ``len(reference)``.

    Returns 0.0 when either sequence is empty (as the ``rouge_score`` package does).
    """
    ref, cand = list(reference), list(candidate)
    if not ref or not cand:
        return 0.0
    prev = [0] * (len(cand) + 1)
    for r in ref:
        cur = [0] * (len(cand) + 1)
        for j, c in enumerate(cand, start=1):
            cur[j] = prev[j - 1] + 1 if r == c else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1] / len(ref)


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


def mink_scores(out: TaskOutput, k: float = 0.2) -> torch.Tensor:
    """``[B]`` Min-K% Prob score: mean of each sample's lowest ``ceil(k * n_units)`` unit log-probs (NaN if no units)."""
    if not 0 < k <= 1:
        raise ValueError(f"mink_k must be in (0, 1], got {k}")
    logprob = -out.unit_loss()
    matrix, mask = _units_by_sample(out, logprob)
    n = mask.sum(1)
    matrix = torch.where(mask, matrix, torch.full_like(matrix, math.inf)).sort(dim=1).values
    keep = torch.ceil(n.to(matrix.dtype) * k).clamp_min(1)
    take = torch.arange(matrix.shape[1], device=matrix.device)[None, :] < keep[:, None]
    total = torch.where(take & torch.isfinite(matrix), matrix, torch.zeros_like(matrix)).sum(1)
    return torch.where(n > 0, total / keep, torch.full_like(total, math.nan))


@torch.no_grad()
def lm_sample_scores(
    model: nn.Module,
    task: Task,
    dataset: IdDataset,
    *,
    batch_size: int = 32,
    mink_k: float = 0.2,
    eos_token_id: int | None = None,
) -> dict[str, Any]:
    """Per-sample ``ids``, ``loss`` (mean answer CE), ``mink`` (Min-K% score) and ``references`` (answer targets
    without the final eos, as lists of token ids), in dataset order. One forward pass per sample."""
    device = model_device(model)
    eos = _eos_ids(model, eos_token_id)
    ids, losses, minks, refs = [], [], [], []
    for batch in make_loader(dataset, task.collate, batch_size=batch_size):
        out = task.forward(model, batch.to(device).data)
        ids.append(batch.ids.numpy())
        losses.append(out.sample_loss().cpu().numpy())
        minks.append(mink_scores(out, mink_k).cpu().numpy())
        targets, mask = _units_by_sample(out, out.targets)
        for row, valid in zip(targets.tolist(), mask.tolist()):
            ref = [t for t, ok in zip(row, valid) if ok]
            if ref and ref[-1] in eos:
                ref = ref[:-1]
            refs.append(ref)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
    return {"ids": cat(ids).astype(np.int64), "loss": cat(losses), "mink": cat(minks), "references": refs}


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
        )
        for row in generated[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            answers.append(row[:cut])
    return answers


def membership_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """ROC AUC of attack scores, members labelled 1 (higher score = member); NaN scores dropped, NaN if one class."""
    from sklearn.metrics import roc_auc_score

    scores = np.concatenate([members, nonmembers])
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    finite = np.isfinite(scores)
    if len(np.unique(labels[finite])) < 2:
        return math.nan
    return float(roc_auc_score(labels[finite], scores[finite]))


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
    """TOFU-style metrics of ``model`` on the forget / retain / test sets (see the module docstring for definitions).

    ``max_new_tokens`` defaults to the longest reference answer (over all sets) + 2. ``eos_token_id`` defaults to
    the model's generation / model config. ``seed`` is accepted for the common ``evaluate`` signature; decoding is
    greedy, so nothing here is random. The model is left in the train/eval mode it came in.
    """
    sets = {name: ds for name, ds in (("forget", forget), ("retain", retain), ("test", test)) if ds is not None and len(ds)}
    was_training = model.training
    model.eval()
    try:
        scores = {name: lm_sample_scores(
            model, task, ds, batch_size=batch_size, mink_k=mink_k, eos_token_id=eos_token_id
        ) for name, ds in sets.items()}
        if max_new_tokens is None:
            longest = max((len(r) for s in scores.values() for r in s["references"]), default=0)
            max_new_tokens = longest + 2
        metrics: dict[str, float] = {}
        for name, ds in sets.items():
            s = scores[name]
            metrics[f"{name}_loss"] = float(np.mean(s["loss"]))
            metrics[f"{name}_prob"] = float(np.mean(np.exp(-s["loss"])))
            answers = greedy_answers(
                model, task, ds, max_new_tokens=max_new_tokens, batch_size=batch_size, eos_token_id=eos_token_id
            )
            metrics[f"{name}_rougeL"] = float(np.mean([rouge_l_recall(r, a) for r, a in zip(s["references"], answers)]))
        if "forget" in scores and "test" in scores:
            metrics["mia_mink_auc"] = membership_auc(scores["forget"]["mink"], scores["test"]["mink"])
            metrics["mia_loss_auc"] = membership_auc(-scores["forget"]["loss"], -scores["test"]["loss"])
    finally:
        model.train(was_training)
    return metrics


__all__ = ["evaluate_lm", "rouge_l_recall", "mink_scores", "membership_auc", "lm_sample_scores", "greedy_answers"]
