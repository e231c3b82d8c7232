"""``video``: a tiny Hugging Face ``VideoMAEForVideoClassification`` (:func:`~erasus_ray.testing.families.video.tiny_videomae`)
on moving-digit clips: each of scikit-learn's 1797 8x8 digits shifted one pixel per frame for four frames in a
direction drawn with a fixed data seed (:func:`~erasus_ray.testing.families.video.moving_clip`, the video family's
generator), through the classification adapter (``pixel_values [B, T, C, H, W]``). Classes are ``digit x direction``
(40, class ``4 * digit + direction``), so the model must read both the image and the motion (one frame shows the
digit, not where it goes). Scenarios as ``digits``: ``class`` forgets every training clip of ``forget_class``,
``random10`` a random 10% of the clips. Sample ids are row indices.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from erasus_ray.benchmarks.vision import DigitsBenchmark
from erasus_ray.tasks import ClassificationTask, Task
from erasus_ray.training import TrainRecipe

#: the seed of the clips' directions: fixed, so every split seed sees the same clips
DATA_SEED = 0


class MovingDigitClips(Dataset):
    """``(clip [FRAMES, 1, 8, 8], label)``: image ``i`` moving in the direction its label names (``label % 4``);
    clips are built on access."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        from erasus_ray.testing.families.video import DIRECTIONS

        self.images = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8)
        self.y = torch.as_tensor(y, dtype=torch.long)
        self.directions = np.asarray(y) % len(DIRECTIONS)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from erasus_ray.testing.families.video import moving_clip

        return moving_clip(self.images[i], int(self.directions[i])), self.y[i]


class VideoDigitsBenchmark(DigitsBenchmark):
    """Moving-digit clips, tiny VideoMAE (one layer, 32 wide, 11k parameters); Adam 3e-3, 30 epochs, batch 32.

    ``forget_class`` is ``4 * digit + direction`` (default 13: digit 3 moving left, 38 of 1437 training clips
    at split seed 0).
    """

    name = "video"
    task_class = ClassificationTask

    def __init__(self, forget_class: int = 13, **options: Any) -> None:
        super().__init__(forget_class=forget_class, **options)

    def num_labels(self) -> int:
        from erasus_ray.testing.families.video import DIRECTIONS

        return 10 * len(DIRECTIONS)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        from erasus_ray.testing.families.video import DIRECTIONS

        x, digit = super().arrays()
        directions = np.random.default_rng(DATA_SEED).integers(0, len(DIRECTIONS), len(digit))
        return x, digit * len(DIRECTIONS) + directions

    def dataset(self, x: np.ndarray, y: np.ndarray) -> Dataset:
        return MovingDigitClips(x, y)

    def build_model(self, seed: int) -> nn.Module:
        from erasus_ray.testing.families.video import tiny_videomae

        torch.manual_seed(seed)
        return tiny_videomae(num_labels=self.num_labels(), hidden_size=32)

    def make_task(self) -> Task:
        from erasus_ray.testing.families.video import FRAMES

        return ClassificationTask(input_shape=(FRAMES, 1, 8, 8))

    def recipe(self, seed: int) -> TrainRecipe:
        return TrainRecipe(epochs=30, lr=3e-3, batch_size=32, optimizer="adam", seed=seed)

    def config(self, scenario: str, seed: int) -> dict[str, Any]:
        return {**super().config(scenario, seed), "model": "tiny_videomae-32", "data_seed": DATA_SEED}
