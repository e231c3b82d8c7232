"""Every strategy, with its documented defaults, against the retrained (gold) model on digits.

Class 3 (a redundant forget set): every strategy that runs on a classifier must move towards the gold model
(Avg.Gap below the original model's 50.6 pts). Random 10% (each sample its own fact): the original model is already
within 1.4 pts of the gold model (seed 0; its forget accuracy is 100% against the gold model's 97.2%), so "towards
gold" leaves little room. ``RANDOM10`` lists, per strategy, what its defaults measurably do there (seed 0) and the
test asserts exactly that: four move towards gold, two barely change the model, and the rest overshoot - their
defaults are tuned to erase a class, and on random10 they forget *more* than retraining does (forget accuracy below
the gold model's, or the SVC membership-inference efficacy far above its 5.6%), or they damage retain/test
accuracy. ``benchmarks/strategy_leaderboard/digits/RESULTS.md`` has every number for 3 seeds. Random-sample
deletion needs a stopping rule (``forget_target`` at the held-out accuracy), not stronger forgetting.

``sisa`` and ``certified_removal`` start, as in the leaderboard, from the model
:func:`erasus_ray.benchmarks.prepared.prepare_model` builds (a 3-shard x 2-slice SISA ensemble; the original with a
certified convex head) and are compared with the same gold model (one MLP retrained without the forget set). On
random10 ``sisa`` ends *further* from it than the original (3.9 vs 1.4 pts, seed 0) although its unlearning is
exact: its result is bit-for-bit the SISA ensemble retrained without the forget set (checked below), and that
ensemble is itself 3.9 pts from the single retrained MLP - SISA's utility cost, not an unlearning error (see
``R10.kind == "exact_ensemble"``).
"""

import dataclasses
from dataclasses import dataclass

import pytest

from _runs_on import runs_on
from erasus_ray.benchmarks.prepared import PREPARED, prepare_model
from erasus_ray.evaluation import evaluate
from erasus_ray.experiment import JobConfig, run_job
from erasus_ray.strategies import STRATEGIES
from erasus_ray.tasks import CausalLMTask, ClassificationTask

pytestmark = pytest.mark.slow


def _runnable_on_classifier() -> list[str]:
    """Every classifier strategy that unlearns the plain original model, plus ``sisa`` and ``certified_removal``,
    which start from the model :func:`~erasus_ray.benchmarks.prepared.prepare_model` builds (a SISA ensemble, the
    original with a certified head), as in the leaderboard."""
    return [
        n for n in STRATEGIES.names()
        if n != "retrain"
        and runs_on(STRATEGIES.get(n), ClassificationTask())
        and (not STRATEGIES.get(n).contract_exempt_reason or n in PREPARED)
    ]


def _run(bench, name: str, gold: dict[str, float], benchmark: str = "digits", options: dict | None = None):
    """The strategy's job (seed 0, full forget set, documented defaults) on ``bench``, started from the prepared
    model for ``sisa`` / ``certified_removal``: (job, the model it started from)."""
    prepared = prepare_model(name, bench, 0)
    run_bench = bench if prepared is None else dataclasses.replace(bench, original=prepared[0])
    cfg = JobConfig.from_dict({"benchmark": benchmark, "scenario": bench.scenario, "seed": 0, "strategy": name,
                               "selector": None, "fraction": 1.0, "benchmark_options": options or {}})
    job = run_job(cfg, bench=run_bench, gold_metrics=gold, progress=False, fraction=1.0)
    return job, run_bench.original


def _metrics(bench, name: str, gold: dict[str, float]) -> tuple[dict[str, float], float, float]:
    """(the strategy's metrics, its Avg.Gap, the original model's Avg.Gap), seed 0, full forget set."""
    original = evaluate(bench.original, forget=bench.forget, retain=bench.retain, test=bench.test, task=bench.task,
                        gold_metrics=gold, seed=0)
    job, _ = _run(bench, name, gold)
    return job["metrics"], job["metrics"]["avg_gap"], original["avg_gap"]


def _gap(bench, name: str) -> tuple[float, float]:
    gold = evaluate(bench.gold, forget=bench.forget, retain=bench.retain, test=bench.test, task=bench.task, seed=0)
    _, gap, original_gap = _metrics(bench, name, gold)
    return gap, original_gap


@pytest.mark.parametrize("name", _runnable_on_classifier())
def test_every_strategy_moves_towards_gold_on_a_class(name, digits_class):
    gap, original_gap = _gap(digits_class, name)
    assert gap < original_gap, f"{name}: Avg.Gap {100 * gap:.1f} pts, original {100 * original_gap:.1f}"


@dataclass(frozen=True)
class R10:
    """What a strategy's defaults do on digits random10, seed 0: the property, not a number.

    kind: ``towards`` (Avg.Gap below the original's), ``no_effect`` (within 0.5 pts of the original's and not
    below the gold forget accuracy: it leaves the model almost as it was), ``overshoots`` (forgets more than
    retraining: ``metric`` is the forget accuracy below the gold model's or the SVC MIA efficacy above it, by at
    least 1 pt), ``damages`` (``metric``: retain or test accuracy below the gold model's by at least 1 pt),
    ``exact_ensemble`` (``sisa``: the result equals the SISA ensemble retrained without the forget set, whose own
    distance from the single retrained model is the whole gap; ``metric``: the one that contributes most).

    The measured numbers (Avg.Gap, the metric) move with the machine's float32 kernels, since the cached original and
    gold models are trained on the machine that runs the tests: they live in
    ``benchmarks/strategy_leaderboard/digits/RESULTS.md`` with the machine they came from, not here.
    """

    kind: str
    metric: str | None = None


RANDOM10 = {
    "activation_steering": R10("damages", "test_acc"),
    "altpo": R10("overshoots", "mia_svc_efficacy"),
    "amnesiac": R10("overshoots", "mia_svc_efficacy"),
    "auto": R10("overshoots", "forget_acc"),
    "causal_tracing": R10("overshoots", "forget_acc"),
    # from the certified head (1.8 pts before the Newton step); one Newton step of a 10% removal moves it towards gold
    "certified_removal": R10("towards"),
    "delta_unlearning": R10("overshoots", "forget_acc"),
    "dexperts": R10("overshoots", "mia_svc_efficacy"),
    "dpo": R10("overshoots", "mia_svc_efficacy"),
    "embedding_alignment": R10("overshoots", "mia_svc_efficacy"),
    "ensemble": R10("overshoots", "forget_acc"),
    "fine_tune": R10("no_effect", "forget_acc"),
    "fisher_forgetting": R10("overshoots", "mia_svc_efficacy"),
    "flat": R10("damages", "retain_acc"),
    "grad_diff": R10("overshoots", "forget_acc"),
    "gradient_ascent": R10("overshoots", "mia_svc_efficacy"),
    "idk_dpo": R10("overshoots", "mia_svc_efficacy"),
    "knowledge_distillation": R10("overshoots", "mia_svc_efficacy"),
    "l1_sparse": R10("towards"),
    "layer_freezing": R10("overshoots", "forget_acc"),
    "lora_unlearning": R10("overshoots", "mia_svc_efficacy"),
    "mask_based": R10("overshoots", "mia_svc_efficacy"),
    "negative_gradient": R10("overshoots", "mia_svc_efficacy"),
    "neggrad_plus": R10("towards"),
    "neuron_pruning": R10("overshoots", "mia_svc_efficacy"),
    "npo": R10("overshoots", "forget_acc"),
    "pipeline": R10("overshoots", "mia_svc_efficacy"),
    "random_label": R10("overshoots", "mia_svc_efficacy"),
    "rmu": R10("towards"),
    "saliency_unlearning": R10("overshoots", "mia_svc_efficacy"),
    "scrub": R10("towards"),
    "simnpo": R10("overshoots", "mia_svc_efficacy"),
    # the SISA ensemble (2.7 pts before unlearning), retrained exactly: forget 95.1 / retain 98.2 / test 96.7 / MIA
    # efficacy 17.4 vs the gold MLP's 97.2 / 99.8 / 96.7 / 5.6 - each constituent sees a third of the data
    "sisa": R10("exact_ensemble", "mia_svc_efficacy"),
    "sparse_aware": R10("overshoots", "forget_acc"),
    "ssd": R10("no_effect", "forget_acc"),
    "undial": R10("overshoots", "mia_svc_efficacy"),
    "wga": R10("overshoots", "mia_svc_efficacy"),
}

#: the side of the gold value on which an overshooting / damaging metric lies: -1 below, +1 above
_SIDE = {"forget_acc": -1, "retain_acc": -1, "test_acc": -1, "mia_svc_efficacy": +1}


def test_random10_table_covers_every_strategy():
    assert set(RANDOM10) == set(_runnable_on_classifier())


@pytest.mark.parametrize("name", sorted(RANDOM10))
def test_random10_outcome_is_the_documented_one(name, digits_random10):
    b = digits_random10
    doc = RANDOM10[name]
    gold = evaluate(b.gold, forget=b.forget, retain=b.retain, test=b.test, task=b.task, seed=0)
    original_gap = evaluate(b.original, forget=b.forget, retain=b.retain, test=b.test, task=b.task, gold_metrics=gold,
                            seed=0)["avg_gap"]
    job, start_model = _run(b, name, gold)
    m = job["metrics"]
    gap = m["avg_gap"]
    got = f"{name}: Avg.Gap {100 * gap:.1f} pts, original {100 * original_gap:.1f}"
    if doc.kind == "towards":
        assert gap < original_gap, got
        return
    got += f"; {doc.metric} {100 * m[doc.metric]:.1f} vs gold {100 * gold[doc.metric]:.1f}"
    if doc.kind == "exact_ensemble":
        _check_sisa_gap_is_the_ensembles(b, gold, m, start_model, original_gap, got)
        return
    if doc.kind == "no_effect":
        assert abs(gap - original_gap) <= 0.005 and m["forget_acc"] >= gold["forget_acc"], got
        return
    assert doc.kind in ("overshoots", "damages") and gap > original_gap, got
    assert (doc.kind == "damages") == (doc.metric in ("retain_acc", "test_acc")), got
    assert _SIDE[doc.metric] * (m[doc.metric] - gold[doc.metric]) >= 0.01, got


def _check_sisa_gap_is_the_ensembles(b, gold, m, start_model, original_gap, got) -> None:
    """Why sisa ends further from the gold MLP than the original does on random10: its unlearning is exact (every
    metric equals that of the SISA ensemble trained from scratch without the forget set, same seed, shards and
    slices), and the SISA architecture is already further from the single retrained MLP than the original is
    before anything is unlearned."""
    from erasus_ray.benchmarks.prepared import SISA_SHARDS, SISA_SLICES
    from erasus_ray.training_sisa import SISATrainer

    scratch = SISATrainer(b.model_factory, b.recipe, num_shards=SISA_SHARDS, num_slices=SISA_SLICES, seed=0,
                          task=b.task).fit(b.train.exclude(b.forget.ids))
    ref = evaluate(scratch, forget=b.forget, retain=b.retain, test=b.test, task=b.task, gold_metrics=gold, seed=0)
    for k in ("forget_acc", "retain_acc", "test_acc", "mia_svc_efficacy", "avg_gap"):
        assert m[k] == pytest.approx(ref[k], abs=1e-12), (k, m[k], ref[k])
    start = evaluate(start_model, forget=b.forget, retain=b.retain, test=b.test, task=b.task, gold_metrics=gold, seed=0)
    assert start["avg_gap"] > original_gap and m["avg_gap"] > original_gap, got
    assert m["retain_acc"] < gold["retain_acc"] - 0.01, "each constituent sees a third of the data"
    assert m["mia_svc_efficacy"] - gold["mia_svc_efficacy"] >= 0.05, got


@pytest.fixture(scope="module")
def authors_ci():
    from erasus_ray.benchmarks import load_benchmark

    return load_benchmark("authors", "forget10", 0, variant="ci")


def _runnable_on_lm() -> list[str]:
    """As :func:`_runnable_on_classifier`, for the causal LM: ``sisa`` starts from a SISA ensemble of GPT-2s."""
    return [
        n for n in STRATEGIES.names()
        if n != "retrain"
        and runs_on(STRATEGIES.get(n), CausalLMTask())
        and (not STRATEGIES.get(n).contract_exempt_reason or n in PREPARED)
    ]


@pytest.mark.parametrize("name", _runnable_on_lm())
def test_every_lm_strategy_moves_towards_gold_on_authors(name, authors_ci):
    """Authors (tiny GPT-2, ci variant, forget10): every LM-capable strategy ends below the original's Avg.Gap
    (48.1 pts). Several only just do - `gradient_ascent` 47.5, `activation_steering` 47.1, `attention_surgery`
    47.6 - see benchmarks/strategy_leaderboard/authors/RESULTS.md; the bar here is direction, not quality.
    ``sisa`` starts from its 3-shard x 2-slice GPT-2 ensemble (47.7 pts: it already lost retain fit) and retrains
    every shard (the 4 forget authors fall in all of them): 25.0 pts, seed 0."""
    b = authors_ci
    gold = evaluate(b.gold, forget=b.forget, retain=b.retain, test=b.test, task=b.task, seed=0)
    original = evaluate(b.original, forget=b.forget, retain=b.retain, test=b.test, task=b.task, gold_metrics=gold, seed=0)
    job, _ = _run(b, name, gold, benchmark="authors", options={"variant": "ci"})
    assert job["metrics"]["avg_gap"] < original["avg_gap"], f"{name}: {100 * job['metrics']['avg_gap']:.1f} pts"
