"""Import a user's ``package.module:function`` (a model or data factory) named in a job config."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

from erasus_ray.errors import InvalidConfigError


def load_callable(spec: Any, key: str, base_dir: Path) -> Callable[..., Any]:
    """The callable ``spec`` (``"package.module:function"``) names; ``key`` names the config key in errors.

    A module file next to the config (``base_dir/package/module.py``) is loaded from there, so a job folder shipped
    with ``ray job submit --working-dir`` needs no install; otherwise the module is imported from ``sys.path``.
    Any failure (malformed spec, module or attribute missing, an import error inside the module) is an
    :class:`InvalidConfigError` naming ``key``, raised before any data is read or model built."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise InvalidConfigError(f"{key}: must read 'package.module:function', got {spec!r}")
    module_name, attr = spec.split(":")
    try:
        module = _import_module(module_name, base_dir)
    except InvalidConfigError as err:
        raise InvalidConfigError(f"{key}: {err}") from None
    except Exception as err:  # the user's module failed while importing: say so under the config key
        raise InvalidConfigError(f"{key}: importing {module_name!r} failed: {type(err).__name__}: {err}") from None
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise InvalidConfigError(f"{key}: module {module_name!r} has no attribute {attr!r}")
    if not callable(target):
        raise InvalidConfigError(f"{key}: {spec!r} is not callable ({type(target).__name__})")
    return target


def _import_module(name: str, base_dir: Path) -> Any:
    local = base_dir.joinpath(*name.split(".")).with_suffix(".py")
    if local.is_file():
        # loaded fresh from the file each time: two job folders may each hold a module of the same name
        spec = importlib.util.spec_from_file_location(name, local)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module  # pickling (Ray) finds the module's classes by name
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise InvalidConfigError(
            f"cannot import {name!r} ({err}); put {name.replace('.', '/')}.py next to the config ({base_dir}) or "
            "install the package") from None
