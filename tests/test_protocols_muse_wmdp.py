"""MUSE and WMDP protocols (issue 17): each metric against a hand computation on tiny inputs, the verdict thresholds,
bad input, and (slow) the protocols on the trained stand-ins: the gold model passes, the original fails, RMU takes the
hazardous accuracy to chance while general accuracy holds."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from erasus_ray.errors import InvalidConfigError, InvalidDataError, UnknownNameError
from erasus_ray.evaluation.lm import minkpp_scores, minkpp_unit_scores
from erasus_ray.evaluation.protocols import PROTOCOLS, UnlearningBenchmark, VerdictThresholds
from erasus_ray.evaluation.protocols.benchmark import check_same_architecture
from erasus_ray.evaluation.protocols.muse import privleak
from erasus_ray.evaluation.protocols.tofu import forget_quality, forget_truth_ratio_stat, truth_ratio_from_losses
from erasus_ray.evaluation.protocols.wmdp import chance_bound, choice_logliks, mcq_accuracy, mcq_accuracy_from_logliks
from erasus_ray.evaluation.suite import MetricSuite
from erasus_ray.data import IdDataset
from erasus_ray.tasks import CausalLMTask, TaskOutput


def test_forget_quality_is_scipys_ks_pvalue():
    a, b = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0.9, 1.2, 0.7, 1.5, 2.0])
    assert forget_quality(a, b) == pytest.approx(stats.ks_2samp(a, b).pvalue)
    assert forget_quality(a, 1 / a) == forget_quality(1 / a, a)  # symmetric in its arguments


def test_truth_ratio_on_two_samples():
    # sample 0: L_para 0.5, perturbed mean 1.5 -> R = e^-1 (prefers the truth); sample 1: equal -> R = 1
    ratios = truth_ratio_from_losses(np.array([0.5, 1.0]), np.array([[1.0, 2.0], [1.0, 1.0]]))
    assert ratios == pytest.approx([math.exp(-1), 1.0])
    assert forget_truth_ratio_stat(ratios) == pytest.approx((math.exp(-1) + 1) / 2)


def test_privleak_sign_and_scale():
    assert privleak(0.75, 0.5) == pytest.approx(0.5)  # under-unlearning: the attack does better than on retrain
    assert privleak(0.25, 0.5) == pytest.approx(-0.5)  # over-unlearning: worse than on retrain
    assert privleak(0.5, 0.5) == 0.0
    assert math.isnan(privleak(0.7, 0.0))


def test_minkpp_unit_score_by_hand():
    logits = torch.tensor([[0.0, math.log(2.0)], [math.log(3.0), 0.0]])
    out = TaskOutput(logits, torch.tensor([1, 1]), torch.tensor([0, 0]), batch_size=1)
    expected = []
    for row, target in ((np.array([1 / 3, 2 / 3]), 1), (np.array([3 / 4, 1 / 4]), 1)):
        logp = np.log(row)
        mu = (row * logp).sum()
        sigma = math.sqrt((row * logp**2).sum() - mu**2)
        expected.append((logp[target] - mu) / sigma)
    assert minkpp_unit_scores(out).numpy() == pytest.approx(expected, rel=1e-5)
    # k = 0.5 of 2 units keeps the lowest one
    assert float(minkpp_scores(out, k=0.5)[0]) == pytest.approx(min(expected), rel=1e-5)


class _FixedLM(nn.Module):
    """Every position predicts the same distribution: softmax(bias)."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias)

    def forward(self, input_ids, attention_mask=None):
        return self.bias.expand(*input_ids.shape, -1)


def _question(prompt: list[int], letters: list[int], answer: int) -> dict:
    choices = [{"input_ids": torch.tensor(prompt + [c]), "answer_start": len(prompt)} for c in letters]
    return {"input_ids": torch.tensor(prompt + [letters[answer]]), "answer_start": len(prompt), "choices": choices,
            "answer_index": answer}


def test_mcq_scoring_on_a_constructed_example():
    bias = torch.tensor([0.0, 0, 0, 0, 1.0, 3.0, 0.5, 0.0])  # token 5 is the most likely continuation
    model, task = _FixedLM(bias), CausalLMTask(pad_token_id=0)
    letters = [4, 5, 6, 7]
    data = IdDataset([_question([1, 2], letters, 1), _question([3, 2, 1], letters, 0)], np.arange(2), np.arange(2))
    logliks = choice_logliks(model, task, data)
    logp = torch.log_softmax(bias, 0).numpy()
    assert logliks == pytest.approx(np.tile(logp[letters], (2, 1)), abs=1e-5)
    assert mcq_accuracy(model, task, data) == 0.5  # question 0's answer is letter 5, question 1's is not
    assert mcq_accuracy_from_logliks(np.array([[0.0, -1.0], [-2.0, -1.0]]), np.array([0, 0])) == 0.5
    with pytest.raises(InvalidDataError, match="choices"):
        choice_logliks(model, task, IdDataset([{"input_ids": torch.tensor([1, 2])}], np.arange(1), np.arange(1)))


def test_muse_and_wmdp_criteria_at_the_documented_thresholds():
    t = VerdictThresholds()  # max_gap 0.05, utility_ratio 0.9, privleak 0.05, chance_quantile 0.95
    muse = PROTOCOLS.get("muse")(include_privacy=False)
    gold = {"forget_verbmem": 0.30, "forget_knowmem": 0.20, "retain_knowmem": 0.80, "privleak": 0.0}
    inside = {"forget_verbmem": 0.349, "forget_knowmem": 0.0, "retain_knowmem": 0.7201, "privleak": -0.049}
    assert muse.criteria(inside, gold, t) == {"forgetting": True, "utility": True, "privacy": True}
    outside = {"forget_verbmem": 0.351, "forget_knowmem": 0.0, "retain_knowmem": 0.7199, "privleak": 0.051}
    assert muse.criteria(outside, gold, t) == {"forgetting": False, "utility": False, "privacy": False}

    wmdp = PROTOCOLS.get("wmdp")(include_privacy=False)
    bound = stats.binom.ppf(0.95, 50, 0.25) / 50  # 0.36: a guesser scores at most this 95% of the time
    assert chance_bound(50) == pytest.approx(bound)
    g = {"forget_mcq_acc": 0.2, "retain_mcq_acc": 0.9, "n_hazardous": 50.0}
    assert wmdp.criteria({**g, "forget_mcq_acc": bound, "retain_mcq_acc": 0.811}, g, t) == {
        "forgetting": True, "utility": True}
    assert wmdp.criteria({**g, "forget_mcq_acc": bound + 0.02, "retain_mcq_acc": 0.809}, g, t) == {
        "forgetting": False, "utility": False}
    with pytest.raises(InvalidConfigError, match="epsilon_gap"):
        VerdictThresholds(epsilon_gap=-1)
    assert VerdictThresholds(epsilon_gap=3.0).epsilon_gap == 3.0  # nats: not a fraction


def _tiny_gpt2(width: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_positions=128, n_embd=width, n_layer=1, n_head=2))


def test_bad_input_is_named():
    pytest.importorskip("transformers")
    from erasus_ray.benchmarks.authors import AuthorsBenchmark

    spec = AuthorsBenchmark(variant="ci")
    plain = IdDataset(spec.encode([("Who?", "Me"), ("Where?", "Here")]), np.arange(2), np.arange(2))
    model, task = _tiny_gpt2(32), CausalLMTask(pad_token_id=spec.tokenizer.pad_token_id)
    # a protocol that needs KnowMem QA / answer choices, given plain QA items
    with pytest.raises(InvalidDataError, match="knowmem"):
        MetricSuite(["forget_knowmem"]).run(model, plain, plain, task=task)
    with pytest.raises(InvalidDataError, match="choices"):
        MetricSuite(["forget_mcq_acc"]).run(model, plain, plain, task=task)
    with pytest.raises(InvalidConfigError, match="held-out text"):
        UnlearningBenchmark("muse", include_privacy=False).evaluate(model, plain, plain, gold_model=model, task=task)
    # a gold model of another architecture
    with pytest.raises(InvalidConfigError, match="another architecture"):
        check_same_architecture(model, _tiny_gpt2(64))
    # unknown metric names list the known ones, with the close match
    with pytest.raises(UnknownNameError, match=r"forget_verbmem.*Known metrics:.*forget_mcq_acc"):
        MetricSuite(["forget_verbmemm"])
    with pytest.raises(UnknownNameError, match="muse.*wmdp|wmdp.*muse"):
        UnlearningBenchmark("musee")


# --- the protocols on the trained stand-ins (each trains an original and a gold tiny GPT-2 once, ~1 min, cached) ---
@pytest.fixture(scope="module")
def muse_bench():
    pytest.importorskip("transformers")
    from erasus_ray.benchmarks.base import build_benchmark
    from erasus_ray.evaluation.protocols.muse_data import MuseCorpusBenchmark

    spec = MuseCorpusBenchmark(variant="ci")
    b = build_benchmark(spec, "forget10", seed=0)
    return b, spec.muse_splits(b.info["forget_author_index"], n_retain=10)


@pytest.mark.slow
def test_muse_gold_passes_original_fails(muse_bench):
    b, (forget, retain, holdout) = muse_bench
    bench = UnlearningBenchmark("muse", include_privacy=True)
    gold = bench.evaluate(b.gold, forget, retain, holdout, gold_model=b.gold, task=b.task)
    original = bench.evaluate(b.original, forget, retain, holdout, gold_model=b.gold, task=b.task)
    assert gold.verdict == "PASS" and gold.metrics["privleak"] == 0.0
    assert original.verdict == "FAIL"
    # measured: VerbMem 0.60 vs 0.35 (the gold model knows the template words), KnowMem of the forget authors
    # high only for the original; the Min-K%++ attack separates the forget biographies only on the original
    assert original.metrics["forget_verbmem"] > gold.metrics["forget_verbmem"] + 0.1
    assert original.metrics["forget_knowmem"] > gold.metrics["forget_knowmem"] + 0.2
    assert original.metrics["privleak"] > 1.0 and original.metrics["mia_epsilon"] > gold.metrics["mia_epsilon"]


@pytest.fixture(scope="module")
def wmdp_bench():
    pytest.importorskip("transformers")
    from erasus_ray.benchmarks.base import build_benchmark
    from erasus_ray.evaluation.protocols.wmdp_data import WmdpBenchmark

    spec = WmdpBenchmark(variant="ci")
    b = build_benchmark(spec, "hazard", seed=0)
    return b, spec.wmdp_splits(b.info["forget_author_index"], n_general=50)


@pytest.mark.slow
def test_wmdp_rmu_takes_hazardous_accuracy_to_chance_and_keeps_general(wmdp_bench):
    from erasus_ray import ErasusUnlearner

    b, (hazardous, general, heldout) = wmdp_bench
    bench = UnlearningBenchmark("wmdp", include_privacy=False)
    original = bench.evaluate(b.original, hazardous, general, gold_model=b.gold, task=b.task)
    res = ErasusUnlearner(copy.deepcopy(b.original), strategy="rmu", selector=None, seed=0, progress=False,
                          task=b.task).fit(forget_data=b.forget, retain_data=b.retain, epochs=40)
    rmu = bench.evaluate(res.model, hazardous, general, gold_model=b.gold, task=b.task)
    # measured (ci, seed 0): hazardous 0.92 -> 0.28 (chance 0.25; bound 0.36 on 50 questions); general 0.90 -> 0.90
    assert original.metrics["forget_mcq_acc"] > 0.8 and not original.criteria["forgetting"]
    assert rmu.metrics["forget_mcq_acc"] <= chance_bound(len(hazardous)) and rmu.criteria["forgetting"]
    assert rmu.metrics["retain_mcq_acc"] >= 0.9 * original.metrics["retain_mcq_acc"] and rmu.criteria["utility"]
    # held-out questions were never trained on: the original answers them far below its hazardous accuracy (measured
    # 0.38 on 50: near chance; a letter-position bias can lift a trained model a little above a pure guesser)
    assert mcq_accuracy(b.original, b.task, heldout) < 0.5


def test_protocol_metrics_are_never_in_a_default_suite():
    # metrics that read extra item fields (knowmem, choices, paraphrased) are asked for by name, so evaluate() on a
    # family that declares no suite does not refuse its plain data
    from erasus_ray.evaluation.metrics import METRICS, metric_names_for

    class UndeclaredLM(CausalLMTask):  # not registered: an LM family that declares no suite
        default_metrics = None

    with_fields = {n for n in METRICS.names() if METRICS.get(n).item_fields}
    assert {"forget_knowmem", "retain_knowmem", "forget_mcq_acc", "model_utility"} <= with_fields
    suite = set(metric_names_for(UndeclaredLM))
    assert not with_fields & suite
    assert {"mia_minkpp_auc", "mia_epsilon", "forget_rougeL"} <= suite  # the rest of what it can run stays in
