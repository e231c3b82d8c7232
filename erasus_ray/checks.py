"""Argument checks with the argument's name in the message: type first, then range.

Why strict types: a YAML ``"0.5"`` or a stray ``True`` would otherwise pass ``float(value)`` and run a job the caller
did not ask for; ``2.5`` samples per batch would fail deep inside a DataLoader. Bools are not numbers here.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
from typing import Any, Collection, Literal, Union, get_args, get_origin, get_type_hints

import numpy as np

from erasus_ray.errors import InvalidConfigError

#: Seeds must fit NumPy's legacy seeding (``np.random.seed``), which accepts ``[0, 2**32)``.
MAX_SEED = 2**32 - 1


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """A Python or NumPy int or float, not a bool (nor a string that looks like a number)."""
    return is_int(value) or isinstance(value, (float, np.floating))


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None, none_ok: bool = False) -> int | None:
    """``value`` as an int in ``[low, high]``; else :class:`InvalidConfigError` naming ``name``."""
    if value is None and none_ok:
        return None
    in_range = is_int(value) and (low is None or value >= low) and (high is None or value <= high)
    if not in_range:
        bounds = " and ".join(s for s in (f">= {low}" if low is not None else "", f"<= {high}" if high is not None else "") if s)
        allowed = f"an integer{' ' + bounds if bounds else ''}" + (" or None" if none_ok else "")
        raise InvalidConfigError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def check_real(name: str, value: Any, *, low: float | None = None, high: float | None = None, low_open: bool = False,
               none_ok: bool = False) -> float | None:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``); else
    :class:`InvalidConfigError` naming ``name``."""
    if value is None and none_ok:
        return None
    ok = is_real(value) and math.isfinite(float(value))
    if ok and low is not None:
        ok = float(value) > low if low_open else float(value) >= low
    if ok and high is not None:
        ok = float(value) <= high
    if not ok:
        left = "(" if low_open else "["
        interval = f" in {left}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise InvalidConfigError(f"{name} must be a finite number{interval}{' or None' if none_ok else ''}, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """``value`` if it is one of ``choices`` (compared as given; unhashable values are simply not among them)."""
    if not any(type(value) is type(c) and value == c for c in choices):
        raise InvalidConfigError(f"{name} must be one of {sorted(map(repr, choices))}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidConfigError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_seed(name: str, value: Any) -> int:
    """A seed every generator accepts: an integer in ``[0, 2**32 - 1]``."""
    return check_int(name, value, low=0, high=MAX_SEED)  # type: ignore[return-value]


def close_match_hint(name: str, known: Collection[str]) -> str:
    """``" Did you mean 'x'?"`` for the known name closest to ``name`` (difflib), or ``""``: a typo is fixed in one step."""
    close = difflib.get_close_matches(str(name), sorted(known), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_known_keys(where: str, given: Collection[str], known: Collection[str]) -> None:
    """Every key of ``given`` is one of ``known``; else :class:`InvalidConfigError` naming ``where``, the unknown
    keys, the closest known one and every accepted key."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        hint = close_match_hint(unknown[0], known)
        raise InvalidConfigError(f"{where}: unknown key(s) {unknown}.{hint} Accepted: {sorted(known)}")


def _type_name(tp: Any) -> str:
    """How an annotation reads in an error message: ``int``, ``float or None``, ``one of ['a', 'b']``."""
    if tp is Any:
        return "anything"
    if tp is type(None):
        return "None"
    if get_origin(tp) is Literal:
        return f"one of {list(get_args(tp))}"
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    origin = get_origin(tp) or tp
    return {dict: "a mapping", list: "a list", tuple: "a list"}.get(origin, getattr(origin, "__name__", str(origin)))


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` has annotation ``tp``'s type: strict like the checks above (a bool is no number, an int is
    a float); containers are checked by their kind only (their items belong to the owner's range checks)."""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if get_origin(tp) is Literal:
        return any(type(value) is type(c) and value == c for c in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return any(_matches(value, a) for a in get_args(tp))
    origin = get_origin(tp) or tp
    if origin is bool:
        return isinstance(value, (bool, np.bool_))
    if origin is int:
        return is_int(value)
    if origin is float:
        return is_real(value)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    return isinstance(value, origin) if isinstance(origin, type) else True


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_field_types(obj: Any) -> None:
    """Each field of the dataclass ``obj`` holds a value of its annotated type; else :class:`InvalidConfigError`
    naming the field and the expected type. Called first in a settings dataclass's ``__post_init__``, so a field
    added later is type-checked (from YAML too) without a check written for it."""
    for name, tp in _field_types(type(obj)).items():
        value = getattr(obj, name)
        if not _matches(value, tp):
            raise InvalidConfigError(f"{name} must be {_type_name(tp)}, got {value!r}")
