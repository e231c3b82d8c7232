"""Per-sample measurements of a model on a set: one batched, no-grad forward pass (shared by the metric suites and
the closed loop's verification)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from erasus_ray.data import IdDataset, make_loader
from erasus_ray.tasks import Task
from erasus_ray.utils import model_device


@dataclass
class SetStats:
    """Per-sample measurements of one set, in ``ids`` order: ``loss`` (the task's per-sample loss), ``correct``
    (fraction of the sample's prediction units right), ``pred`` (argmax class where a sample is one unit, else None),
    ``label`` (the task's class label where it has one, else None). ``correct`` is NaN for a task without
    categorical predictions (``Capability.LOGITS``), so ``acc`` is NaN there."""

    ids: np.ndarray
    loss: np.ndarray
    correct: np.ndarray
    pred: np.ndarray | None = None
    label: np.ndarray | None = None

    def __len__(self) -> int:
        return int(len(self.ids))

    @property
    def acc(self) -> float:
        return float(self.correct.mean()) if len(self) else float("nan")

    @property
    def has_acc(self) -> bool:
        """Whether accuracy was measured (the task has categorical predictions)."""
        return bool(len(self)) and not bool(np.isnan(self.correct).all())

    @property
    def mean_loss(self) -> float:
        return float(self.loss.mean()) if len(self) else float("nan")

    def where(self, mask: np.ndarray) -> "SetStats":
        pick = lambda a: None if a is None else a[mask]  # noqa: E731
        return SetStats(self.ids[mask], self.loss[mask], self.correct[mask], pick(self.pred), pick(self.label))


@torch.no_grad()
def set_stats(model: nn.Module, task: Task, data: IdDataset, batch_size: int = 256) -> SetStats:
    """Forward passes over ``data`` in batches (no gradients): per-sample loss, correctness, prediction and label."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    ids, losses, correct, preds, labels = [], [], [], [], []
    try:
        for batch in make_loader(data, task.collate, batch_size=batch_size):
            out = task.forward(model, batch.to(device).data)
            ids.append(batch.ids.numpy())
            losses.append(out.sample_loss().float().cpu().numpy())
            if out.has_logits:
                correct.append(out.sample_accuracy().float().cpu().numpy())
                one_unit = out.logits.shape[0] == out.batch_size
                preds.append(out.logits.argmax(-1).cpu().numpy() if one_unit else None)
            else:  # a loss-only task: no accuracy to measure (NaN, never a made-up 0 or 1)
                correct.append(np.full(out.batch_size, np.nan))
                preds.append(None)
            label = task.labels_of(batch.data)
            labels.append(None if label is None else label.cpu().numpy())
    finally:
        model.train(was_training)
    if not ids:
        return SetStats(np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
    cat = lambda parts: None if any(p is None for p in parts) else np.concatenate(parts)  # noqa: E731
    return SetStats(np.concatenate(ids), np.concatenate(losses), np.concatenate(correct), cat(preds), cat(labels))
