"""Per-sample measurements of a model on a set: one batched, no-grad forward pass (shared by the metric registry and
the closed loop's verification)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from erasus_ray.data import IdDataset, make_loader
from erasus_ray.tasks import CapabilityError, Task, TaskOutput
from erasus_ray.utils import model_device

#: An extra per-sample column: ``fn(out)`` gives one value per sample of the batch (an array or a list).
Column = Callable[[TaskOutput], Any]


@dataclass
class SetStats:
    """Per-sample measurements of one set, in ``ids`` order: ``loss`` (the task's per-sample loss), ``correct``
    (fraction of the sample's prediction units right; None for a task without logits), ``pred`` (argmax class where
    a sample is one unit, else None), ``label`` (the task's class label where it has one, else None) and ``columns``
    (the extra per-sample columns asked of :func:`set_stats`, by name: arrays, or lists for ragged values)."""

    ids: np.ndarray
    loss: np.ndarray
    correct: np.ndarray | None
    pred: np.ndarray | None = None
    label: np.ndarray | None = None
    columns: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(len(self.ids))

    @property
    def acc(self) -> float:
        if self.correct is None:
            raise CapabilityError("no accuracy: the task's output has no logits (capability 'logits')")
        return float(self.correct.mean()) if len(self) else float("nan")

    @property
    def has_acc(self) -> bool:
        """Whether accuracy was measured (the task has categorical predictions)."""
        return self.correct is not None and bool(len(self))

    @property
    def mean_loss(self) -> float:
        return float(self.loss.mean()) if len(self) else float("nan")

    def where(self, mask: np.ndarray) -> "SetStats":
        pick = lambda a: None if a is None else a[mask]  # noqa: E731
        cols = {k: (v[mask] if isinstance(v, np.ndarray) else [x for x, keep in zip(v, mask) if keep])
                for k, v in self.columns.items()}
        return SetStats(self.ids[mask], self.loss[mask], pick(self.correct), pick(self.pred), pick(self.label), cols)


@torch.no_grad()
def set_stats(
    model: nn.Module, task: Task, data: IdDataset, batch_size: int = 256, columns: Mapping[str, Column] | None = None
) -> SetStats:
    """Forward passes over ``data`` in batches (no gradients): per-sample loss, correctness, prediction and label
    (the last three where the task's output has logits / labels), and each extra ``columns[name](out)``.

    Cost: one forward per batch; the columns are read from the same outputs, never from another pass.
    """
    columns = dict(columns or {})
    device = model_device(model)
    was_training = model.training
    model.eval()
    ids, losses, correct, preds, labels = [], [], [], [], []
    extra: dict[str, list[Any]] = {name: [] for name in columns}
    try:
        for batch in make_loader(data, task.collate, batch_size=batch_size):
            out = task.forward(model, batch.to(device).data)
            ids.append(batch.ids.numpy())
            losses.append(out.sample_loss().float().cpu().numpy())
            correct.append(out.sample_accuracy().float().cpu().numpy() if out.has_logits else None)
            one_unit = out.has_logits and out.logits.shape[0] == out.batch_size
            preds.append(out.logits.argmax(-1).cpu().numpy() if one_unit else None)
            label = task.labels_of(batch.data)
            labels.append(None if label is None else label.cpu().numpy())
            for name, column in columns.items():
                extra[name].append(column(out))
    finally:
        model.train(was_training)
    cat = lambda parts: None if not parts or any(p is None for p in parts) else np.concatenate(parts)  # noqa: E731
    if not ids:
        return SetStats(np.zeros(0, np.int64), np.zeros(0), np.zeros(0), columns={n: np.zeros(0) for n in columns})
    return SetStats(np.concatenate(ids), np.concatenate(losses), cat(correct), cat(preds), cat(labels),
                    {name: _join(parts) for name, parts in extra.items()})


def _join(parts: list[Any]) -> Any:
    """Batches of one column joined: arrays concatenated, lists (ragged values such as token sequences) chained."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    return [x for p in parts for x in p]
