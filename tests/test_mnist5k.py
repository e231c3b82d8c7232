"""mnist5k (real MNIST images, small CNN): slow, so behind the `slow` marker that .ci/run also runs."""

import pytest

from erasus_ray.experiment import JobConfig, run_job


@pytest.mark.slow
def test_mnist5k_class_unlearning_with_demo_defaults():
    from erasus_ray.benchmarks import load_benchmark

    b = load_benchmark("mnist5k", "class", seed=0)
    assert len(b.train) == 4000 and len(b.test) == 1000
    row = run_job(JobConfig.from_dict({"benchmark": "mnist5k", "scenario": "class"}), bench=b, progress=False)
    m = row["metrics"]
    assert m["gold_test_acc"] > 0.8
    assert m["forget_acc"] <= 0.05
    assert abs(m["retain_acc"] - m["gold_retain_acc"]) <= 0.03
    assert m["avg_gap"] <= 0.03
