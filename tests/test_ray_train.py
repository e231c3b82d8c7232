"""Ray Train runner: 1 worker matches the local runner; 2 workers unlearn; a killed worker resumes."""

import os

import pytest
import torch

from erasus_ray import ErasusUnlearner
from erasus_ray.errors import InvalidConfigError
from erasus_ray.evaluation import evaluate

ray = pytest.importorskip("ray")


def _fit(b, **kw):
    return ErasusUnlearner(b.original, strategy="npo", selector="el2n", fraction=0.2, epochs=4, progress=False, retain_batch_size=64, **kw).fit(
        forget_data=b.forget, retain_data=b.retain
    )


def test_one_worker_matches_local(digits_class, ray_cluster, tmp_path):
    local = _fit(digits_class)
    remote = _fit(digits_class, backend="ray_train", num_workers=1)
    for (n, a), (_, c) in zip(local.model.state_dict().items(), remote.model.state_dict().items()):
        assert torch.allclose(a, c, atol=1e-5), n
    assert remote.report.steps == local.report.steps
    assert remote.config["backend"] == "ray_train"


@pytest.mark.slow
def test_two_workers_unlearn_and_resume_after_a_killed_worker(digits_class, ray_cluster, tmp_path):
    b = digits_class
    marker = tmp_path / "killed-once"

    def kill_once(epoch, rank):
        if epoch == 2 and rank == 1 and not marker.exists():
            marker.write_text("x")
            os._exit(1)  # the worker process dies mid-run

    from erasus_ray.runners.ray_train import RayTrainRunner
    from erasus_ray.runners import RunnerConfig

    unlearner = ErasusUnlearner(b.original, strategy="grad_diff", selector="el2n", fraction=0.2, progress=False,
                                retain_batch_size=64, backend="ray_train", num_workers=2, max_failures=2)
    original_make = unlearner.make_runner
    unlearner.make_runner = lambda cfg: RayTrainRunner(cfg, num_workers=2, max_failures=2, after_epoch=kill_once)
    res = unlearner.fit(forget_data=b.forget, retain_data=b.retain)
    assert marker.exists(), "the fault was injected"
    assert any("resumed_from_epoch" in h for h in res.report.history)
    m = evaluate(res.model, forget=b.forget, retain=b.retain, test=b.test, gold=b.gold)
    assert m["forget_acc"] <= 0.05 and m["retain_acc"] >= 0.95
    del original_make


def test_bad_backend_arguments(digits_class):
    with pytest.raises(InvalidConfigError, match="backend"):
        ErasusUnlearner(digits_class.original, backend="spark")
    with pytest.raises(InvalidConfigError, match="num_workers"):
        ErasusUnlearner(digits_class.original, backend="ray_train", num_workers=0)


@pytest.mark.slow
def test_retries_exhausted_error_names_the_last_good_checkpoint(digits_class, ray_cluster):
    """A worker that dies every time after epoch 2, with no restarts allowed: a clear error naming the checkpoint
    of the last completed epoch."""
    from erasus_ray.errors import ErasusError
    from erasus_ray.runners.ray_train import RayTrainRunner

    def always_die(epoch, rank):
        if epoch == 2 and rank == 1:
            os._exit(1)

    b = digits_class
    unlearner = ErasusUnlearner(b.original, strategy="grad_diff", selector="el2n", fraction=0.2, progress=False,
                                retain_batch_size=64, backend="ray_train", num_workers=2, max_failures=0)
    unlearner.make_runner = lambda cfg: RayTrainRunner(cfg, num_workers=2, max_failures=0, after_epoch=always_die)
    with pytest.raises(ErasusError, match=r"failed after 0 restart\(s\); last good checkpoint: .*checkpoint_"):
        unlearner.fit(forget_data=b.forget, retain_data=b.retain)
