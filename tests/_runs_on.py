"""``runs_on(algorithm, task)``: whether a strategy or selector (class or instance) gets every capability it reads.

Imported by the tests as ``from _runs_on import runs_on`` (tests/ has no ``__init__.py``; see ``_tolerances.py``).
A class is judged by its declared ``requires`` (its default configuration), an instance by ``requirements()``.
"""

from __future__ import annotations

from typing import Any

from erasus_ray.tasks import Task, missing


def runs_on(algorithm: Any, task: Task) -> bool:
    needs = algorithm.requires if isinstance(algorithm, type) else algorithm.requirements()
    return not missing(task, needs)
