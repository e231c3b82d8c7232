"""Stable sample ids: every input form maps to the same ids; unknown/duplicate ids are named."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from erasus_ray.data import as_id_dataset, make_loader
from erasus_ray.errors import InvalidDataError


def _base(n=20):
    return TensorDataset(torch.arange(n).float().unsqueeze(1), torch.arange(n) % 3)


def test_plain_dataset_ids_are_indices():
    ds = as_id_dataset(_base())
    assert ds.ids.tolist() == list(range(20))
    assert ds[5][0] == 5 and float(ds[5][1][0]) == 5.0


def test_subset_and_loader_map_to_base_ids():
    base = _base()
    sub = Subset(base, [7, 3, 11])
    ds = as_id_dataset(DataLoader(sub, batch_size=2, shuffle=True))
    assert ds.ids.tolist() == [7, 3, 11]
    # the item behind id 11 is base[11]
    row = ds.row_of()[11]
    assert float(ds[row][1][0][0]) == 11.0


def test_nested_subset():
    base = _base()
    inner = Subset(base, [10, 11, 12, 13])
    outer = Subset(inner, [3, 1])
    assert as_id_dataset(outer).ids.tolist() == [13, 11]


def test_dataset_ids_attribute_is_honoured():
    base = _base(5)
    base.ids = np.array([50, 40, 30, 20, 10])
    assert as_id_dataset(Subset(base, [0, 4])).ids.tolist() == [50, 10]


def test_unknown_ids_are_named():
    ds = as_id_dataset(_base())
    with pytest.raises(InvalidDataError, match=r"\[99, 123\]"):
        ds.subset([1, 99, 123])


def test_duplicate_ids_rejected():
    base = _base(3)
    base.ids = [1, 1, 2]
    with pytest.raises(InvalidDataError, match="unique"):
        as_id_dataset(base)


def test_views_keep_the_id_contract():
    """subset / exclude / sorted build views without re-validating the parent, so they must keep its guarantees:
    a subset naming an id twice is rejected, sorted() orders by id (and is the same view when already ordered),
    and every view's rows still map ids to the same base items."""
    base = _base(10)
    base.ids = [50, 10, 40, 20, 30, 90, 60, 80, 70, 0]
    ds = as_id_dataset(base)
    with pytest.raises(InvalidDataError, match="unique.*\\[40\\]"):
        ds.subset([40, 10, 40])
    view = ds.subset([40, 10, 90]).sorted()
    assert view.ids.tolist() == [10, 40, 90]
    assert [view[r][1] for r in range(3)] == [base[1], base[2], base[5]]
    assert view.sorted() is view
    rest = ds.exclude([10, 90, 12345]).sorted()
    assert rest.ids.tolist() == [0, 20, 30, 40, 50, 60, 70, 80]
    assert {int(i): item for i, item in (rest[r] for r in range(len(rest)))}[20] == base[3]
    assert rest.subset([30]).row_of() == {30: 0}


def test_loader_batches_carry_ids_and_weights():
    ds = as_id_dataset(Subset(_base(), [4, 9, 2]))
    from erasus_ray.tasks import ClassificationTask

    batch = next(iter(make_loader(ds, ClassificationTask().collate, batch_size=3, weights={9: 2.0})))
    assert batch.ids.tolist() == [4, 9, 2]
    assert batch.data[0][:, 0].tolist() == [4.0, 9.0, 2.0]
    assert batch.weights.tolist() == [1.0, 2.0, 1.0]
