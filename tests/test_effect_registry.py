"""Every strategy, with its documented defaults, against the retrained (gold) model on digits.

Class 3 (a redundant forget set): every strategy that runs on a classifier must move towards the gold model
(Avg.Gap below the original model's 50.6 pts). Random 10% (each sample its own fact): the original model is already
within ~1.8 pts of the gold model, so "towards gold" means not overshooting; only the strategies listed in
``RANDOM10_CLOSE`` meet that with their defaults (``benchmarks/strategy_leaderboard/digits/RESULTS.md`` has every
number, 3 seeds). The others push the forgotten samples below the gold model's ~97% forget accuracy - their
defaults are tuned to erase what the model memorised, and on random10 there is little to erase. That is documented
here rather than hidden by per-scenario tuning.
"""

import pytest

from erasus_ray.evaluation import evaluate
from erasus_ray.experiment import JobConfig, run_job
from erasus_ray.strategies import STRATEGIES

pytestmark = pytest.mark.slow


def _runnable_on_classifier() -> list[str]:
    return [
        n for n in STRATEGIES.names()
        if n != "retrain"
        and (STRATEGIES.get(n).supported_tasks is None or "classification" in STRATEGIES.get(n).supported_tasks)
        and not STRATEGIES.get(n).contract_exempt_reason
    ]


def _gap(bench, name: str) -> tuple[float, float]:
    gold = evaluate(bench.gold, forget=bench.forget, retain=bench.retain, test=bench.test, task=bench.task, seed=0)
    original = evaluate(bench.original, forget=bench.forget, retain=bench.retain, test=bench.test, task=bench.task,
                        gold_metrics=gold, seed=0)
    cfg = JobConfig.from_dict({"benchmark": "digits", "scenario": bench.scenario, "seed": 0, "strategy": name,
                               "selector": None, "fraction": 1.0})
    job = run_job(cfg, bench=bench, gold_metrics=gold, progress=False, fraction=1.0)
    return job["metrics"]["avg_gap"], original["avg_gap"]


@pytest.mark.parametrize("name", _runnable_on_classifier())
def test_every_strategy_moves_towards_gold_on_a_class(name, digits_class):
    gap, original_gap = _gap(digits_class, name)
    assert gap < original_gap, f"{name}: Avg.Gap {100 * gap:.1f} pts, original {100 * original_gap:.1f}"


#: Strategies whose defaults do not overshoot random10 (Avg.Gap within 1 pt of the original's or better, seed 0).
RANDOM10_CLOSE = ["neggrad_plus", "rmu", "l1_sparse", "scrub", "fine_tune", "simnpo", "ssd"]


@pytest.mark.parametrize("name", RANDOM10_CLOSE)
def test_strategies_that_do_not_overshoot_random_samples(name, digits_random10):
    gap, original_gap = _gap(digits_random10, name)
    assert gap < original_gap + 0.01, f"{name}: Avg.Gap {100 * gap:.1f} pts, original {100 * original_gap:.1f}"


@pytest.fixture(scope="module")
def authors_ci():
    from erasus_ray.benchmarks import load_benchmark

    return load_benchmark("authors", "forget10", 0, variant="ci")


def _runnable_on_lm() -> list[str]:
    return [
        n for n in STRATEGIES.names()
        if n != "retrain"
        and (STRATEGIES.get(n).supported_tasks is None or "causal_lm" in STRATEGIES.get(n).supported_tasks)
        and not STRATEGIES.get(n).contract_exempt_reason
    ]


@pytest.mark.parametrize("name", _runnable_on_lm())
def test_every_lm_strategy_moves_towards_gold_on_authors(name, authors_ci):
    """Authors (tiny GPT-2, ci variant, forget10): every LM-capable strategy ends below the original's Avg.Gap
    (48.1 pts). Several only just do - `gradient_ascent` 47.5, `activation_steering` 47.1, `attention_surgery`
    47.6 - see benchmarks/strategy_leaderboard/authors/RESULTS.md; the bar here is direction, not quality."""
    b = authors_ci
    gold = evaluate(b.gold, forget=b.forget, retain=b.retain, test=b.test, task=b.task, seed=0)
    original = evaluate(b.original, forget=b.forget, retain=b.retain, test=b.test, task=b.task, gold_metrics=gold, seed=0)
    cfg = JobConfig.from_dict({"benchmark": "authors", "scenario": "forget10", "seed": 0, "strategy": name,
                               "selector": None, "fraction": 1.0, "benchmark_options": {"variant": "ci"}})
    job = run_job(cfg, bench=b, gold_metrics=gold, progress=False, fraction=1.0)
    assert job["metrics"]["avg_gap"] < original["avg_gap"], f"{name}: {100 * job['metrics']['avg_gap']:.1f} pts"
