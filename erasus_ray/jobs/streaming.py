"""Forget / retain / held-out sets as streams (``torch.utils.data.IterableDataset``): the passes that need no random
access - scoring for a top-k coreset and measuring forget metrics - run over a stream in bounded memory.

Ids of streamed items (``ids=``):

* ``"counter"`` (default): a running counter, the item's position in the stream from 0. Stable only if the stream
  yields the same items in the same order every time (a sharded or shuffled stream does not): prefer ids in the data.
* ``"pairs"``: the items are ``(id, item)`` tuples.
* any other string: the items are dicts and the id is that key's value (removed before the task collates the item).

Where random access is needed - an :class:`~erasus_ray.ErasusUnlearner` run takes the coreset's samples by id and
shuffles the retain set every epoch - a stream is refused by :func:`erasus_ray.data.as_id_dataset` with a message
that points here: select the coreset from the stream (:func:`stream_top_k`), then materialise just those samples
(usually a small fraction of the forget set) as a map-style dataset.
"""

from __future__ import annotations

import heapq
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from erasus_ray.data.ids import Batch
from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.selectors import Coreset
from erasus_ray.tasks import Capability, get_task
from erasus_ray.utils import model_device

#: per-sample scores of a :class:`~erasus_ray.tasks.TaskOutput` that a stream can be ranked by
STREAM_SCORES: dict[str, Callable[[Any], torch.Tensor]] = {
    "loss": lambda out: out.sample_loss(),
    "el2n": lambda out: out.sample_el2n(),
}


def iter_id_batches(data: Iterable[Any], collate: Callable[[list[Any]], Any], *, batch_size: int = 256,
                    ids: str = "counter") -> Iterator[Batch]:
    """:class:`Batch` objects over a stream, with ids as the module docstring says. Memory: one batch."""
    if batch_size < 1:
        raise InvalidConfigError(f"batch_size must be >= 1, got {batch_size}")
    rows: list[Any] = []
    row_ids: list[int] = []
    for position, item in enumerate(data):
        sample_id, item = _split_id(item, position, ids)
        rows.append(item)
        row_ids.append(sample_id)
        if len(rows) == batch_size:
            yield Batch(torch.tensor(row_ids, dtype=torch.long), collate(rows))
            rows, row_ids = [], []
    if rows:
        yield Batch(torch.tensor(row_ids, dtype=torch.long), collate(rows))


def _split_id(item: Any, position: int, ids: str) -> tuple[int, Any]:
    if ids == "counter":
        return position, item
    if ids == "pairs":
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise InvalidDataError(f"stream item {position}: ids='pairs' needs (id, item) tuples, got {type(item).__name__}")
        return int(item[0]), item[1]
    if not isinstance(item, dict) or ids not in item:
        raise InvalidDataError(f"stream item {position}: ids={ids!r} needs dict items with key {ids!r}")
    rest = {k: v for k, v in item.items() if k != ids}
    return int(item[ids]), rest


@torch.no_grad()
def stream_top_k(model: nn.Module, data: Iterable[Any], task: Any, k: int, *, score: str = "loss", order: str = "high",
                 batch_size: int = 256, ids: str = "counter") -> Coreset:
    """The ``k`` stream items with the highest (``order="high"``) or lowest per-sample ``score`` (a name in
    :data:`STREAM_SCORES`) under ``model``, as a :class:`~erasus_ray.selectors.Coreset` (ids in score order; weights
    ``n / k``; no per-id score table, which would grow with the stream).

    Cost: one no-grad forward pass over the stream; memory O(k + batch_size) whatever the stream's length. The same
    choice as the map-style ``loss`` / ``el2n`` selectors up to ties."""

    if score not in STREAM_SCORES:
        raise InvalidConfigError(f"score: unknown {score!r}; streamable: {sorted(STREAM_SCORES)}")
    if order not in ("high", "low"):
        raise InvalidConfigError(f"order must be 'high' or 'low', got {order!r}")
    task = get_task(task, model)
    sign = 1.0 if order == "high" else -1.0
    heap: list[tuple[float, int]] = []  # the k best so far: (signed score, id), smallest on top
    device, seen = model_device(model), 0
    was_training = model.training
    model.eval()
    try:
        for batch in iter_id_batches(data, task.collate, batch_size=batch_size, ids=ids):
            values = STREAM_SCORES[score](task.forward(model, batch.to(device).data)).float().cpu().numpy()
            for sample_id, value in zip(batch.ids.tolist(), values.tolist()):
                entry = (sign * value, -sample_id)  # ties: the smaller id wins, as a stable sort by id would
                (heapq.heappush if len(heap) < k else heapq.heappushpop)(heap, entry)
            seen += len(batch)
    finally:
        model.train(was_training)
    if k > seen:
        raise InvalidConfigError(f"k={k} is larger than the stream ({seen} samples)")
    best = sorted(heap, reverse=True)
    chosen = np.array([-i for _, i in best], dtype=np.int64)
    return Coreset(ids=chosen, weights=np.full(len(chosen), seen / k), scores=None, selector=f"stream_{score}",
                   info={"n_seen": seen, "order": order, "streamed": True})


@torch.no_grad()
def stream_metrics(model: nn.Module, data: Iterable[Any], task: Any, *, batch_size: int = 256,
                   ids: str = "counter") -> dict[str, float]:
    """Mean per-sample loss (and accuracy, where the task has logits) of ``model`` over a stream: the forget-set
    verification of a streamed set. Cost: one no-grad forward pass; memory: one batch."""

    task = get_task(task, model)
    device, n, loss_sum, acc_sum = model_device(model), 0, 0.0, 0.0
    has_acc = task.provides(Capability.LOGITS)
    was_training = model.training
    model.eval()
    try:
        for batch in iter_id_batches(data, task.collate, batch_size=batch_size, ids=ids):
            out = task.forward(model, batch.to(device).data)
            loss_sum += float(out.sample_loss().float().sum())
            acc_sum += float(out.sample_accuracy().float().sum()) if has_acc else 0.0
            n += len(batch)
    finally:
        model.train(was_training)
    if n == 0:
        raise InvalidDataError("the stream is empty")
    return {"n": n, "loss": loss_sum / n, **({"acc": acc_sum / n} if has_acc else {})}
