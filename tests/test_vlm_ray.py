"""The vision-language strategies under Ray Train: one worker unlearns the tiny CLIP exactly as the local runner does
(the joint-space objective with its frozen original, and the vision-text split's frozen tower, set up in the worker)."""

import pytest
import torch

from erasus_ray import ErasusUnlearner
from erasus_ray.testing import build_family

ray = pytest.importorskip("ray")


def _fit(fam, strategy, **kw):
    torch.manual_seed(0)
    return ErasusUnlearner(fam.model, strategy=strategy, selector=None, fraction=None, task=fam.task, seed=0,
                           progress=False, max_steps=4, lr=3e-3, batch_size=8, **kw).fit(fam.forget, fam.retain)


@pytest.mark.slow
@pytest.mark.parametrize("strategy, hparams", [("contrastive_unlearning", {}), ("vision_text_split", {"tower": "text"})])
def test_one_ray_train_worker_unlearns_clip_like_the_local_runner(strategy, hparams, ray_cluster):
    fam = build_family("clip")
    local = _fit(fam, strategy, **hparams)
    remote = _fit(fam, strategy, backend="ray_train", num_workers=1, **hparams)
    assert remote.config["backend"] == "ray_train" and remote.report.steps == local.report.steps
    before, a, b = fam.model.state_dict(), local.model.state_dict(), remote.model.state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4, msg=name)
    assert any(not torch.equal(a[n], before[n]) for n in a), "the run changed the model"
    if strategy == "vision_text_split":
        assert all(torch.equal(b[n], before[n]) for n in b if n.startswith("vision_model."))
