"""Causal-LM adapter label shifting and the LM metrics (ROUGE-L recall, Min-K% Prob, greedy decoding)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from erasus_ray.data import IdDataset, make_loader
from erasus_ray.evaluation.lm import evaluate_lm, greedy_answers, membership_auc, mink_scores, rouge_l_recall
from erasus_ray.tasks import CausalLMTask, TaskOutput

IGNORE = -100


class PositionLogits(nn.Module):
    """Logits that name their own position: ``logits[b, t, v] = 100 * b + t`` (every v)."""

    def __init__(self, vocab: int = 16) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        pos = 100.0 * torch.arange(b)[:, None] + torch.arange(t)[None, :]
        return pos[:, :, None].expand(b, t, self.vocab).clone()


def test_causal_lm_units_are_shifted_answer_tokens():
    task = CausalLMTask(pad_token_id=0, answer_only=True)
    items = [
        {"input_ids": torch.tensor([5, 6, 7, 8, 9]), "answer_start": 3},  # answer = tokens 8, 9
        # answer from index 1, with a -100 label at index 2; row is right-padded to length 5
        {"input_ids": torch.tensor([1, 2, 3, 4]), "labels": torch.tensor([1, 2, IGNORE, 4]), "answer_start": 1},
    ]
    data = task.collate(items)
    assert data["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]]
    assert data["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert data["labels"].tolist() == [[IGNORE] * 3 + [8, 9], [IGNORE, 2, IGNORE, 4, IGNORE]]

    out = task.forward(PositionLogits(), data)
    assert out.targets.tolist() == [8, 9, 2, 4]
    assert out.owner.tolist() == [0, 0, 1, 1]
    # The logits predicting token t+1 come from position t: 8 (pos 3) <- 2, 9 <- 3; 2 (pos 1) <- 0, 4 (pos 3) <- 2.
    assert out.logits[:, 0].tolist() == [2.0, 3.0, 100.0, 102.0]
    assert out.sample_units().tolist() == [2.0, 2.0]

    # Per-sample loss is the mean CE over exactly those units (uniform logits here: log V each).
    assert torch.allclose(out.sample_loss(), torch.full((2,), math.log(16)))


def test_causal_lm_without_answer_start_supervises_all_but_padding():
    task = CausalLMTask(pad_token_id=0)
    data = task.collate([{"input_ids": torch.tensor([3, 4, 5])}, {"input_ids": torch.tensor([6, 7])}])
    out = task.forward(PositionLogits(), data)
    assert out.targets.tolist() == [4, 5, 7]
    assert out.logits[:, 0].tolist() == [0.0, 1.0, 100.0]


@pytest.mark.parametrize(
    ("reference", "candidate", "expected"),
    [
        ([1, 2, 3, 4], [1, 2, 3, 4], 1.0),
        ([1, 2, 3, 4], [1, 3, 4, 5], 3 / 4),  # LCS 1 3 4
        ([1, 2, 3], [3, 2, 1], 1 / 3),
        ([1, 2, 3, 4, 5], [5, 1, 9, 3, 9, 5], 3 / 5),  # LCS 1 3 5
        ([1, 2], [1, 7, 7, 7, 2], 1.0),  # recall ignores extra candidate tokens
        ([1, 2, 3], [4, 5], 0.0),
        ([1, 2, 3], [], 0.0),
        ([], [1], 0.0),
        (list("ABCBDAB"), list("BDCABA"), 4 / 7),  # the textbook LCS example: BCBA
    ],
)
def test_rouge_l_recall_hand_values(reference, candidate, expected):
    assert rouge_l_recall(reference, candidate) == pytest.approx(expected)


def _units_with_logprobs(per_sample: list[list[float]]) -> TaskOutput:
    """A TaskOutput over 2 classes whose unit target log-probs are exactly ``per_sample``."""
    lp = torch.tensor([v for row in per_sample for v in row], dtype=torch.float64)
    logits = torch.stack([lp, torch.log1p(-torch.exp(lp))], dim=1)  # p(target=0) = exp(lp)
    owner = torch.tensor([i for i, row in enumerate(per_sample) for _ in row])
    return TaskOutput(logits, torch.zeros(len(lp), dtype=torch.long), owner, len(per_sample))


def test_mink_scores_hand_values():
    out = _units_with_logprobs([[-1.0, -2.0, -3.0, -4.0, -5.0], [-0.5, -0.1], [-2.0]])
    scores = mink_scores(out, k=0.4)  # ceil(0.4 n): 2, 1, 1 lowest units
    assert scores.tolist() == pytest.approx([-4.5, -0.5, -2.0])
    assert mink_scores(out, k=1.0).tolist() == pytest.approx([-3.0, -0.3, -2.0])  # k=1: mean log-prob


def test_mink_auc_separates_clear_members():
    rng = np.random.default_rng(0)
    members = [list(-rng.uniform(0.0, 0.3, size=rng.integers(2, 8))) for _ in range(20)]
    nonmembers = [list(-rng.uniform(1.0, 6.0, size=rng.integers(2, 8))) for _ in range(20)]
    member_scores = mink_scores(_units_with_logprobs(members), k=0.2).numpy()
    nonmember_scores = mink_scores(_units_with_logprobs(nonmembers), k=0.2).numpy()
    assert membership_auc(member_scores, nonmember_scores) == pytest.approx(1.0)
    assert membership_auc(nonmember_scores, member_scores) == pytest.approx(0.0)
    # Identical distributions: chance level.
    assert membership_auc(member_scores, member_scores) == pytest.approx(0.5)


def _tiny_gpt2(vocab: int = 40):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=vocab, n_positions=64, eos_token_id=1, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


def _qa_dataset(n: int = 12, vocab: int = 40, seed: int = 0) -> IdDataset:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        prompt = torch.randint(2, vocab, (3 + i % 4,), generator=g)
        answer = torch.randint(2, vocab, (2 + i % 3,), generator=g)
        ids = torch.cat([prompt, answer, torch.tensor([1])])
        items.append({"input_ids": ids, "labels": ids.clone(), "answer_start": len(prompt)})
    return IdDataset(items, np.arange(n), 500 + np.arange(n))


def test_batched_left_padded_greedy_matches_one_by_one():
    model, task, ds = _tiny_gpt2(), CausalLMTask(pad_token_id=0), _qa_dataset()
    batched = greedy_answers(model, task, ds, max_new_tokens=5, batch_size=12)
    single = greedy_answers(model, task, ds, max_new_tokens=5, batch_size=1)
    assert batched == single
    assert all(len(a) <= 5 and 1 not in a for a in batched)


def test_evaluate_lm_metrics_and_empty_sets():
    model, task, ds = _tiny_gpt2(), CausalLMTask(pad_token_id=0), _qa_dataset()
    forget, test = ds.subset(ds.ids[:6]), ds.subset(ds.ids[6:])
    metrics = evaluate_lm(model, task, forget=forget, retain=ds.subset([]), test=test, batch_size=4)
    assert set(metrics) == {
        "forget_loss", "forget_prob", "forget_rougeL", "test_loss", "test_prob", "test_rougeL",
        "mia_mink_auc", "mia_loss_auc",
    }
    # forget_loss is the mean over samples of the answer CE (answer tokens + eos), computed directly here.
    batch = next(iter(make_loader(forget, task.collate, batch_size=6)))
    with torch.no_grad():
        logits = model(input_ids=batch.data["input_ids"], attention_mask=batch.data["attention_mask"]).logits
    losses = []
    for row in range(6):
        start, n = int(batch.data["answer_start"][row]), int(batch.data["attention_mask"][row].sum())
        target = batch.data["input_ids"][row, start:n]
        losses.append(F.cross_entropy(logits[row, start - 1 : n - 1], target).item())
    assert metrics["forget_loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert metrics["forget_prob"] == pytest.approx(np.mean(np.exp(-np.array(losses))), rel=1e-5)
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("forget_rougeL", "test_rougeL", "mia_mink_auc"))

    only_test = evaluate_lm(model, task, forget=None, retain=None, test=test)
    assert set(only_test) == {"test_loss", "test_prob", "test_rougeL"}
    assert evaluate_lm(model, task, forget=None, retain=None, test=None) == {}
