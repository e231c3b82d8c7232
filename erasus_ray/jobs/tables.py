"""Reading a job's ``data:`` into columns: ``datasets`` saved with ``save_to_disk``, Parquet, CSV, JSON Lines, NumPy
``.npz``, or a ``factory:``. One in-memory form, :class:`Table` (column name -> NumPy array, one row per sample), so
the forget/retain selection (:mod:`erasus_ray.jobs.rows`) and the item builders (:mod:`erasus_ray.jobs.items`) are
written once for every source.

Cost: the whole table is read into memory once (Arrow -> NumPy); for data larger than memory set
``data.streaming: true`` (chunks; see :mod:`erasus_ray.jobs.stream_job`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from erasus_ray.errors import InvalidConfigError, InvalidDataError

#: file suffix -> source kind
SUFFIXES: dict[str, str] = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl",
                            ".ndjson": "jsonl", ".json": "jsonl", ".npz": "npz"}


@dataclass
class Table:
    """Columns of equal length (``[N]`` or ``[N, ...]`` arrays; text and token lists as object arrays)."""

    columns: dict[str, np.ndarray]
    source: str

    def __post_init__(self) -> None:
        lengths = {name: len(col) for name, col in self.columns.items()}
        if not lengths:
            raise InvalidDataError(f"data {self.source}: no columns")
        if len(set(lengths.values())) > 1:
            raise InvalidDataError(f"data {self.source}: columns differ in length: {lengths}")

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def column(self, name: str, key: str) -> np.ndarray:
        """The column ``name``, or an :class:`InvalidConfigError` naming the config ``key`` and the columns there are."""
        if name not in self.columns:
            raise InvalidConfigError(f"{key}: no column {name!r} in {self.source}; columns: {sorted(self.columns)}")
        return self.columns[name]


def source_kind(path: Path, key: str = "data.path") -> str:
    """``"saved_dataset"`` for a folder written by ``datasets.Dataset.save_to_disk``, else the kind of its suffix."""
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "saved_dataset"
        raise InvalidConfigError(f"{key}: {path} is a folder but not a saved `datasets` dataset (no state.json)")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise InvalidConfigError(f"{key}: cannot tell the format of {path.name}; known suffixes: {sorted(SUFFIXES)} "
                                 "or a save_to_disk folder")
    return kind


def read_table(path: Path, *, split: str | None = None, key: str = "data.path") -> Table:
    """Read the file or folder at ``path`` (see :data:`SUFFIXES`); ``split`` picks one split of a saved DatasetDict."""
    if not path.exists():
        raise InvalidConfigError(f"{key}: {path} does not exist")
    kind = source_kind(path, key)
    try:
        columns = _READERS[kind](path, split)
    except (InvalidConfigError, InvalidDataError):
        raise
    except Exception as err:  # a reader's own parse error: name the file
        raise InvalidDataError(f"{key}: could not read {path} as {kind}: {type(err).__name__}: {err}") from None
    return Table(columns, str(path))


def table_from_factory(make: Callable[..., Any], args: Mapping[str, Any], key: str) -> Table:
    """Call a data factory: it returns columns (a mapping of arrays / lists, a pandas DataFrame, a pyarrow Table or a
    map-style ``datasets.Dataset``; a stream goes through :mod:`erasus_ray.jobs.stream_job` instead)."""
    made = make(**args)
    if hasattr(made, "flatten_indices") and hasattr(made, "data"):  # datasets.Dataset: its rows after select/shuffle
        return Table(_arrow_columns(made.flatten_indices().data.table), key)
    if hasattr(made, "to_pydict") and hasattr(made, "schema"):  # pyarrow.Table
        return Table(_arrow_columns(made), key)
    if hasattr(made, "to_dict") and hasattr(made, "columns"):  # pandas.DataFrame
        return Table({str(c): made[c].to_numpy() for c in made.columns}, key)
    if isinstance(made, Mapping):
        return Table({str(k): _as_column(v) for k, v in made.items()}, key)
    raise InvalidConfigError(f"{key}: the factory returned {type(made).__name__}; return a mapping of columns, a pandas "
                             "DataFrame, a pyarrow Table, a datasets.Dataset or a stream (an IterableDataset of row dicts)")


def _as_column(values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values
    if hasattr(values, "numpy"):  # a torch tensor
        return values.detach().cpu().numpy()
    values = list(values)
    if values and isinstance(values[0], (list, tuple, np.ndarray)):
        out = np.empty(len(values), dtype=object)  # ragged token lists stay one object per row
        out[:] = [np.asarray(v) for v in values]
        return out
    return np.asarray(values)


def _arrow_columns(table: Any) -> dict[str, np.ndarray]:
    return {name: _as_column(table.column(name).to_pylist()) if _is_list(table.column(name).type)
            else table.column(name).to_numpy() for name in table.column_names}


def _is_list(arrow_type: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type)


def _read_parquet(path: Path, split: str | None) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    return _arrow_columns(pq.read_table(path))


def _read_csv(path: Path, split: str | None) -> dict[str, np.ndarray]:
    import pyarrow.csv as pcsv

    return _arrow_columns(pcsv.read_csv(path))


def _read_jsonl(path: Path, split: str | None) -> dict[str, np.ndarray]:
    import pyarrow.json as pjson

    return _arrow_columns(pjson.read_json(path))


def _read_npz(path: Path, split: str | None) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:  # no pickles: an .npz must not run code
        return {name: archive[name] for name in archive.files}


def _read_saved_dataset(path: Path, split: str | None) -> dict[str, np.ndarray]:
    """A ``save_to_disk`` folder, read from its Arrow files (``state.json`` lists them; each is an Arrow IPC stream),
    not through ``datasets.load_from_disk``: it needs only pyarrow, and ``save_to_disk`` has already applied any
    ``select`` / ``shuffle`` index mapping to those files (``flatten_indices``), so they are the dataset's rows."""
    import pyarrow as pa

    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if split is None or split not in splits:
            raise InvalidConfigError(f"data.split: {path} holds splits {splits}; name one (got {split!r})")
        path = path / split
    tables = []
    for file in saved_dataset_files(path):
        with pa.memory_map(str(file)) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return _arrow_columns(pa.concat_tables(tables))


def saved_dataset_files(path: Path) -> list[Path]:
    """The Arrow files of one split of a ``save_to_disk`` folder, in row order."""
    return [path / f["filename"] for f in json.loads((path / "state.json").read_text())["_data_files"]]


_READERS: dict[str, Callable[[Path, str | None], dict[str, np.ndarray]]] = {
    "parquet": _read_parquet, "csv": _read_csv, "jsonl": _read_jsonl, "npz": _read_npz,
    "saved_dataset": _read_saved_dataset,
}
