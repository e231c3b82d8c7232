"""Tabular benchmark tasks from scikit-learn's bundled data sets, with a small MLP trained to convergence:
``wine`` (178 samples, 13 features, 3 classes), ``iris`` (150, 4, 3) and ``breast_cancer`` (569, 30, 2).

They exist to check defaults on models we did not tune for: small, standardised, and fitted until the training
set is predicted with very high confidence (Adam, lr 1e-2, 200 epochs), the case where a fixed ``epochs x lr``
unlearning budget tuned on digits moves nothing. The split and scenarios are the vision tasks' (a stratified split
made with the seed; ``class``: every training sample of ``forget_class``; ``random10``: a random 10%), with a
larger test share (40%) so held-out accuracy is measured on more than a few dozen samples.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from erasus_ray.benchmarks.models import MLP
from erasus_ray.benchmarks.vision import VisionBenchmark
from erasus_ray.training import TrainRecipe


class TabularBenchmark(VisionBenchmark):
    """A scikit-learn ``load_*`` data set, standardised per feature; MLP ``in -> 64 -> 64 -> C``."""

    loader: Callable[..., Any]

    def __init__(self, forget_class: int = 0, test_size: float = 0.4, **options: Any) -> None:
        super().__init__(forget_class=forget_class, test_size=test_size, **options)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        x, y = type(self).loader(return_X_y=True)
        x = (x - x.mean(0)) / x.std(0).clip(min=1e-12)
        return x.astype(np.float32), y.astype(np.int64)

    def build_model(self, seed: int) -> nn.Module:
        x, y = self.arrays()
        torch.manual_seed(seed)
        return MLP(x.shape[1], (64, 64), int(y.max()) + 1)

    def recipe(self, seed: int) -> TrainRecipe:
        return TrainRecipe(epochs=200, lr=1e-2, batch_size=32, optimizer="adam", seed=seed)


def _sklearn(name: str) -> Callable[..., Any]:
    import sklearn.datasets

    return getattr(sklearn.datasets, name)


class WineBenchmark(TabularBenchmark):
    name = "wine"
    loader = staticmethod(lambda **kw: _sklearn("load_wine")(**kw))


class IrisBenchmark(TabularBenchmark):
    name = "iris"
    loader = staticmethod(lambda **kw: _sklearn("load_iris")(**kw))


class BreastCancerBenchmark(TabularBenchmark):
    name = "breast_cancer"
    loader = staticmethod(lambda **kw: _sklearn("load_breast_cancer")(**kw))
