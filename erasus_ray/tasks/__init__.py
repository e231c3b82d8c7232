"""Task adapters: one per model family, registered by name (:mod:`erasus_ray.tasks.registry`).

``get_task`` accepts an instance, a registered name or ``"auto"``. The contract (:mod:`erasus_ray.tasks.base`) is
loss-first; capabilities beyond the per-sample objective are declared (:mod:`erasus_ray.tasks.capabilities`).
"""

from __future__ import annotations

import importlib
import pkgutil

from erasus_ray.tasks.base import Task, TaskOutput
from erasus_ray.tasks.capabilities import Capability, CapabilityError, capability_set
from erasus_ray.tasks.registry import (
    TASKS,
    get_task,
    matching_tasks,
    missing,
    providers,
    register_task,
    require,
    require_one_of,
)

# the built-in adapters register themselves on import
from erasus_ray.tasks.causal_lm import CausalLMTask  # noqa: E402
from erasus_ray.tasks.classification import ClassificationTask  # noqa: E402

# Every public module of this package is imported, so an adapter registers itself: a new model family is a new file,
# no edit here (the contract modules above are public too; importing them again is free).
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Capability",
    "CapabilityError",
    "CausalLMTask",
    "ClassificationTask",
    "TASKS",
    "Task",
    "TaskOutput",
    "capability_set",
    "get_task",
    "matching_tasks",
    "missing",
    "providers",
    "register_task",
    "require",
    "require_one_of",
]
