"""Reading YAML config files (jobs, sweeps): one loader (:func:`load_config`) whose every failure is an
:class:`InvalidConfigError` that names the file and, where YAML knows it, the line. The keys are the fields of the
config dataclass; nested settings sections (``runner:``, ``execution:``) are the fields of their dataclasses
(:mod:`erasus_ray.settings`).

Stricter than ``yaml.safe_load``: a key given twice is an error (safe_load silently keeps the last one), and an empty
file or a ``null`` document is an error rather than "all defaults" (a truncated or mistyped file must not run the
default job). Python tags (``!!python/object``) are refused, as safe_load refuses them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

from erasus_ray.checks import check_known_keys
from erasus_ray.errors import InvalidConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: list[Any] = []  # a list: keys may be unhashable here (safe_load's own error reports those)
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (each key may appear once)", key_node.start_mark
                )
            seen.append(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml_mapping(text: str, source: str) -> dict[str, Any]:
    """Parse ``text`` (from ``source``, for messages) into a mapping, or raise :class:`InvalidConfigError`."""
    if "\x00" in text:
        raise InvalidConfigError(f"{source}: contains a NUL byte; not a YAML text file")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise InvalidConfigError(f"{source}: not valid YAML: {err}") from None
    if data is None:
        raise InvalidConfigError(f"{source}: the config is empty (or a null document); write the keys to run")
    if not isinstance(data, dict):
        raise InvalidConfigError(f"{source}: a config must be a mapping of keys, got {type(data).__name__}")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise InvalidConfigError(f"{source}: config keys must be strings, got {bad_keys[:5]}")
    return data


def load_yaml_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """Read and parse the YAML file at ``path`` (``what`` names it in messages: "config", "sweep config")."""
    path = Path(path)
    if not path.is_file():
        raise InvalidConfigError(f"{what} file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidConfigError(f"{what} {path}: not UTF-8 text ({err})") from None
    return parse_yaml_mapping(text, f"{what} {path}")


C = TypeVar("C")


def field_names(cls: type) -> tuple[str, ...]:
    """The public fields of dataclass ``cls`` (its config keys), in declaration order; ``_``-fields are derived state."""
    return tuple(f.name for f in dataclasses.fields(cls) if not f.name.startswith("_"))


def config_from_mapping(cls: type[C], data: Any, what: str = "config") -> C:
    """A config dataclass ``cls`` (a job, a sweep) from a mapping whose keys are its fields: a key that is not a
    field is an :class:`InvalidConfigError` naming it, the closest field and every field; then ``cls(**data)`` and
    its ``validate()`` (whose errors name the key, nested ones as ``section.key``). Nothing heavy runs here."""
    if not isinstance(data, dict):
        raise InvalidConfigError(f"a {what} must be a mapping, got {type(data).__name__}")
    check_known_keys(what, data, field_names(cls))
    cfg = cls(**data)
    cfg.validate()  # type: ignore[attr-defined]
    return cfg


def load_config(cls: type[C], path: str | Path, what: str = "config") -> C:
    """The one YAML loader of jobs (``erasus-ray unlearn --config``) and sweeps (``erasus-ray sweep --config``): read
    ``path`` (:func:`load_yaml_mapping`) and build ``cls`` (:func:`config_from_mapping`); every error names the file."""
    data = load_yaml_mapping(path, what)
    try:
        return config_from_mapping(cls, data, what)
    except InvalidConfigError as err:
        raise InvalidConfigError(f"{what} {path}: {err}") from None
