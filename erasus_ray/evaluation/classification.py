"""Metrics of categorical predictions (``Capability.LOGITS``): accuracy on forget / retain / test and SalUn's MIA.

* ``<split>_acc``: fraction of the split's prediction units predicted correctly (argmax), averaged over samples.
* ``mia_svc_efficacy``: SalUn's MIA-efficacy (Jia et al., NeurIPS 2023 "Model Sparsity Can Simplify Machine
  Unlearning"; Fan et al., ICLR 2024): an RBF SVC is trained to tell retain samples (members) from test samples
  (non-members) by the confidence on the true label, then applied to the forget set; the metric is the
  fraction of forget samples it calls non-members (higher = more forgotten; a retrained model's value is the target).

The loss metrics and the loss-threshold MIA (``mia_loss_auc``) need only the loss: :mod:`.loss_metrics`.
Cost: nothing beyond the shared forward pass over forget / retain / test, plus one small SVC fit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.svm import SVC
from torch import nn

from erasus_ray.data import IdDataset
from erasus_ray.evaluation.metrics import EvalContext, metric_names_for, register_metric, register_split_metric, run_metrics
from erasus_ray.evaluation.stats import set_stats
from erasus_ray.tasks import Capability, Task


def per_sample_stats(model: nn.Module, task: Task, data: IdDataset, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per-sample ``loss``, ``correct`` and ``confidence`` (probability of the true label), in ``data`` order."""
    s = set_stats(model, task, data, batch_size)
    return {"loss": s.loss, "correct": s.correct, "confidence": np.exp(-s.loss)}


def auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """AUC of telling members from non-members when a higher score means 'member'."""
    if len(member_scores) == 0 or len(nonmember_scores) == 0:
        return float("nan")
    y = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    return float(roc_auc_score(y, np.r_[member_scores, nonmember_scores]))


def svc_mia_efficacy(
    retain_conf: np.ndarray, test_conf: np.ndarray, forget_conf: np.ndarray, seed: int = 0
) -> float:
    """Fraction of forget samples an SVC (trained on retain=member vs test=non-member confidences) calls non-members."""
    if len(forget_conf) == 0 or len(test_conf) == 0 or len(retain_conf) == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    n = min(len(retain_conf), len(test_conf))
    shadow_in = retain_conf[rng.permutation(len(retain_conf))[:n]]
    shadow_out = test_conf[rng.permutation(len(test_conf))[:n]]
    x = np.r_[shadow_in, shadow_out].reshape(-1, 1)
    y = np.r_[np.ones(n), np.zeros(n)]
    clf = SVC(C=3, gamma="auto", kernel="rbf")
    clf.fit(x, y)
    return float(1.0 - clf.predict(forget_conf.reshape(-1, 1)).mean())


@register_split_metric("acc", requires={Capability.LOGITS}, gap=("forget", "retain", "test"))
def split_accuracy(ctx: EvalContext, split: str) -> float:
    """Accuracy on the split (NaN when it is empty)."""
    return ctx.stats(split).acc


@register_metric("mia_svc_efficacy", requires={Capability.LOGITS}, splits=("forget", "retain", "test"), gap=True,
                 display=True)
def mia_svc_efficacy(ctx: EvalContext) -> float:
    """SalUn's MIA-efficacy on the confidences ``exp(-loss)`` (probability of the true label)."""
    conf = {s: np.exp(-ctx.stats(s).loss) for s in ("retain", "test", "forget")}
    return svc_mia_efficacy(conf["retain"], conf["test"], conf["forget"], ctx.seed)


def evaluate_classification(
    model: nn.Module, task: Task, *, forget: IdDataset, retain: IdDataset, test: IdDataset, batch_size: int = 256,
    seed: int = 0, **_: Any
) -> dict[str, float]:
    """The classifier's default suite (accuracy and loss on forget / retain / test, the two MIAs): a thin wrapper of
    :func:`~erasus_ray.evaluation.metrics.run_metrics` kept for callers of the old suite function."""
    return run_metrics(model, task, {"forget": forget, "retain": retain, "test": test}, metric_names_for(task),
                       batch_size=batch_size, seed=seed)
