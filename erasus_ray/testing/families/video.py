"""Tiny Hugging Face ``VideoMAEForVideoClassification`` built from a config, on moving-digit clips generated here from
8x8 digits with a seed (~4 s, 93% test accuracy, chance 25%): ``pixel_values [B, T, C, H, W]`` through the
classification adapter.

A clip is one digit image shifted (cyclically) one pixel per frame for FRAMES frames; its class is the direction
(right, left, down, up), so a model must compare frames, not read one. Tubelets of two frames carry the motion.
"""

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from erasus_ray.tasks.classification import ClassificationTask
from erasus_ray.testing._family import Family, digits, register_family, seeded, trained_family
from erasus_ray.training import TrainRecipe

FRAMES = 4
#: (dims shift of torch.roll) per direction: right, left, down, up.
DIRECTIONS = ((1, 2), (-1, 2), (1, 1), (-1, 1))


class MovingDigits(Dataset):
    """``(clip [FRAMES, 1, 8, 8], direction)``: digit ``i`` of scikit-learn's set, moving in a seeded direction."""

    def __init__(self, n: int = 240, seed: int = 0) -> None:
        self.images = digits()[0][:n].reshape(n, 1, 8, 8)
        self.directions = torch.tensor(np.random.default_rng(seed).integers(0, len(DIRECTIONS), n), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.directions)

    def __getitem__(self, i: int):
        return moving_clip(self.images[i], int(self.directions[i])), int(self.directions[i])


def moving_clip(image: torch.Tensor, direction: int) -> torch.Tensor:
    """``image [1, 8, 8]`` shifted cyclically one pixel per frame in ``DIRECTIONS[direction]``: ``[FRAMES, 1, 8, 8]``."""
    step, dim = DIRECTIONS[direction]
    return torch.stack([torch.roll(image, step * t, dims=dim) for t in range(FRAMES)])


def tiny_videomae(num_labels: int = len(DIRECTIONS), hidden_size: int = 16, num_layers: int = 1) -> nn.Module:
    """An untrained ``VideoMAEForVideoClassification``: 2x4x4 tubelets (8 tokens per clip), ``num_layers`` layers
    ``hidden_size`` wide (default one layer, 16 wide)."""
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    cfg = VideoMAEConfig(image_size=8, patch_size=4, num_channels=1, num_frames=FRAMES, tubelet_size=2,
                         hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=2,
                         intermediate_size=2 * hidden_size, num_labels=num_labels,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return VideoMAEForVideoClassification(cfg)


@register_family("videomae", cheap=False)
def videomae_family() -> Family:
    recipe = TrainRecipe(epochs=40, lr=3e-3, batch_size=32, seed=0)
    return trained_family("videomae", seeded(tiny_videomae), ClassificationTask(), MovingDigits(), recipe, n_forget=16,
                          n_test=60, cheap=False, lr=3e-3, batch_size=8)
