"""Name -> class registries for selectors and strategies.

An unknown name fails with the full list of known names and the closest match, so a typo
in a config or on the command line is fixed in one step.
"""

from __future__ import annotations

import inspect
from typing import Callable, Generic, Iterator, TypeVar

from erasus_ray.checks import close_match_hint
from erasus_ray.errors import InvalidConfigError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of classes (``kind`` is used in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorator(cls: type[T]) -> type[T]:
            if name in self._entries and self._entries[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = cls
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return decorator

    def get(self, name: str) -> type[T]:
        key = str(name).strip().lower().replace("-", "_")
        if key in self._entries:
            return self._entries[key]
        known = sorted(self._entries)
        hint = close_match_hint(key, known)
        raise UnknownNameError(f"Unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {', '.join(known)}")

    def create(self, name: str, **kwargs) -> T:
        """An instance of ``name``; an argument its constructor does not take is an :class:`InvalidConfigError`
        naming it and the accepted ones (not a TypeError from deep inside)."""
        cls = self.get(name)
        try:
            inspect.signature(cls).bind(**kwargs)
        except TypeError as err:
            accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
            raise InvalidConfigError(f"{self.kind} {name!r}: {err}; accepted parameters: {accepted}") from None
        except ValueError:  # no introspectable signature: let the constructor decide
            pass
        return cls(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
