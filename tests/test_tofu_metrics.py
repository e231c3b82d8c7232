"""TOFU metrics (issue 17 step 2): truth ratio, forget quality (KS p-value), model utility, and the templated
paraphrased / perturbed answers of the authors QA; hand computations on tiny inputs, then the authors CI variant."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from erasus_ray.benchmarks.authors import AuthorsBenchmark  # noqa: E402
from erasus_ray.benchmarks.base import build_benchmark  # noqa: E402
from erasus_ray.data import IdDataset  # noqa: E402
from erasus_ray.errors import InvalidConfigError, InvalidDataError  # noqa: E402
from erasus_ray.evaluation.protocols.tofu import (  # noqa: E402
    forget_quality,
    forget_truth_ratio_stat,
    retain_truth_ratio_stat,
    truth_ratio_from_losses,
    truth_ratios,
    utility_from_parts,
)
from erasus_ray.evaluation.protocols.tofu_data import tofu_answers, tofu_dataset  # noqa: E402
from erasus_ray.evaluation.suite import MetricSuite  # noqa: E402
from erasus_ray.tasks import CausalLMTask  # noqa: E402


def test_ks_p_value_hand_values():
    # fully separated samples of 3 and 3: exact two-sided p = 2 / C(6, 3) = 0.1; identical samples: p = 1
    assert forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)
    assert forget_quality([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)
    # a monotone map of both sides (R -> 1/R) leaves the p-value unchanged; NaN / inf ratios are dropped
    a, b = np.array([0.2, 0.5, 0.9, 1.4]), np.array([0.8, 1.5, 2.0, 3.0, 4.0])
    assert forget_quality(1 / a, 1 / b) == pytest.approx(forget_quality(a, b))
    assert forget_quality(np.r_[a, np.nan, np.inf], b) == pytest.approx(forget_quality(a, b))
    assert math.isnan(forget_quality([], b))


def test_truth_ratio_two_sample_hand_example():
    # sample 0: L_para 1, perturbed 2 and 4 -> R = e^(1 - 3) = e^-2 (prefers the truth)
    # sample 1: L_para 2, perturbed 1 and 1 -> R = e^(2 - 1) = e (prefers the wrong facts)
    ratios = truth_ratio_from_losses(np.array([1.0, 2.0]), np.array([[2.0, 4.0], [1.0, 1.0]]))
    assert ratios == pytest.approx([math.exp(-2), math.e])
    assert forget_truth_ratio_stat(ratios) == pytest.approx((math.exp(-2) + math.exp(-1)) / 2)
    assert retain_truth_ratio_stat(ratios) == pytest.approx((1 - math.exp(-2)) / 2)
    assert utility_from_parts(0.5, 1.0, 0.25) == pytest.approx(3 / (2 + 1 + 4))
    assert utility_from_parts(0.5, 0.0, 0.25) == 0.0


def _answer_nll(model, prompt: list[int], answer: list[int]) -> float:
    """Mean answer-token NLL, written out from the logits (the oracle)."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
    targets = ids[0, 1:]
    picked = logp[torch.arange(len(targets)), targets][len(prompt) - 1:]
    return float(-picked.mean())


def test_truth_ratios_through_a_model_match_the_written_out_likelihoods():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=30, n_positions=32)).eval()
    prompts, para, pert = [[3, 4, 5], [6, 7]], [[8, 9, 1], [10, 1]], [[[11, 1], [12, 13, 1]], [[14, 15, 1], [16, 1]]]

    def item(p, a):
        ids = torch.tensor(p + a)
        return {"input_ids": ids, "labels": ids.clone(), "answer_start": len(p)}

    items = [{**item(p, a), "paraphrased": item(p, a), "perturbed": [item(p, w) for w in ws]}
             for p, a, ws in zip(prompts, para, pert)]
    data = IdDataset(items, np.arange(2), [7, 3])
    got = truth_ratios(model, CausalLMTask(pad_token_id=0), data, batch_size=2)
    expected = [math.exp(_answer_nll(model, p, a) - np.mean([_answer_nll(model, p, w) for w in ws]))
                for p, a, ws in zip(prompts, para, pert)]
    assert got == pytest.approx(expected, rel=1e-5)
    # plain QA items (no paraphrases) are refused with the fix named
    plain = IdDataset([item(p, a) for p, a in zip(prompts, para)], np.arange(2), [7, 3])
    with pytest.raises(InvalidDataError, match="paraphrased.*tofu_dataset"):
        truth_ratios(model, CausalLMTask(pad_token_id=0), plain, split="forget")


def test_templated_answers_change_only_the_fact():
    spec = AuthorsBenchmark(variant="ci")
    a = tofu_answers(spec, 7, n_perturbed=3, seed=0)
    clause = a["paraphrased"][len(a["answer"]):]
    assert a["paraphrased"].startswith(a["answer"]) and clause
    assert len(a["perturbed"]) == 3 and len(set(a["perturbed"])) == 3
    heldout_facts = {qa["answer"] for author in spec.heldout_authors for qa in author["qa"]}
    for wrong in a["perturbed"]:
        assert wrong.endswith(clause) and wrong != a["paraphrased"]
        assert wrong[: -len(clause)] in heldout_facts
    assert tofu_answers(spec, 7, seed=0) == a and tofu_answers(spec, 7, seed=1) != a
    with pytest.raises(InvalidConfigError, match="n_perturbed"):
        tofu_answers(spec, 7, n_perturbed=50)


@pytest.fixture(scope="module")
def authors_ci():
    spec = AuthorsBenchmark(variant="ci")
    bench = build_benchmark(spec, "forget10", seed=0)
    return spec, bench, tofu_dataset(spec, bench.forget)


def test_forget_quality_gold_against_itself_high_original_low(authors_ci):
    spec, b, forget = authors_ci
    assert len(forget) == 20 and forget.ids.tolist() == b.forget.ids.tolist()
    gold, original = truth_ratios(b.gold, b.task, forget), truth_ratios(b.original, b.task, forget)
    assert forget_quality(gold, gold) == pytest.approx(1.0)
    # the original still knows the forget authors (prefers the true fact: R well below the gold model's)
    assert np.median(original) < 0.5 * np.median(gold)
    assert forget_quality(original, gold) < 1e-3
    # the registered forget truth ratio reads the same per-sample ratios
    suite = MetricSuite(["forget_truth_ratio", "forget_prob"]).run(b.original, forget, b.retain, task=b.task)
    assert suite["forget_truth_ratio"] == pytest.approx(forget_truth_ratio_stat(original))


def test_model_utility_on_authors_retain(authors_ci):
    spec, b, _ = authors_ci
    retain = tofu_dataset(spec, b.retain.subset(b.retain.ids[:60]))
    names = ["model_utility", "retain_prob", "retain_rougeL", "retain_truth_ratio"]
    got = MetricSuite(names).run(b.original, retain, retain, task=b.task)
    parts = [got["retain_prob"], got["retain_rougeL"], got["retain_truth_ratio"]]
    assert got["model_utility"] == pytest.approx(utility_from_parts(*parts))
    assert got["retain_prob"] > 0.8 and got["retain_rougeL"] > 0.8 and got["retain_truth_ratio"] > 0.3
    # a fresh, untrained model of the same architecture has next to no utility
    fresh = MetricSuite(names).run(spec.build_model(seed=1), retain, retain, task=b.task)
    assert fresh["model_utility"] < 0.2 * got["model_utility"]
