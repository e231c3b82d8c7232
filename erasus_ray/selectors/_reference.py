"""Reference / validation data, labels and uncertainty helpers shared by the learning-based selectors
(active learning, CAL, data Shapley, forgetting events, valuation network, the ensembles).

* :func:`reference_set` resolves the labelled data a selector compares the forget set with: an explicit
  ``validation=`` / ``reference=`` argument, else the retain set the unlearner passes as ``retain=``; with none
  it raises :class:`~erasus_ray.errors.InvalidConfigError` naming the arguments (or returns None when the caller
  has its own fallback).
* :func:`union_with_ids` puts forget and retain rows in one :class:`IdDataset` that keeps the forget ids.
* :func:`unit_uncertainty` - least confidence / entropy / margin of prediction units (Settles 2009).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from erasus_ray.data import IdDataset, as_id_dataset, make_loader
from erasus_ray.errors import InvalidConfigError
from erasus_ray.tasks import Task
from erasus_ray.utils import model_device

CRITERIA = ("least_confidence", "entropy", "margin")


def reference_set(
    selector: str,
    context: dict[str, Any],
    default: Any = None,
    *,
    keys: tuple[str, ...] = ("validation", "reference"),
    seed: int = 0,
    max_size: int | None = None,
    required: bool = True,
) -> IdDataset | None:
    """The labelled reference data: ``select(..., validation=/reference=)``, else ``default`` (the constructor's),
    else ``select(..., retain=)``. Subsampled (seeded, id-sorted) to ``max_size`` rows. None when nothing is given
    and ``required`` is False; otherwise :class:`InvalidConfigError` naming the arguments."""
    source = next((context[k] for k in keys if context.get(k) is not None), None)
    if source is None:
        source = default
    if source is None:
        source = context.get("retain")
    if source is None:
        if not required:
            return None
        raise InvalidConfigError(
            f"{selector} needs labelled reference data: pass select(..., {keys[0]}=...) or the constructor's "
            f"{keys[0]}=..., or the retain set as select(..., retain=...) (ErasusUnlearner passes retain_data)"
        )
    ref = as_id_dataset(source).sorted()
    if len(ref) == 0:
        if not required:
            return None
        raise InvalidConfigError(f"{selector}: the {keys[0]} / retain set is empty")
    if max_size is not None and len(ref) > max_size:
        keep = np.sort(np.random.default_rng(seed).choice(len(ref), int(max_size), replace=False))
        ref = ref.subset(ref.ids[keep])
    return ref


class _Concat(Dataset):
    """Items of two IdDatasets back to back (ids dropped), for a union over different base datasets."""

    def __init__(self, a: IdDataset, b: IdDataset) -> None:
        self.a, self.b = a, b

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    def __getitem__(self, i: int) -> Any:
        return self.a[i][1] if i < len(self.a) else self.b[i - len(self.a)][1]


def union_with_ids(forget: IdDataset, other: IdDataset | None) -> IdDataset:
    """Forget rows (with their ids) followed by ``other``'s rows not in ``forget``. When the two have different base
    datasets, ``other``'s rows get fresh ids above every forget id (they are only used internally)."""
    if other is None or len(other) == 0:
        return forget
    if forget.base is other.base:
        keep = ~np.isin(other.ids, forget.ids)
        return IdDataset(forget.base, np.concatenate([forget.positions, other.positions[keep]]), np.concatenate([forget.ids, other.ids[keep]]))
    both = _Concat(forget, other)
    start = int(forget.ids.max()) + 1
    ids = np.concatenate([forget.ids, np.arange(start, start + len(other), dtype=np.int64)])
    return IdDataset(both, np.arange(len(both)), ids)


def unit_uncertainty(logits: torch.Tensor, criterion: str) -> torch.Tensor:
    """``[N]`` uncertainty of each prediction unit from its logits ``[N, C]`` (higher = more uncertain):
    ``least_confidence``: ``1 - max_c p_c``; ``entropy``: ``-sum_c p_c log p_c``; ``margin``: ``1 - (p_(1) - p_(2))``
    (one minus the gap between the two most probable classes)."""
    logp = logits.double().log_softmax(-1)
    p = logp.exp()
    if criterion == "least_confidence":
        return 1.0 - p.max(-1).values
    if criterion == "entropy":
        return -(p * logp).sum(-1)
    if criterion == "margin":
        top = p.topk(min(2, p.shape[-1]), dim=-1).values
        gap = top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0.0)
        return 1.0 - gap
    raise InvalidConfigError(f"criterion must be one of {CRITERIA}, got {criterion!r}")


@torch.no_grad()
def labels_and_features(model: torch.nn.Module, data: IdDataset, task: Task, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels [n], features [n, D])`` of a classification dataset, rows in dataset order (one forward pass)."""
    device = model_device(model)
    labels, feats = [], []
    for batch in make_loader(data, task.collate, batch_size=batch_size, shuffle=False):
        out = task.forward(model, batch.to(device).data, features=True)
        labels.append(out.targets.detach().cpu())
        feats.append(out.features.detach().double().flatten(1).cpu())  # type: ignore[union-attr]
    return torch.cat(labels), torch.cat(feats)
