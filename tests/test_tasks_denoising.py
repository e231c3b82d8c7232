"""The denoising adapter: DDPM noising by hand, id-keyed draws, loss-only output, auto-detection, the contract."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from erasus_ray.data import as_id_dataset, make_loader
from erasus_ray.errors import InvalidConfigError, TaskMismatchError
from erasus_ray.tasks import CapabilityError, get_task
from erasus_ray.tasks.denoising import DenoisingTask
from erasus_ray.testing import build_family, check_task


class EchoNoise(nn.Module):
    """Returns its input: the prediction error is then x_t - eps, which the test computes by hand."""

    denoiser = True

    def forward(self, x, t, class_labels=None):
        return x


def _data(n=8, dim=3):
    g = torch.Generator().manual_seed(0)
    return as_id_dataset(TensorDataset(torch.randn(n, dim, generator=g), torch.arange(n) % 2))


def _batch(task, ds, ids):
    return next(iter(make_loader(ds.subset(ids), task.collate, batch_size=len(ids))))


def test_loss_is_the_ddpm_noise_mse_averaged_over_draws():
    task = DenoisingTask(num_timesteps=10, beta_start=0.1, beta_end=0.5, draws=3, seed=0)
    ds = _data()
    batch = _batch(task, ds, [2, 5])
    loss = task.forward(EchoNoise(), batch.data).sample_loss()
    abar = torch.cumprod(1 - torch.linspace(0.1, 0.5, 10, dtype=torch.float64), 0)
    for row in range(2):
        x = batch.data["x"][row].double()
        per_draw = []
        for d in range(3):
            t, eps = int(batch.data["t"][row, d]), batch.data["noise"][row, d].double()
            x_t = math.sqrt(abar[t]) * x + math.sqrt(1 - abar[t]) * eps
            per_draw.append(float(((x_t - eps) ** 2).mean()))
        assert float(loss[row]) == pytest.approx(sum(per_draw) / 3, rel=1e-5)


def test_draws_are_keyed_by_sample_id_not_by_batch():
    task = DenoisingTask(draws=2, seed=7)
    ds = _data()
    a = _batch(task, ds, [1, 4, 6])
    b = _batch(task, ds, [6, 0, 4])
    assert torch.equal(a.data["t"][1], b.data["t"][2]) and torch.equal(a.data["noise"][2], b.data["noise"][0])
    assert not torch.equal(a.data["noise"][0], a.data["noise"][1]), "different samples get different draws"
    other_seed = _batch(DenoisingTask(draws=2, seed=8), ds, [1, 4, 6])
    assert not torch.equal(other_seed.data["noise"], a.data["noise"]), "the task seed enters the draws"


def test_loss_only_output_refuses_logits_and_checks_shapes():
    task = DenoisingTask(draws=2)
    batch = _batch(task, _data(), [0, 1])
    out = task.forward(EchoNoise(), batch.data)
    assert not out.has_logits and out.batch_size == 2
    with pytest.raises(CapabilityError, match="logits"):
        out.logits
    with pytest.raises(CapabilityError, match="prediction units"):
        task.dense_units(None, batch.data)
    with pytest.raises(TaskMismatchError, match="noise prediction of shape"):
        task.read_output(torch.zeros(2, 3), batch.data)  # batch x draws = 4 rows expected
    with pytest.raises(InvalidConfigError, match="draws"):
        DenoisingTask(draws=0)


def test_auto_picks_denoising_for_declared_and_diffusers_shaped_models():
    assert isinstance(get_task("auto", EchoNoise()), DenoisingTask)
    unet = type("UNet2DModel", (nn.Module,), {})()  # the diffusers class name, without importing diffusers
    assert isinstance(get_task("auto", unet), DenoisingTask)
    assert get_task("auto", nn.Linear(3, 2)).name == "classification"


def test_unconditional_items_and_the_toy_family_pass_the_task_contract():
    task = DenoisingTask(draws=2)
    out = task.forward(EchoNoise(), _batch(task, as_id_dataset(TensorDataset(torch.randn(4, 3))), [0, 1, 2]).data)
    assert out.sample_loss().shape == (3,)
    fam = build_family("denoiser")
    report = check_task(fam.task, fam)
    assert report["checked"] == ["loss", "independent"]
