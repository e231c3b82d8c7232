"""Stable sample ids.

Users hand us a ``Dataset``, a ``Subset`` or a ``DataLoader`` (possibly shuffled). We rebuild every one
as an :class:`IdDataset` whose rows carry the id of the sample in the user's *base* dataset: its index,
or the value of an ``ids`` attribute the dataset provides. Coresets, results and ledgers speak in these
ids, never in loader positions, so selection does not depend on the order a loader happens to yield.
"""

from __future__ import annotations

import inspect

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from erasus_ray.errors import InvalidDataError


class IdDataset(Dataset):
    """A view of ``base`` whose row ``j`` is ``(ids[j], base[positions[j]])``.

    Args:
        base: any indexable dataset (not a ``Subset``; :func:`as_id_dataset` unwraps those).
        positions: rows of ``base`` in this view.
        ids: the stable id of each row (unique integers).
    """

    def __init__(self, base: Any, positions: Sequence[int] | np.ndarray, ids: Sequence[int] | np.ndarray) -> None:
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        ids = np.asarray(ids).reshape(-1)
        if ids.dtype.kind not in "iu":
            raise InvalidDataError(f"sample ids must be integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        if len(ids) != len(positions):
            raise InvalidDataError(f"{len(ids)} ids for {len(positions)} rows")
        if len(np.unique(ids)) != len(ids):
            values, counts = np.unique(ids, return_counts=True)
            raise InvalidDataError(f"sample ids must be unique; repeated: {values[counts > 1][:10].tolist()}")
        self.base = base
        self.positions = positions
        self._ids = ids
        self._row_of: dict[int, int] | None = None

    @classmethod
    def _view(cls, base: Any, positions: np.ndarray, ids: np.ndarray) -> "IdDataset":
        """A view whose positions/ids are rows of an already validated IdDataset (unique int64 ids, int64
        positions): skips the checks, which cost a sort of the ids on every subset of a large dataset."""
        view = cls.__new__(cls)
        view.base, view.positions, view._ids, view._row_of = base, positions, ids, None
        return view

    @property
    def ids(self) -> np.ndarray:
        """The stable ids of the rows, in row order (read-only copy semantics: do not mutate)."""
        return self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, row: int) -> tuple[int, Any]:
        return int(self._ids[row]), self.base[int(self.positions[row])]

    def row_of(self) -> dict[int, int]:
        if self._row_of is None:
            self._row_of = {int(i): r for r, i in enumerate(self._ids)}
        return self._row_of

    def subset(self, ids: Iterable[int]) -> "IdDataset":
        """The rows with these ids, in the given order. Unknown ids raise :class:`InvalidDataError` naming them."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64).reshape(-1)
        row_of = self.row_of()
        missing = [int(i) for i in ids if int(i) not in row_of]
        if missing:
            raise InvalidDataError(
                f"{len(missing)} id(s) are not in the dataset: {missing[:20]}{' ...' if len(missing) > 20 else ''}"
            )
        rows = np.fromiter((row_of[int(i)] for i in ids), dtype=np.int64, count=len(ids))
        if len(np.unique(rows)) != len(rows):
            values, counts = np.unique(ids, return_counts=True)
            raise InvalidDataError(f"sample ids must be unique; repeated: {values[counts > 1][:10].tolist()}")
        return IdDataset._view(self.base, self.positions[rows], self._ids[rows])

    def exclude(self, ids: Iterable[int]) -> "IdDataset":
        """All rows except those with these ids (ids not present are ignored)."""
        drop = np.isin(self._ids, np.asarray(list(ids), dtype=np.int64))
        return IdDataset._view(self.base, self.positions[~drop], self._ids[~drop])

    def sorted(self) -> "IdDataset":
        """Rows ordered by id: the canonical order every selector works in."""
        if len(self._ids) < 2 or bool(np.all(self._ids[1:] > self._ids[:-1])):
            return self  # already in id order (views are never mutated)
        order = np.argsort(self._ids, kind="stable")
        return IdDataset._view(self.base, self.positions[order], self._ids[order])


def as_id_dataset(data: Any) -> IdDataset:
    """Rebuild a Dataset / Subset / DataLoader (or an IdDataset) as an :class:`IdDataset`.

    Ids come from, in order: an existing ``IdDataset``; a ``Subset`` maps its indices through the ids of the
    dataset it wraps; a dataset with an ``ids`` attribute uses it; otherwise a row's index is its id.
    """
    if isinstance(data, IdDataset):
        return data
    if isinstance(data, DataLoader):
        return as_id_dataset(data.dataset)
    if isinstance(data, Subset):
        inner = as_id_dataset(data.dataset)
        idx = _subset_indices(data.indices, len(inner))
        return IdDataset(inner.base, inner.positions[idx], inner.ids[idx])
    if data is None:
        raise InvalidDataError("data is None: pass a Dataset, Subset or DataLoader")
    if is_stream(data):
        raise InvalidDataError(STREAM_REFUSED.format(what=type(data).__name__))
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise InvalidDataError(
            f"cannot address samples of {type(data).__name__} by id: pass a map-style Dataset, Subset or DataLoader"
        )
    n = len(data)
    ids = getattr(data, "ids", None)
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids)
    return IdDataset(data, np.arange(n, dtype=np.int64), ids)


def is_stream(data: Any) -> bool:
    """An ``IterableDataset``, or a DataLoader over one."""
    return isinstance(data, IterableDataset) or isinstance(getattr(data, "dataset", None), IterableDataset)


#: why a stream is refused where samples are taken by id (and where streams are accepted instead)
STREAM_REFUSED = ("{what} is a stream (IterableDataset): this step needs random access by id (the coreset is "
                  "taken by id, the retain set reshuffled each epoch). Streams are accepted where one pass is enough: "
                  "erasus_ray.jobs.streaming.stream_top_k (coreset selection) and stream_metrics (verification); "
                  "materialise the chosen samples (or a retain sample) as a map-style Dataset for the run - or run a "
                  "job config with data.streaming: true, which does all of that (erasus_ray.jobs.stream_job).")


def _subset_indices(indices: Any, n: int) -> np.ndarray:
    """A Subset's indices as int64 rows of a dataset of ``n`` rows (negative ones count from the end, as
    ``Subset`` itself reads them); anything else raises :class:`InvalidDataError` naming the bad indices."""
    idx = np.asarray(list(indices))
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    if idx.dtype.kind not in "iu":
        raise InvalidDataError(f"Subset indices must be integers, got dtype {idx.dtype}")
    idx = idx.astype(np.int64).reshape(-1)
    out = idx[(idx >= n) | (idx < -n)]
    if len(out):
        raise InvalidDataError(f"Subset indices out of range for a dataset of {n} samples: {out[:20].tolist()}")
    return np.where(idx < 0, idx + n, idx)


def loader_batch_size(data: Any, default: int) -> int:
    """The batch size of a user's DataLoader, or ``default`` for a plain dataset."""
    if isinstance(data, DataLoader) and data.batch_size:
        return int(data.batch_size)
    return default


@dataclass
class Batch:
    """A collated batch: the stable ``ids``, the task's ``data`` and optional per-sample ``weights``."""

    ids: torch.Tensor
    data: Any
    weights: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.ids.numel())

    def __getitem__(self, key: int | str) -> Any:
        """``batch[0]`` / ``batch[1]``: the items of tuple data, e.g. inputs and labels of ``(x, y)`` data (the seed's
        ``forget_step`` indexed its batches as tuples); ``batch["input_ids"]``: a field of dict data. The ids and
        weights stay attributes (``batch.ids``, ``batch.weights``)."""
        if isinstance(self.data, (tuple, list)) and isinstance(key, int):
            return self.data[key]
        if isinstance(self.data, Mapping) and isinstance(key, str):
            return self.data[key]
        raise TypeError(f"Batch[{key!r}]: this batch's data is {type(self.data).__name__}; index tuple data by position "
                        "(batch[0]), dict data by key (batch['input_ids']), or use batch.data")

    def __iter__(self) -> Iterator[Any]:
        """Unpack like the data: ``x, y = batch`` for ``(x, y)`` data (not the rows: iterate a DataLoader for those)."""
        if not isinstance(self.data, (tuple, list)):
            raise TypeError(f"cannot unpack a Batch of {type(self.data).__name__} data; use batch.data")
        return iter(self.data)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.ids, _to_device(self.data, device), None if self.weights is None else self.weights.to(device))


def _float_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _float_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _float_tensors(v)


def check_finite_batch(batch: Batch, name: str) -> None:
    """Raise :class:`InvalidDataError` naming ``name`` and the sample ids if a floating tensor of the batch holds a
    NaN/inf (features, soft labels). Cost: one ``isfinite`` pass over the batch's floating inputs."""
    bad: set[int] = set()
    n = len(batch)
    for t in _float_tensors(batch.data):
        finite = torch.isfinite(t)
        if bool(finite.all()):
            continue
        if t.dim() >= 1 and t.shape[0] == n:  # per-sample rows: name the samples
            rows = (~finite.reshape(n, -1).all(dim=1)).nonzero().flatten().cpu()
            bad.update(int(batch.ids[r]) for r in rows)
        else:
            bad.update(int(i) for i in batch.ids)
    if bad:
        ids = sorted(bad)
        raise InvalidDataError(f"{name}: {len(ids)} sample(s) have NaN/inf features, ids {ids[:20]}; clean or drop them")


#: Above this many samples, a dataset without in-memory tensors is not scanned up front: its batches are checked as the
#: runner draws them (:func:`check_finite_batch`), since a pass of data loading over a large retain set would cost more
#: than the coreset run it guards.
FULL_SCAN_LIMIT = 50_000


def check_finite_data(data: IdDataset, collate: Callable[[list[Any]], Any], name: str, *,
                      limit: int | None = None, batch_size: int = 256) -> bool:
    """Raise :class:`InvalidDataError` naming ``name`` and the ids if a sample of ``data`` has NaN/inf floats.

    A ``TensorDataset`` is checked in one vectorised pass over its rows; any other dataset by loading every sample
    (one pass of data loading, no forward pass), unless it has more than ``limit`` samples. Returns whether the whole
    set was checked."""
    if isinstance(data.base, TensorDataset):
        rows = torch.as_tensor(data.positions)
        bad = torch.zeros(len(rows), dtype=torch.bool)
        for t in data.base.tensors:
            if t.is_floating_point() or t.is_complex():
                bad |= ~torch.isfinite(t[rows]).reshape(len(rows), -1).all(dim=1)
        if bool(bad.any()):
            ids = sorted(int(i) for i in data.ids[bad.numpy()])
            raise InvalidDataError(f"{name}: {len(ids)} sample(s) have NaN/inf features, ids {ids[:20]}; clean or drop them")
        return True
    if limit is not None and len(data) > limit:
        return False
    for batch in make_loader(data, collate, batch_size=batch_size):
        check_finite_batch(batch, name)
    return True


def _to_device(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return type(obj)({k: _to_device(v, device) for k, v in obj.items()}) if isinstance(obj, dict) else {
            k: _to_device(v, device) for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def takes_ids(collate: Callable[..., Any]) -> bool:
    """Whether a collate function accepts the batch's sample ids (``collate(items, ids=...)``)."""
    try:
        return "ids" in inspect.signature(collate).parameters
    except (TypeError, ValueError):
        return False


def make_loader(
    dataset: IdDataset,
    collate: Callable[[list[Any]], Any],
    *,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    weights: Mapping[int, float] | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """An id-carrying DataLoader over ``dataset`` that yields :class:`Batch` objects.

    ``collate`` is the task adapter's collate for the underlying items; one that takes an ``ids`` argument gets the
    batch's sample ids (a task whose objective is random draws its per-sample randomness from them). ``weights``
    (id -> weight) attaches per-sample weights, e.g. coreset weights.
    """
    if batch_size < 1:
        raise InvalidDataError(f"batch_size must be >= 1, got {batch_size}")
    keyed = takes_ids(collate)

    def collate_fn(rows: list[tuple[int, Any]]) -> Batch:
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        w = None
        if weights is not None:
            w = torch.tensor([float(weights.get(int(i), 1.0)) for i in ids], dtype=torch.float32)
        items = [r[1] for r in rows]
        return Batch(ids=ids, data=collate(items, ids=ids) if keyed else collate(items), weights=w)

    generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=collate_fn,
        drop_last=drop_last,
    )
