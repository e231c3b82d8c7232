"""Uncertainty sampling: least confidence, entropy and margin (Settles, 2009, "Active Learning Literature
Survey", Computer Sciences Technical Report 1648, University of Wisconsin-Madison, section 3.1)."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from erasus_ray.data import IdDataset
from erasus_ray.errors import InvalidConfigError
from erasus_ray.selectors._reference import CRITERIA, unit_uncertainty
from erasus_ray.selectors.base import SELECTORS, ScoreSelector
from erasus_ray.tasks import Capability, Task


@SELECTORS.register("active_learning")
class ActiveLearningSelector(ScoreSelector):
    """Score each forget sample by the uncertainty of the model's predictive distribution (labels are not used).

    ``criterion``:

    * ``"least_confidence"`` (default): ``1 - max_c p(c|x)``;
    * ``"entropy"``: ``-sum_c p(c|x) log p(c|x)``;
    * ``"margin"``: ``1 - (p(c_1|x) - p(c_2|x))``, the two most probable classes (a small margin is uncertain).

    Classifier: ``p`` is the softmax of the logits. Causal LM (where the survey leaves freedom): the criterion is
    computed per answer token from the next-token distribution and averaged over the sample's answer tokens.

    ``order="high"`` (default) keeps the most uncertain samples, as uncertainty sampling does. For unlearning
    these are the forget samples nearest the decision boundary: the ones the model holds least firmly.

    Measured on digits (10% coreset, ``grad_diff``, 3 seeds, mean Avg.Gap to the retrained model; ``random``: 0.0083 on
    class 3, 0.028 on random10): least confidence, class 3: 0.0026, random10: 0.070 (on that converged
    MLP the top 10% coincide with the highest-loss ones).

    Cost: one forward pass per sample; no gradients.

    Example:
        >>> coreset = ActiveLearningSelector(criterion="entropy").select(model, forget_loader, k=20)
    """

    #: uncertainty of the predictive distribution over each sample's units.
    requires = frozenset({Capability.LOGITS})

    default_order = "high"

    def __init__(self, batch_size: int = 128, order: str | None = None, criterion: str = "least_confidence") -> None:
        super().__init__(batch_size=batch_size, order=order)
        if criterion not in CRITERIA:
            raise InvalidConfigError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        self.criterion = criterion

    def score(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, **context: Any) -> np.ndarray:
        return self.forward_scores(
            model, forget, task, lambda out: out._per_sample(unit_uncertainty(out.logits, self.criterion), "mean")
        )
