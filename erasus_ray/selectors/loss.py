"""Per-sample loss: the simplest memorisation proxy (a sample the model fits badly, or fits only because it was
memorised, stands out by its loss; cf. Jiang et al. 2021 "Characterizing Structural Regularities of Labeled Data
in Overparameterized Models", who use the loss as a cheap proxy of the consistency/memorisation score)."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from erasus_ray.data import IdDataset
from erasus_ray.selectors.base import SELECTORS, ScoreSelector
from erasus_ray.tasks import Capability, Task


@SELECTORS.register("loss")
class LossSelector(ScoreSelector):
    """Score each forget sample by its loss under the current model: cross-entropy for a classifier, the mean
    cross-entropy over an LM sample's answer tokens (``TaskOutput.sample_loss``).

    ``order="high"`` (default) keeps the worst-fit samples. Like EL2N (with which it is monotone on a
    classifier's correct predictions), a high-loss forget sample has a large loss gradient, so ascent on it moves the
    model most; the low-loss ones are those the model already fits with near-zero gradient.

    Measured on digits (10% coreset, ``grad_diff``, 3 seeds, mean Avg.Gap to the retrained model; ``random``: 0.0083 on
    class 3, 0.028 on random10): class 3: 0.0026, random10: 0.070 (the same coresets as ``el2n`` there).

    Cost: one forward pass per sample; no gradients.

    Example:
        >>> coreset = LossSelector().select(model, forget_loader, fraction=0.1)
        >>> ErasusUnlearner(model, selector="loss", fraction=0.1).fit(forget_loader, retain_loader)
    """

    #: the per-sample loss: any task.
    requires = frozenset({Capability.LOSS})

    default_order = "high"

    def score(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, **context: Any) -> np.ndarray:
        return self.forward_scores(model, forget, task, lambda out: out.sample_loss())
