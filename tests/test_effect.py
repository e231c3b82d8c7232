"""Effect tests: the defaults measurably unlearn a converged model and move it to the retrained one."""

import numpy as np
import pytest

from erasus_ray.evaluation import evaluate
from erasus_ray.experiment import JobConfig, run_job


def _other_class_accuracy(model, bench):
    labels = np.array([int(bench.test[r][1][1]) for r in range(len(bench.test))])
    other = bench.test.subset(bench.test.ids[labels != bench.info["forget_class"]])
    return evaluate(model, forget=other, retain=other, test=other, task=bench.task)["test_acc"]


def test_demo_defaults_forget_a_class_on_an_adaptive_coreset(digits_class):
    """The demo's defaults: grad_diff on an adaptive EL2N coreset, closed loop on the class target. The coreset
    starts at 5% (8 of 146) and a class is redundant, so it stays small (measured: 8)."""
    b = digits_class
    cfg = JobConfig.from_dict({"benchmark": "digits", "scenario": "class", "seed": 0})  # the demo's defaults
    row = run_job(cfg, bench=b, progress=False)
    m = row["metrics"]
    assert row["verified"] is True and row["verification"]["target"] == "class"
    assert row["coreset_size"] <= int(np.ceil(0.1 * len(b.forget_ids)))
    assert m["forget_acc"] <= 0.05
    gold_other = _other_class_accuracy(b.gold, b)
    ours_other = _other_class_accuracy(row["result"].model, b)
    assert abs(ours_other - gold_other) <= 0.03, (ours_other, gold_other)
    original = evaluate(b.original, forget=b.forget, retain=b.retain, test=b.test, gold=b.gold)
    assert m["avg_gap"] < 0.1 * original["avg_gap"]


def test_random10_needs_a_stopping_point(digits_random10):
    """random10: each forgotten digit is its own sample and the MLP generalises, so the retrained model still
    classifies ~97% of them and the original is already close to it (Avg.Gap ~1.4 points). Pushing the coreset to
    chance (the class defaults) overshoots; stopping once the coreset is at held-out accuracy does not.
    Measured and documented rather than hidden: see benchmarks/coreset_vs_full/RESULTS.md."""
    b = digits_random10
    original = evaluate(b.original, forget=b.forget, retain=b.retain, test=b.test, gold=b.gold)
    assert original["avg_gap"] < 0.03 and original["gold_forget_acc"] > 0.9
    # a fixed 10% coreset with the class defaults (random10 without held-out data has no measurable target, so both
    # runs are open-loop; with heldout_data the closed loop leaves this model alone: tests/test_closed_loop.py)
    overshoot = run_job(JobConfig.from_dict({"benchmark": "digits", "scenario": "random10", "fraction": 0.1}), bench=b, progress=False)
    stopped = run_job(
        JobConfig.from_dict({"benchmark": "digits", "scenario": "random10", "fraction": 0.1, "runner": {"forget_target": 0.9}}),
        bench=b, progress=False,
    )
    assert overshoot["verified"] is None
    assert overshoot["metrics"]["avg_gap"] > original["avg_gap"]
    assert stopped["metrics"]["avg_gap"] <= original["avg_gap"] + 0.005
    assert stopped["report"]["stopped"].startswith("forget_target reached")
