"""Classifier metrics: accuracy on forget / retain / test and two membership-inference attacks.

* ``mia_loss_auc``: the loss-threshold attack (Yeom et al., CSF 2018) as an AUC of forget (members) vs test
  (true non-members); 0.5 means the forget set looks like unseen data.
* ``mia_svc_efficacy``: SalUn's MIA-efficacy (Jia et al., NeurIPS 2023 "Model Sparsity Can Simplify Machine
  Unlearning"; Fan et al., ICLR 2024): an RBF SVC is trained to tell retain samples (members) from test samples
  (non-members) by the confidence on the true label, then applied to the forget set; the metric is the
  fraction of forget samples it calls non-members (higher = more forgotten; a retrained model's value is the target).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.svm import SVC
from torch import nn

from erasus_ray.data import IdDataset
from erasus_ray.evaluation.stats import set_stats
from erasus_ray.tasks import Task

GAP_KEYS = ("forget_acc", "retain_acc", "test_acc", "mia_svc_efficacy")


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


def evaluate_classification(
    model: nn.Module, task: Task, *, forget: IdDataset, retain: IdDataset, test: IdDataset, batch_size: int = 256, seed: int = 0, **_: Any
) -> dict[str, float]:
    """Accuracy and loss on forget / retain / test, and the two MIAs (forget vs test)."""
    stats = {name: per_sample_stats(model, task, ds, batch_size) for name, ds in (("forget", forget), ("retain", retain), ("test", test))}
    metrics: dict[str, float] = {}
    for name, s in stats.items():
        metrics[f"{name}_acc"] = float(s["correct"].mean()) if len(s["correct"]) else float("nan")
        metrics[f"{name}_loss"] = float(s["loss"].mean()) if len(s["loss"]) else float("nan")
    metrics["mia_loss_auc"] = auc(-stats["forget"]["loss"], -stats["test"]["loss"])
    metrics["mia_svc_efficacy"] = svc_mia_efficacy(
        stats["retain"]["confidence"], stats["test"]["confidence"], stats["forget"]["confidence"], seed
    )
    return metrics
