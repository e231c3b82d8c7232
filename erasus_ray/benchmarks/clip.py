"""``clip``: a tiny Hugging Face ``CLIPModel`` (one layer per tower, 16 wide; :func:`~erasus_ray.testing.families.clip.tiny_clip`)
on scikit-learn's 1797 8x8 digits paired with token captions ("digit <c> <noise> <eos>"), scored zero-shot against
the ten class captions. Scenarios as ``digits``: ``class`` forgets every training pair of ``forget_class`` (a concept),
``random10`` a random 10% of the pairs. Sample ids are row indices."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from erasus_ray.benchmarks.vision import DigitsBenchmark
from erasus_ray.tasks import Task
from erasus_ray.tasks.contrastive import ContrastiveTask
from erasus_ray.training import TrainRecipe


class CaptionedDigitArrays(Dataset):
    """``(image [1, 8, 8], caption tokens, label)`` from the digits arrays, each with a seeded noise token."""

    def __init__(self, x: np.ndarray, y: np.ndarray, seed: int = 0) -> None:
        from erasus_ray.testing.families.clip import with_eos
        from erasus_ray.testing.families.contrastive import VOCAB

        self.x = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8)
        self.y = torch.as_tensor(y, dtype=torch.long)
        noise = torch.randint(21, VOCAB, (len(y),), generator=torch.Generator().manual_seed(seed))
        self.captions = with_eos(torch.stack([self.y + 1, self.y + 11, noise], 1))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i], self.captions[i], int(self.y[i])


class ClipDigitsBenchmark(DigitsBenchmark):
    """Zero-shot CLIP on captioned digits; Adam 3e-3, 15 epochs, batch 32 (the matrix family's recipe)."""

    name = "clip"
    task_class = ContrastiveTask

    def dataset(self, x: np.ndarray, y: np.ndarray) -> Dataset:
        return CaptionedDigitArrays(x, y)

    def build_model(self, seed: int) -> nn.Module:
        from erasus_ray.testing.families.clip import tiny_clip

        torch.manual_seed(seed)
        return tiny_clip()

    def make_task(self) -> Task:
        return self.declared_task()

    @classmethod
    def declared_task(cls) -> Task:
        """The caption-set adapter (zero-shot over the ten class captions): cheap to build, and the sweep must see its
        logits (the class's default instance is in-batch InfoNCE, without them)."""
        from erasus_ray.testing.families.clip import CLIP_CAPTIONS

        return ContrastiveTask(captions=CLIP_CAPTIONS, input_names=("pixel_values", "input_ids"), image_shape=(1, 8, 8))

    def recipe(self, seed: int) -> TrainRecipe:
        return TrainRecipe(epochs=15, lr=3e-3, batch_size=32, optimizer="adam", seed=seed)

    def config(self, scenario: str, seed: int) -> dict[str, Any]:
        return {**super().config(scenario, seed), "model": "tiny_clip"}
