"""The metrics issue 17 lists that the registry lacked: offline shadow-model LiRA, extraction strength, the
unlearning run's wall time (``seconds``) and MUSE's word-level ROUGE-L F1; each against a hand computation or a
constructed case that fails if the definition were wrong."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn
from torch.utils.data import TensorDataset

from erasus_ray.errors import InvalidConfigError
from erasus_ray.evaluation import metric_names_for, run_metrics
from erasus_ray.evaluation.cost import timed
from erasus_ray.evaluation.lira import LiraShadows, lira_offline_scores, logit_confidence
from erasus_ray.evaluation.lm import extraction_strengths, rouge_l_f1_words, rouge_l_recall, rouge_words
from erasus_ray.evaluation.loss_metrics import membership_auc
from erasus_ray.evaluation.protocols import UnlearningBenchmark
from erasus_ray.evaluation.protocols.muse import word_rouge_f1
from erasus_ray.evaluation.protocols.tofu import option_probability
from erasus_ray.evaluation.suite import MetricSuite
from erasus_ray.data import IdDataset
from erasus_ray.tasks import CausalLMTask, TaskOutput, get_task


# --- LiRA ------------------------------------------------------------------------------------------------------------
def test_logit_confidence_by_hand():
    # p = exp(-loss): p = 1/2 -> log(1) = 0; p = 0.9 -> log(9)
    assert logit_confidence(np.array([math.log(2.0), -math.log(0.9)])) == pytest.approx([0.0, math.log(9.0)])


def test_lira_statistic_equals_the_hand_computation():
    target = np.array([1.0, 0.0])
    shadow = np.array([[0.0, 2.0, 1.0], [1.0, 1.0, 4.0]])
    mu = np.array([1.0, 2.0])
    sd = np.array([math.sqrt(2 / 3), math.sqrt(2.0)])  # population std of the shadow rows
    assert lira_offline_scores(target, shadow) == pytest.approx(norm.cdf((target - mu) / sd))
    pooled = math.sqrt((2 / 3 + 2.0) / 2)
    assert lira_offline_scores(target, shadow, fixed_variance=True) == pytest.approx(norm.cdf((target - mu) / pooled))


def _difficulty_case(shift: float, n: int = 300, shadows: int = 8, seed: int = 0):
    """Per-sample difficulty d ~ N(0, 3^2) that every model shares; members are fitted ``shift`` above it."""
    rng = np.random.default_rng(seed)
    d_members, d_non = rng.normal(0, 3, n), rng.normal(0, 3, n)
    shadow = lambda d: d[:, None] + rng.normal(0, 0.5, (len(d), shadows))  # noqa: E731
    target_m, target_n = d_members + shift + rng.normal(0, 0.5, n), d_non + rng.normal(0, 0.5, n)
    return (lira_offline_scores(target_m, shadow(d_members)), lira_offline_scores(target_n, shadow(d_non)),
            target_m, target_n)


def test_lira_separates_a_shifted_member_distribution_and_not_identical_ones():
    members, nonmembers, raw_m, raw_n = _difficulty_case(shift=2.0)
    assert membership_auc(members, nonmembers) > 0.9
    # the per-sample calibration is what does it: the same scores without shadows are buried in the difficulty spread
    assert membership_auc(raw_m, raw_n) < 0.8
    members, nonmembers, _, _ = _difficulty_case(shift=0.0, seed=1)
    assert abs(membership_auc(members, nonmembers) - 0.5) < 0.07


def _one_hot_data(ids: np.ndarray, n: int) -> IdDataset:
    x = torch.eye(n)[torch.as_tensor(ids)]
    y = torch.as_tensor(ids % 2)
    return IdDataset(TensorDataset(x, y), np.arange(len(ids)), ids)


def _train_lookup(data: IdDataset, seed: int, n: int = 80) -> nn.Module:
    """A linear map of one-hot sample codes: it memorises exactly the samples it is trained on."""
    torch.manual_seed(seed)
    model = nn.Linear(n, 2, bias=False)
    xs = torch.stack([data[r][1][0] for r in range(len(data))])
    ys = torch.stack([data[r][1][1] for r in range(len(data))])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xs), ys).backward()
        opt.step()
    return model


def test_lira_through_the_registry_with_shadows_trained_on_reference_halves():
    n = 80
    forget, retain, test = (np.arange(0, 20), np.arange(20, 60), np.arange(60, 80))
    sets = {"forget": _one_hot_data(forget, n), "retain": _one_hot_data(retain, n), "test": _one_hot_data(test, n)}
    sizes = []

    def trainer(data, seed):
        sizes.append(len(data))
        return _train_lookup(data, seed)

    shadows = LiraShadows(reference=sets["retain"], train=trainer, n_shadows=4, seed=0)
    target = _train_lookup(_one_hot_data(np.r_[forget, retain], n), seed=9)  # trained on the forget set
    gold = _train_lookup(sets["retain"], seed=9)  # never saw it
    task = get_task("classification", target)
    value = lambda m: run_metrics(m, task, sets, ["mia_lira_auc"], lira=shadows)["mia_lira_auc"]  # noqa: E731
    assert value(target) > 0.9
    assert value(gold) < 0.75
    assert sizes == [20] * 4  # four shadows, each on half of the 40 reference samples, trained once for both models


def test_lira_and_seconds_are_never_defaults_and_refuse_without_their_option():
    model = nn.Linear(4, 2)
    task = get_task("classification", model)
    assert not {"mia_lira_auc", "seconds"} & set(metric_names_for(task))
    data = IdDataset(TensorDataset(torch.randn(4, 4), torch.tensor([0, 1, 0, 1])), np.arange(4), np.arange(4))
    with pytest.raises(InvalidConfigError, match="lira"):
        run_metrics(model, task, {"forget": data, "test": data}, ["mia_lira_auc"])
    with pytest.raises(InvalidConfigError, match="unlearn_seconds"):
        run_metrics(model, task, {"forget": data}, ["seconds"])
    with pytest.raises(InvalidConfigError, match="train"):
        LiraShadows(reference=data)


# --- extraction strength ---------------------------------------------------------------------------------------------
def test_extraction_strength_by_hand():
    right, wrong = [5.0, 0.0], [0.0, 5.0]
    rows = [wrong, right, wrong, right,  # F T F T: the last miss is unit 3 (1-based), so k = 3, ES = 1/4
            right, right,  # T T: ES = 1
            right, wrong]  # T F: nothing reproduced, ES = 0
    out = TaskOutput(torch.tensor(rows), torch.zeros(8, dtype=torch.long), torch.tensor([0, 0, 0, 0, 1, 1, 2, 2]),
                     batch_size=3)
    assert extraction_strengths(out).tolist() == pytest.approx([0.25, 1.0, 0.0])


class _FixedLM(nn.Module):
    """Every position predicts softmax(bias): token 5 is always the argmax."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.0, 0, 0, 1.0, 0, 3.0, 0, 0]))

    def forward(self, input_ids, attention_mask=None):
        return self.bias.expand(*input_ids.shape, -1)


def test_extraction_strength_through_the_registry_on_a_constructed_lm():
    items = [{"input_ids": torch.tensor([1, 2, 5, 5, 5]), "answer_start": 2},  # greedy gives 5 5 5 from the prompt: 1
             {"input_ids": torch.tensor([1, 2, 3, 5, 5]), "answer_start": 2},  # needs the prefix "3": 1 - 1/3
             {"input_ids": torch.tensor([1, 2, 5, 5, 3]), "answer_start": 2}]  # last token never produced: 0
    data = IdDataset(items, np.arange(3), np.arange(3))
    value = MetricSuite(["forget_extraction_strength"]).run(_FixedLM(), data, data, task=CausalLMTask())
    assert value["forget_extraction_strength"] == pytest.approx((1 + 2 / 3 + 0) / 3)


# --- seconds ---------------------------------------------------------------------------------------------------------
def test_timed_with_a_fake_clock_and_the_seconds_metric():
    ticks = iter([10.0, 12.5, 20.0, 27.0])
    short = timed(lambda: "a", clock=lambda: next(ticks))
    long = timed(lambda: "b", clock=lambda: next(ticks))
    assert short == ("a", 2.5) and long == ("b", 7.0)
    model = nn.Linear(4, 2)
    data = IdDataset(TensorDataset(torch.randn(4, 4), torch.tensor([0, 1, 0, 1])), np.arange(4), np.arange(4))
    value = lambda s: MetricSuite(["seconds"]).run(model, data, data, unlearn_seconds=s)["seconds"]  # noqa: E731
    assert value(short[1]) == 2.5 and value(long[1]) == 7.0  # the longer run reports more seconds


def test_a_suite_result_with_object_options_saves_as_json(tmp_path):
    data = IdDataset(TensorDataset(torch.eye(4), torch.tensor([0, 1, 0, 1])), np.arange(4), np.arange(4))
    model = nn.Linear(4, 2)
    result = MetricSuite(["mia_lira_auc", "seconds"]).run(
        model, data, data, data, lira=LiraShadows(models=[model, nn.Linear(4, 2)]), unlearn_seconds=1.5)
    result.save(tmp_path / "r.json")
    saved = __import__("json").loads((tmp_path / "r.json").read_text())
    assert saved["options"] == {"lira": "LiraShadows", "unlearn_seconds": 1.5} and saved["metrics"]["seconds"] == 1.5


def test_benchmark_report_carries_seconds_per_model():
    torch.manual_seed(0)
    models = [nn.Linear(4, 2) for _ in range(3)]
    data = TensorDataset(torch.randn(8, 4), torch.tensor([0, 1] * 4))
    report = UnlearningBenchmark("general", include_privacy=False).evaluate(
        models[:2], data, data, data, gold_model=models[2], unlearn_seconds=[1.0, 3.0])
    assert [r["seconds"] for r in report.runs] == [1.0, 3.0]
    assert report.metrics["seconds"] == 2.0 and report.std["seconds"] == 1.0
    with pytest.raises(InvalidConfigError, match="unlearn_seconds"):
        UnlearningBenchmark("general", include_privacy=False).evaluate(
            models[:2], data, data, data, gold_model=models[2], unlearn_seconds=[1.0])


# --- MUSE ROUGE-L F1 on words ----------------------------------------------------------------------------------------
def test_rouge_words_and_f1_by_hand():
    assert rouge_words("The cat, sat-on THE mat!") == ["the", "cat", "sat", "on", "the", "mat"]
    # LCS(the cat sat on the mat / the cat is on a mat) = the cat on mat = 4: P = R = 4/6
    assert rouge_l_f1_words("The cat sat on the mat.", "the cat is on a mat") == pytest.approx(4 / 6)
    # P = 1, R = 1/2 -> F1 = 2/3, where recall alone would be 1/2 and is blind to extra words
    assert rouge_l_f1_words("Lisbon, Portugal", "lisbon") == pytest.approx(2 / 3)
    assert rouge_l_f1_words("New York", "new york city") == pytest.approx(0.8)
    assert rouge_l_f1_words("abc", "") == 0.0 and rouge_l_f1_words("abc", "xyz") == 0.0
    assert rouge_l_recall([1, 2, 3], [1, 3]) == pytest.approx(2 / 3)  # TOFU's stays recall on ids


def test_rouge_l_f1_stems_like_rouge_score_with_use_stemmer():
    """MUSE's ROUGE-L (open-unlearning's ``RougeScorer(["rougeL"], use_stemmer=True)``): inflections match after
    Porter stemming ("memorised" / "memorising", "studies" / "study"), short words are never stemmed, and every
    score equals the ``rouge_score`` package's on sentences built to differ with and without the stemmer."""
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    assert rouge_words("She studies memorised facts", stem=True) == ["she", "studi", "memoris", "fact"]
    assert rouge_words("was is", stem=True) == ["was", "is"]  # <= 3 characters: kept as they are
    # 'running'/'runs' -> 'run' and 'cities'/'city' -> 'citi' match only with the stemmer: 3 of 4 words -> F1 0.75
    assert rouge_l_f1_words("running cities grow fast", "runs city grows", stem=False) == 0.0
    assert rouge_l_f1_words("running cities grow fast", "runs city grows") == pytest.approx(2 * 1 * 0.75 / 1.75)
    pairs = [("The author memorised the facts.", "the authors were memorising facts"),
             ("Ingrid was born in Jakobstad in 1962.", "Ingrid, born 1962 in Jakobstad, writes poems"),
             ("running cities grow fast", "runs city grows"), ("", "anything"), ("Généralement connu", "generally known"),
             ("He studied nationalization policies", "they study a nationalized policy")]
    for stem in (True, False):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem)
        for ref, cand in pairs:
            assert rouge_l_f1_words(ref, cand, stem=stem) == pytest.approx(scorer.score(ref, cand)["rougeL"].fmeasure)


class _WordTokenizer:
    vocab = {1: "New", 2: " York", 3: " city", 4: "<eos>"}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.vocab[i] for i in ids if not (skip_special_tokens and i == 4))


class _Ctx:
    def __init__(self, tokenizer):
        self.task = CausalLMTask(tokenizer=tokenizer)


def test_muse_rouge_decodes_ids_to_words_with_the_tokenizer():
    # token recall of [1, 2] in [1, 2, 3] would be 1.0; MUSE's F1 on the decoded words is 0.8
    assert word_rouge_f1(_Ctx(_WordTokenizer()), [[1, 2]], [[1, 2, 3, 4]]) == pytest.approx(0.8)
    with pytest.raises(InvalidConfigError, match="tokenizer"):
        word_rouge_f1(_Ctx(None), [[1, 2]], [[1, 2]])


def test_muse_metrics_refuse_a_task_without_tokenizer_before_any_work():
    items = [{"input_ids": torch.tensor([1, 2, 5, 5]), "answer_start": 2}]
    data = IdDataset(items, np.arange(1), np.arange(1))
    with pytest.raises(InvalidConfigError, match="tokenizer"):
        MetricSuite(["forget_verbmem"]).run(_FixedLM(), data, data, task=CausalLMTask())


# --- TOFU's real-world utility sets ----------------------------------------------------------------------------------
class _BigramLM(nn.Module):
    """Next-token logits from a table indexed by the current token, with a greedy ``generate`` (HF-style)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return self.table[input_ids]

    def generate(self, input_ids, attention_mask=None, max_new_tokens=1, **_):
        for _ in range(max_new_tokens):
            input_ids = torch.cat([input_ids, self.forward(input_ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return input_ids


def _tofu_item(prompt: int, answer: list[int], wrong: list[int]) -> dict:
    enc = lambda ans: {"input_ids": torch.tensor([prompt] + ans), "answer_start": 1}  # noqa: E731
    return {**enc(answer), "paraphrased": enc(answer + [7]), "perturbed": [enc(wrong + [7])]}


def _table(world_right: bool) -> torch.Tensor:
    table = torch.zeros(8, 8)
    table[1, 3] = table[3, 4] = table[4, 7] = 4.0  # retain: prompt 1 -> 3 4 (7 ends)
    table[2, 5 if world_right else 6] = 4.0  # world facts: prompt 2 -> 5 4; a wrecked model says 6
    table[5, 4] = table[6, 4] = 4.0
    return table


def test_option_probability_by_hand():
    # P(a) = e^-1, one wrong option with P = e^-2: e^-1 / (e^-1 + e^-2)
    assert option_probability(np.array([1.0]), np.array([[2.0]])) == pytest.approx(1 / (1 + math.exp(-1)))


def test_model_utility_includes_the_world_facts_set():
    retain = IdDataset([_tofu_item(1, [3, 4], [6, 4])], np.arange(1), np.arange(1))
    world = {"world_facts": IdDataset([_tofu_item(2, [5, 4], [6, 4])], np.arange(1), np.arange(1))}
    task = CausalLMTask()
    utility = lambda model, **o: run_metrics(model, task, {"retain": retain}, ["model_utility"], **o)["model_utility"]  # noqa: E731
    good, wrecked = _BigramLM(_table(True)), _BigramLM(_table(False))
    assert utility(good) == pytest.approx(utility(wrecked))  # the retain set cannot tell them apart
    assert utility(wrecked, utility_sets=world) < utility(good, utility_sets=world) - 0.1


def test_tofu_world_facts_stand_in_is_trained_never_forgotten_and_built_as_truth_ratio_items():
    from erasus_ray.evaluation.protocols.tofu_data import (
        PARAPHRASED, PERTURBED, WORLD_ID_OFFSET, TofuAuthorsBenchmark, load_world_facts, world_facts_dataset,
    )

    facts = load_world_facts()
    assert len(facts) == 20 and all(f["answer"] not in " ".join(f[PERTURBED]) for f in facts)
    spec = TofuAuthorsBenchmark(variant="ci")
    data = spec.build_data("forget10", seed=0)
    world_ids = WORLD_ID_OFFSET + np.arange(len(facts))
    assert set(world_ids) <= set(data.train.ids.tolist()) and not set(world_ids) & set(data.forget_ids.tolist())
    world = world_facts_dataset(spec)
    assert world.ids.tolist() == world_ids.tolist()
    assert all(len(world[r][1][PERTURBED]) == 3 and PARAPHRASED in world[r][1] for r in range(len(world)))
    assert spec.config("forget10", 0)["world_sha"]  # the facts are part of the cache key


def test_fact_sets_load_by_name_and_encode_in_the_format_asked():
    from erasus_ray.errors import InvalidConfigError
    from erasus_ray.evaluation.protocols.tofu_data import (
        FACT_SETS, PARAPHRASED, PERTURBED, TofuAuthorsBenchmark, load_facts, world_facts_dataset,
    )

    for name in FACT_SETS:
        facts = load_facts(name)
        assert len(facts) == 20 and len({f["question"] for f in facts}) == 20
        # a perturbed answer is the paraphrase with another fact: never the paraphrase itself
        assert all(len(f[PERTURBED]) == 3 and f[PARAPHRASED] not in f[PERTURBED] for f in facts)
    sentences = load_facts("world_facts_sentences")  # the same questions as the bare world facts, true fact kept
    assert [f["question"] for f in sentences] == [f["question"] for f in load_facts("world_facts")]
    assert all(f["answer"].endswith(w["answer"] + ".") for f, w in zip(sentences, load_facts("world_facts")))
    with pytest.raises(InvalidConfigError, match="fact set"):
        load_facts("capitals")

    spec = TofuAuthorsBenchmark(variant="ci")
    tok = spec.tokenizer
    chat = world_facts_dataset(spec, "real_authors", lambda q, a: (f"<user> {q} <assistant>", f" {a}"))
    _, item = chat[0]
    assert tok.decode(item["input_ids"][:item["answer_start"]]) == "<user> Who wrote Pride and Prejudice? <assistant>"
    para = item[PARAPHRASED]
    assert tok.decode(para["input_ids"][para["answer_start"]:-1]) == " Jane Austen wrote Pride and Prejudice."


def test_each_utility_set_is_reported_beside_the_model_utility():
    """TOFU reports model utility per set; the suite keeps each utility set's three parts (their harmonic mean with
    the retain set's three is the utility, by hand), and the set the wrecked model lost shows where utility went."""
    from scipy.stats import hmean

    from erasus_ray.evaluation.suite import MetricSuite

    retain = IdDataset([_tofu_item(1, [3, 4], [6, 4])], np.arange(1), np.arange(1))
    world = {"world_facts": IdDataset([_tofu_item(2, [5, 4], [6, 4])], np.arange(1), np.arange(1))}
    names = ["model_utility", "retain_prob", "retain_rougeL", "retain_truth_ratio"]
    run = lambda model: MetricSuite(names).run(model, retain, retain, task=CausalLMTask(), utility_sets=world)  # noqa: E731
    good, wrecked = run(_BigramLM(_table(True))), run(_BigramLM(_table(False)))
    keys = ["world_facts_prob", "world_facts_rougeL", "world_facts_truth_ratio"]
    assert sorted(good.parts) == sorted(keys) and good.to_dict()["parts"].keys() == set(keys)
    parts = [good[n] for n in names[1:]] + [good.parts[k] for k in keys]
    assert good["model_utility"] == pytest.approx(hmean(parts))
    assert wrecked.parts["world_facts_prob"] < good.parts["world_facts_prob"] - 0.1
    assert MetricSuite(names).run(_BigramLM(_table(True)), retain, retain, task=CausalLMTask()).parts == {}
