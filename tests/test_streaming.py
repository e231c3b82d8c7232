"""Streams (IterableDataset) where one pass is enough: top-k scoring and forget metrics; refused, with a pointer,
where random access is needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from erasus_ray import ErasusUnlearner
from erasus_ray.jobs.streaming import iter_id_batches, stream_metrics, stream_top_k
from erasus_ray.errors import InvalidDataError
from erasus_ray.selectors import get_selector
from erasus_ray.tasks import get_task


class Stream(IterableDataset):
    """``n`` classifier samples as dicts ``{"sid": 5000 + 3 i, "x": ..., "y": ...}`` generated on the fly."""

    def __init__(self, n: int, with_ids: bool = True):
        self.n, self.with_ids = n, with_ids

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for i in range(self.n):
            x = torch.randn(4, generator=g)
            y = int(x[0] > 0)
            yield {"sid": 5000 + 3 * i, "item": (x, y)} if self.with_ids else (x, y)


def test_stream_top_k_matches_the_map_style_selector_and_keeps_stream_ids():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    stream = Stream(300)
    items = list(stream)
    xs = torch.stack([it["item"][0] for it in items])
    ys = torch.tensor([it["item"][1] for it in items])
    dataset = TensorDataset(xs, ys)
    dataset.ids = np.array([it["sid"] for it in items])
    task = get_task("classification")
    expected = get_selector("loss").select(model, dataset, task=task, k=10, seed=0)

    class Task(type(task)):  # the stream's items carry the sample under "item"
        def collate(self, items):
            return super().collate([it["item"] for it in items])

    chosen = stream_top_k(model, stream, Task(), 10, score="loss", ids="sid", batch_size=64)
    assert sorted(chosen.ids.tolist()) == sorted(expected.ids.tolist())
    assert chosen.info["n_seen"] == 300 and all(i % 3 == 5000 % 3 for i in chosen.ids)
    # a running counter when the items carry no id: positions in the stream
    counted = stream_top_k(model, Stream(300, with_ids=False), task, 10)
    assert sorted(counted.ids.tolist()) == sorted(((expected.ids - 5000) // 3).tolist())
    metrics = stream_metrics(model, Stream(300, with_ids=False), task, batch_size=32)
    with torch.no_grad():
        acc = float((model(xs).argmax(1) == ys).float().mean())
    assert metrics["n"] == 300 and metrics["acc"] == pytest.approx(acc)
    assert [len(b) for b in iter_id_batches(Stream(10, with_ids=False), task.collate, batch_size=4)] == [4, 4, 2]


def test_a_stream_is_refused_where_random_access_is_needed():
    unlearner = ErasusUnlearner(nn.Linear(4, 2), strategy="gradient_ascent", selector=None, fraction=None, progress=False)
    with pytest.raises(InvalidDataError, match=r"forget_data: .*stream .*stream_top_k"):
        unlearner.fit(forget_data=DataLoader(Stream(20, with_ids=False)), epochs=1)
