"""Toy class-conditional denoiser (an MLP predicting the noise of 8x8 digits), loss-only, trained 15 epochs (~0.3 s)."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from erasus_ray.tasks.denoising import DenoisingTask
from erasus_ray.testing._family import Family, digits, register_family, seeded, trained_family
from erasus_ray.training import TrainRecipe

TIMESTEPS = 100


class ToyDenoiser(nn.Module):
    """``eps = f(x_t, t, class)``: an MLP on the noised image, a timestep embedding and a class embedding."""

    denoiser = True  # task="auto" picks the denoising adapter

    def __init__(self, dim: int = 64, classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.time = nn.Embedding(TIMESTEPS, 16)
        self.label = nn.Embedding(classes, 8)
        self.net = nn.Sequential(nn.Linear(dim + 24, width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, self.time(t), self.label(class_labels)], dim=-1))


@register_family("denoiser", cheap=True)
def denoiser_family() -> Family:
    x, y = digits()
    data = TensorDataset(x[:500] * 2 - 1, y[:500])
    recipe = TrainRecipe(epochs=15, lr=3e-3, batch_size=32, seed=0)
    task = DenoisingTask(num_timesteps=TIMESTEPS, draws=2, seed=0)
    return trained_family("denoiser", seeded(ToyDenoiser), task, data, recipe, n_forget=16, n_test=100, cheap=True,
                          lr=1e-2, batch_size=8)
