"""Which rows of a job's table are the forget, retain and held-out sets, by the data's own ids.

A selection (``forget:``, ``retain:``, ``heldout:`` of a job's ``data:``) is one of:

* a list of ids, or ``{ids: [...]}``: values of the ``id_column``;
* ``{id_file: path}``: a text file of ids, one per line (``#`` comments and blank lines skipped), or a JSON list;
* ``{class: 3}`` or ``{class: [3, 7]}``: rows whose ``label_column`` holds one of these values;
* ``{where: "age >= 65 and country == 'NL'"}``: a filter expression (grammar below);
* ``retain: rest`` (the default): every row that is neither forget nor held-out.

Filter grammar (:func:`where_mask`): Python comparison syntax restricted to column names, literals (numbers,
strings, True/False/None, lists/tuples of them), ``== != < <= > >=``, ``in`` / ``not in`` a literal list, ``and``,
``or``, ``not`` and parentheses; chained comparisons (``18 <= age < 65``) work. It is parsed with :mod:`ast` and
evaluated column-wise with NumPy by walking that tree; nothing is ``eval``-ed, and any other node (a call, an
attribute, arithmetic, a subscript) is refused with the node named.
"""

from __future__ import annotations

import ast
import json
import operator
from pathlib import Path
from typing import Any, Callable

import numpy as np

from erasus_ray.checks import check_known_keys
from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.jobs.tables import Table

SELECTION_KEYS = ("ids", "id_file", "class", "where")


def table_ids(table: Table, id_column: str, key: str = "data.id_column") -> np.ndarray:
    """The id column as unique int64 ids (the ids results, coresets and ledgers speak in)."""
    ids = table.column(id_column, key)
    if ids.dtype.kind not in "iu":
        if ids.dtype.kind == "f" and np.all(np.isfinite(ids)) and np.all(ids == np.round(ids)):
            ids = ids.astype(np.int64)  # CSV readers turn an int column with gaps into floats
        else:
            raise InvalidDataError(f"{key}: column {id_column!r} must hold integer ids, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    values, counts = np.unique(ids, return_counts=True)
    if len(values) != len(ids):
        raise InvalidDataError(f"{key}: column {id_column!r} is not unique; repeated ids: {values[counts > 1][:10].tolist()}")
    return ids


def select_rows(spec: Any, table: Table, ids: np.ndarray, *, key: str, label_column: str | None,
                base_dir: Path, partial: bool = False) -> np.ndarray:
    """A boolean row mask for the selection ``spec`` (see the module docstring); ``key`` names it in errors.

    ``partial``: ``table`` is one chunk of a stream, so a selection may match nothing in it and named ids may lie in
    other chunks; the caller checks those over the whole stream (:class:`erasus_ray.jobs.stream_job.StreamSplits`)."""
    if isinstance(spec, list):
        spec = {"ids": spec}
    if not isinstance(spec, dict) or len(spec) != 1:
        raise InvalidConfigError(f"{key}: give one of {list(SELECTION_KEYS)} (or a list of ids), got {spec!r}")
    check_known_keys(key, spec, SELECTION_KEYS)
    (how, value), = spec.items()
    if how in ("ids", "id_file"):
        wanted = value if how == "ids" else _read_id_file(value, base_dir, f"{key}.id_file")
        return _id_mask(wanted, ids, f"{key}.{how}", partial=partial)
    if how == "class":
        if label_column is None:
            raise InvalidConfigError(f"{key}.class: needs data.label_column")
        wanted = value if isinstance(value, list) else [value]
        mask = np.isin(table.column(label_column, "data.label_column"), wanted)
        if not mask.any() and not partial:
            raise InvalidDataError(f"{key}.class: no row has {label_column} in {wanted}")
        return mask
    mask = where_mask(value, table, f"{key}.where")
    if not mask.any() and not partial:
        raise InvalidDataError(f"{key}.where: {value!r} matches no row")
    return mask


def selection_ids(spec: Any, key: str, base_dir: Path) -> np.ndarray | None:
    """The ids a selection names (a list, ``ids:`` or ``id_file:``), or None for ``class`` / ``where`` selections."""
    if isinstance(spec, list):
        return _as_ids(spec, f"{key}.ids")
    if isinstance(spec, dict) and "ids" in spec:
        return _as_ids(spec["ids"], f"{key}.ids")
    if isinstance(spec, dict) and "id_file" in spec:
        return _as_ids(_read_id_file(spec["id_file"], base_dir, f"{key}.id_file"), f"{key}.id_file")
    return None


def _as_ids(values: Any, key: str) -> np.ndarray:
    if not isinstance(values, (list, tuple, np.ndarray)) or not len(values):
        raise InvalidConfigError(f"{key}: must be a non-empty list of ids, got {values!r}")
    try:
        return np.asarray(values, dtype=np.int64)
    except (TypeError, ValueError):
        raise InvalidConfigError(f"{key}: ids must be integers, got {list(values)[:10]}") from None


def absent_ids_error(absent: np.ndarray, key: str) -> InvalidDataError:
    return InvalidDataError(f"{key}: {len(absent)} id(s) are not in the data: {absent[:20].tolist()}")


def _id_mask(values: Any, ids: np.ndarray, key: str, partial: bool = False) -> np.ndarray:
    wanted = _as_ids(values, key)
    if partial:
        return np.isin(ids, wanted)
    absent = np.setdiff1d(wanted, ids)
    if len(absent):
        raise absent_ids_error(absent, key)
    return np.isin(ids, wanted)


def _read_id_file(path: Any, base_dir: Path, key: str) -> list[int]:
    file = base_dir / str(path)
    if not file.is_file():
        raise InvalidConfigError(f"{key}: {file} does not exist")
    text = file.read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    try:
        return [int(line) for line in lines if line]
    except ValueError as err:
        raise InvalidConfigError(f"{key}: {file}: {err}") from None


_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
    ast.GtE: operator.ge, ast.In: lambda a, b: np.isin(a, b), ast.NotIn: lambda a, b: ~np.isin(a, b),
}


def where_mask(expression: Any, table: Table, key: str) -> np.ndarray:
    """The rows for which the filter ``expression`` holds (grammar: the module docstring), as a boolean mask."""
    if not isinstance(expression, str) or not expression.strip():
        raise InvalidConfigError(f"{key}: must be a filter expression string, got {expression!r}")
    try:
        tree = ast.parse(expression, mode="eval").body
    except SyntaxError as err:
        raise InvalidConfigError(f"{key}: not a filter expression: {err.msg} in {expression!r}") from None
    result = _evaluate(tree, table, key)
    mask = np.broadcast_to(np.asarray(result), (len(table),))
    if mask.dtype != bool:
        raise InvalidConfigError(f"{key}: {expression!r} is not a condition (compare a column with a value)")
    return np.array(mask)


def _evaluate(node: ast.AST, table: Table, key: str) -> Any:
    if isinstance(node, ast.BoolOp):
        parts = [np.asarray(_evaluate(v, table, key), dtype=bool) for v in node.values]
        combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
        out = parts[0]
        for part in parts[1:]:
            out = combine(out, part)
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ~np.asarray(_evaluate(node.operand, table, key), dtype=bool)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        return -node.operand.value
    if isinstance(node, ast.Compare):
        left, out = _evaluate(node.left, table, key), np.ones(len(table), dtype=bool)
        for op, right_node in zip(node.ops, node.comparators):
            right = _evaluate(right_node, table, key)
            out = out & np.asarray(_COMPARE[type(op)](left, right), dtype=bool)
            left = right
        return out
    if isinstance(node, ast.Name):
        return table.column(node.id, key)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_evaluate(e, table, key) for e in node.elts]
    raise InvalidConfigError(f"{key}: {type(node).__name__} is not allowed in a filter (columns, literals, comparisons, "
                             "and/or/not only)")


def split_masks(data: dict[str, Any], table: Table, ids: np.ndarray, base_dir: Path, *, partial: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean row masks of forget, retain and held-out for a job's ``data:`` section (the module docstring);
    overlaps are errors. ``partial``: ``table`` is one chunk of a stream (see :func:`select_rows`)."""
    select = lambda key: select_rows(data[key], table, ids, key=f"data.{key}", label_column=data.get("label_column"),
                                     base_dir=base_dir, partial=partial)
    forget = select("forget")
    heldout = select("heldout") if data.get("heldout") is not None else np.zeros(len(ids), dtype=bool)
    if (forget & heldout).any():
        raise InvalidDataError(f"data.heldout: {int((forget & heldout).sum())} row(s) are also forget rows, ids "
                               f"{ids[forget & heldout][:20].tolist()}")
    if data.get("retain") in (None, "rest"):
        retain = ~(forget | heldout)
    else:
        retain = select("retain")
        for name, other in (("forget", forget), ("heldout", heldout)):
            if (retain & other).any():
                raise InvalidDataError(f"data.retain: ids {ids[retain & other][:20].tolist()} are also {name} ids")
    if not retain.any() and not partial:
        raise InvalidDataError("data.retain: no row is left to retain")
    return forget, retain, heldout
