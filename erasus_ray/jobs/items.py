"""Turning a job's :class:`~erasus_ray.jobs.tables.Table` into the items its task adapter collates.

* With a ``label_column`` (a classifier) the items are ``(x, y)`` pairs: ``x`` float32 from the ``features`` columns
  (default: every numeric column but the id and label columns; a ``[N, ...]`` array such as an ``.npz``'s ``x`` keeps
  its shape), ``y`` from ``label_column``. The dataset is a ``TensorDataset``, so its NaN/inf check is one vectorised
  pass.
* With a ``label_column`` and token input (a ``text_column``, or an ``input_ids`` column: a token encoder such as a
  ``*ForSequenceClassification`` model), one dict per row ``{input_ids, attention_mask?, labels}``, ``labels`` the
  row's class from ``label_column``.
* Without one (token tasks: ``causal_lm``, ``seq2seq``, any adapter whose items are dicts), one dict per row: the columns
  named in ``features`` (default: those of ``input_ids``, ``attention_mask``, ``labels``, ``answer_start``,
  ``decoder_input_ids`` that exist), plus ``text_column`` tokenised to ``input_ids`` and ``target_column`` tokenised
  to ``labels`` when a tokenizer is given.

Every dataset carries the table's ids as its ``ids`` attribute, so :func:`erasus_ray.data.as_id_dataset` (and with it
coresets, results and ledgers) speaks in the data's ids.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.jobs.tables import Table

#: the dict keys token adapters read, taken from columns of these names when ``features`` is not given
TOKEN_COLUMNS = ("input_ids", "attention_mask", "labels", "answer_start", "decoder_input_ids")


class IdTensorDataset(TensorDataset):
    """A ``TensorDataset`` whose rows carry stable ids (``ids``), read by :func:`erasus_ray.data.as_id_dataset`."""

    def __init__(self, *tensors: torch.Tensor, ids: np.ndarray) -> None:
        super().__init__(*tensors)
        self.ids = ids


class DictRowDataset(Dataset):
    """One dict per row (token adapters' items), built from columns on access; ``ids`` as above."""

    def __init__(self, columns: dict[str, np.ndarray], ids: np.ndarray) -> None:
        self.columns = columns
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, row: int) -> dict[str, Any]:
        return {name: _cell(col[row]) for name, col in self.columns.items()}


def _cell(value: Any) -> Any:
    return torch.as_tensor(np.asarray(value, dtype=np.int64)) if np.ndim(value) else int(value)


def classifier_dataset(table: Table, ids: np.ndarray, *, features: Sequence[str] | None, label_column: str,
                       id_column: str) -> IdTensorDataset:
    """``(x, y)`` rows: see the module docstring."""
    labels = table.column(label_column, "data.label_column")
    names = list(features) if features else [n for n, c in table.columns.items()
                                             if n not in (id_column, label_column) and c.dtype.kind in "iufb"]
    if not names:
        raise InvalidConfigError(f"data.features: no numeric feature column in {table.source}; columns: {sorted(table.columns)}")
    parts = []
    for name in names:
        col = table.column(name, "data.features")
        if col.dtype.kind not in "iufb":
            raise InvalidDataError(f"data.features: column {name!r} is not numeric (dtype {col.dtype})")
        parts.append(col.reshape(len(col), -1) if len(names) > 1 else col if col.ndim > 1 else col[:, None])
    x = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    if labels.dtype.kind not in "iu":
        raise InvalidDataError(f"data.label_column: column {label_column!r} must hold integer class labels, got dtype "
                               f"{labels.dtype}")
    return IdTensorDataset(torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32),
                           torch.as_tensor(labels.astype(np.int64)), ids=ids)


def token_dataset(table: Table, ids: np.ndarray, *, features: Sequence[str] | None, tokenizer: Any,
                  text_column: str | None, target_column: str | None, label_column: str | None = None) -> DictRowDataset:
    """Dict rows for token adapters: see the module docstring."""
    names = list(features) if features else [n for n in TOKEN_COLUMNS if n in table.columns]
    columns = {name: table.column(name, "data.features") for name in names}
    if label_column is not None:  # a sequence classifier: one class label per row
        labels = table.column(label_column, "data.label_column")
        if labels.dtype.kind not in "iu":
            raise InvalidDataError(f"data.label_column: column {label_column!r} must hold integer class labels, got "
                                   f"dtype {labels.dtype}")
        columns["labels"] = labels
    for column, field in ((text_column, "input_ids"), (target_column, "labels")):
        if column is None:
            continue
        if tokenizer is None:
            raise InvalidConfigError(f"data.{'text' if field == 'input_ids' else 'target'}_column: tokenising "
                                     f"{column!r} needs a tokenizer (model.tokenizer, or one saved in the model folder)")
        texts = [str(t) for t in table.column(column, f"data.{'text' if field == 'input_ids' else 'target'}_column")]
        encoded = tokenizer(texts)["input_ids"]
        columns[field] = np.empty(len(encoded), dtype=object)
        columns[field][:] = [np.asarray(e, dtype=np.int64) for e in encoded]
    if "input_ids" not in columns:
        raise InvalidConfigError(f"data: token tasks need an input_ids column or text_column (+ a tokenizer); columns in "
                                 f"{table.source}: {sorted(table.columns)}")
    return DictRowDataset(columns, ids)
