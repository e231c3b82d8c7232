"""The contrastive adapter: fixed caption set (independent, logits) vs in-batch InfoNCE (refused per sample)."""

import pytest
import torch
import torch.nn.functional as F

from erasus_ray.data import make_loader
from erasus_ray.selectors._per_sample import FunctionalLoss
from erasus_ray.tasks import Capability, CapabilityError, get_task, require
from erasus_ray.tasks.contrastive import ContrastiveTask
from erasus_ray.testing import build_family, check_task


def _batch(fam, n=4):
    return next(iter(make_loader(fam.forget.subset(fam.forget.ids[:n]), fam.task.collate, batch_size=n)))


def test_fixed_caption_set_loss_is_cross_entropy_against_the_captions():
    fam = build_family("two_tower")
    batch = _batch(fam)
    img, cap = fam.model(batch.data["images"], fam.task.captions)
    logits = F.normalize(img, dim=-1) @ F.normalize(cap, dim=-1).T / 0.1
    expected = F.cross_entropy(logits, batch.data["labels"], reduction="none")
    torch.testing.assert_close(fam.task.per_sample_loss(fam.model, batch.data), expected)
    assert fam.task.provides(Capability.INDEPENDENT) and fam.task.provides(Capability.LOGITS)
    assert check_task(fam.task, fam)["checked"] == ["loss", "independent", "logits", "labels", "features"]


def test_in_batch_loss_is_symmetric_infonce_and_depends_on_batch_mates():
    fam = build_family("two_tower_inbatch")
    batch = _batch(fam)
    img, txt = fam.model(batch.data["images"], batch.data["texts"])
    logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T / 0.1
    target = torch.arange(4)
    expected = 0.5 * (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none"))
    full = fam.task.per_sample_loss(fam.model, batch.data)
    torch.testing.assert_close(full, expected)
    pair = next(iter(make_loader(fam.forget.subset(fam.forget.ids[:2]), fam.task.collate, batch_size=2)))
    assert not torch.allclose(fam.task.per_sample_loss(fam.model, pair.data), full[:2]), "in-batch: mates matter"
    assert fam.task.capabilities == {Capability.LOSS, Capability.FEATURES, Capability.TOWERS, Capability.JOINT_SPACE}
    assert check_task(fam.task, fam)["checked"] == ["loss", "features"]


def test_in_batch_mode_refuses_per_sample_paths_instead_of_scoring_zero():
    fam = build_family("two_tower_inbatch")
    with pytest.raises(CapabilityError, match="independent"):
        require(fam.task, {"loss", "independent"}, algorithm="selector 'gradient_norm'")
    with pytest.raises(CapabilityError, match="logits"):
        fam.task.forward(fam.model, _batch(fam).data).logits
    params = {n: p.detach() for n, p in fam.model.named_parameters()}
    one = {k: v[:1] for k, v in _batch(fam).data.items()}
    with pytest.raises(CapabilityError, match="lone sample"):
        FunctionalLoss(fam.model, fam.task, params).batch(params, one)  # the vmap path sees one sample at a time


def test_auto_and_item_validation():
    fam = build_family("two_tower")
    assert isinstance(get_task("auto", fam.model), ContrastiveTask)
    with pytest.raises(Exception, match="label"):
        ContrastiveTask(captions=torch.zeros(3, 2, dtype=torch.long)).collate([(torch.zeros(64), torch.tensor([1]))])
    with pytest.raises(Exception, match="K >= 2"):
        ContrastiveTask(captions=torch.zeros(1, 2, dtype=torch.long))
