"""Metrics that need only the per-sample objective (``Capability.LOSS``), so every task family has them.

* ``<split>_loss``: mean over the split's samples of the task's per-sample loss.
* ``mia_loss_auc``: the loss-threshold membership attack (LOSS attack, Yeom et al., CSF 2018) as a ROC AUC of the
  forget set (members) against the test set (true non-members), score ``-loss``; 0.5 means the forget set looks like
  unseen data, above 0.5 that it is still fitted better than unseen data.

Cost: nothing beyond the shared forward pass over forget / retain / test.
"""

from __future__ import annotations

import math

import numpy as np

from erasus_ray.evaluation.metrics import EvalContext, register_metric, register_split_metric
from erasus_ray.tasks import Capability


def membership_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """ROC AUC of attack scores, members labelled 1 (higher score = member); NaN scores dropped, NaN if one class."""
    from sklearn.metrics import roc_auc_score

    scores = np.concatenate([members, nonmembers])
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    finite = np.isfinite(scores)
    if len(np.unique(labels[finite])) < 2:
        return math.nan
    return float(roc_auc_score(labels[finite], scores[finite]))


@register_split_metric("loss", requires={Capability.LOSS})
def split_loss(ctx: EvalContext, split: str) -> float:
    """Mean per-sample loss of the split (NaN when it is empty)."""
    return ctx.stats(split).mean_loss


@register_metric("mia_loss_auc", requires={Capability.LOSS}, splits=("forget", "test"), gap=True, display=True)
def mia_loss_auc(ctx: EvalContext) -> float:
    """LOSS-attack AUC, forget (members) vs test (non-members)."""
    return membership_auc(-ctx.stats("forget").loss, -ctx.stats("test").loss)
