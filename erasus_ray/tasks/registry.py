"""Tasks register themselves, like strategies and selectors do; ``task="auto"`` asks each whether it matches.

``@register_task("name")`` adds an adapter class to :data:`TASKS`. :func:`get_task` resolves a name, an instance or
``"auto"``: a model that declares its own adapter (``model.task_adapter``) keeps it; otherwise every registered task's
``matches(model)`` is asked and the highest ``match_priority`` among those that accept wins. A model no adapter
matches gets an error listing the adapters and pointing to the README's "Write an adapter" section, never a guess
(a Whisper or T5 model given the classifier's loss would train on nonsense).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, TypeVar

from torch import nn

from erasus_ray.errors import TaskMismatchError
from erasus_ray.registry import Registry
from erasus_ray.tasks.base import Task
from erasus_ray.tasks.capabilities import Capability, CapabilityError, capability_set

T = TypeVar("T", bound=type[Task])

#: name -> task adapter class.
TASKS: Registry[Task] = Registry("task")

WRITE_AN_ADAPTER = "README.md, section 'Write an adapter'"


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator: register a :class:`Task` subclass under ``name`` (its ``name`` attribute is set to it)."""
    return TASKS.register(name)  # type: ignore[return-value]


def matching_tasks(model: nn.Module) -> list[str]:
    """Names of the registered tasks whose ``matches(model)`` accepts it, highest ``match_priority`` first."""
    found = [TASKS.get(n) for n in TASKS.names() if TASKS.get(n).matches(model)]
    return [cls.name for cls in sorted(found, key=lambda c: -c.match_priority)]


def get_task(task: Task | str | None, model: nn.Module | None = None, **kwargs: Any) -> Task:
    """Resolve ``task`` (an adapter instance, a registered name or ``"auto"``/``None``) to an adapter instance.

    ``"auto"`` uses the adapter the model declares in ``task_adapter`` (e.g. a SISA ensemble of causal LMs), else the
    best-matching registered task; adapters may read defaults from the model through a ``from_model(model, **kwargs)``
    classmethod (a causal LM's pad token). ``kwargs`` go to the adapter's constructor.
    """
    if isinstance(task, Task):
        return task
    name = "auto" if task is None else str(task).strip().lower()
    if name == "auto":
        declared = getattr(model, "task_adapter", None) if model is not None else None
        if isinstance(declared, Task):
            return declared
        if model is None:
            raise TaskMismatchError("task='auto' needs the model to pick an adapter; pass task=<name> or the model")
        found = matching_tasks(model)
        if not found:
            raise TaskMismatchError(
                f"no registered task adapter matches {type(model).__name__}; known adapters: "
                f"{', '.join(TASKS.names())}. Pass task=<name> if one fits, or write an adapter ({WRITE_AN_ADAPTER})."
            )
        cls = TASKS.get(found[0])
    else:
        cls = TASKS.get(name)
    from_model = getattr(cls, "from_model", None)
    if model is not None and callable(from_model):
        return from_model(model, **kwargs)
    return TASKS.create(cls.name, **kwargs)


def providers(capability: Capability) -> list[str]:
    """Names of the registered tasks that declare ``capability``."""
    return [name for name in TASKS.names() if capability in TASKS.get(name).capabilities]


def missing(task: Task, needs: Iterable[Capability | str]) -> list[Capability]:
    """The capabilities in ``needs`` that ``task`` does not declare, in declaration order of the enum."""
    needed = capability_set(needs)
    return [c for c in Capability if c in needed and c not in task.capabilities]


def require(task: Task, needs: Iterable[Capability | str], *, algorithm: str) -> None:
    """Raise :class:`CapabilityError` unless ``task`` declares every capability in ``needs``.

    ``algorithm`` names the caller as users know it (``"strategy 'npo'"``, ``"selector 'el2n'"``,
    ``"metric 'forget_acc'"``). The message names the task, each missing capability with what it means, and the
    registered tasks that would provide it. Cost: a set difference.
    """
    lacking = missing(task, needs)
    if not lacking:
        return
    parts = []
    for cap in lacking:
        others = providers(cap)
        where = f" (provided by tasks: {', '.join(others)})" if others else ""
        parts.append(f"'{cap}' - {cap.meaning}{where}")
    has = ", ".join(sorted(str(c) for c in task.capabilities))
    raise CapabilityError(
        f"{algorithm} needs {'; '.join(parts)}; task {task.name!r} ({type(task).__name__}) declares only: {has}. "
        f"Use a task that provides it, or give the adapter that capability (README: 'Write an adapter')."
    )


def require_one_of(task: Task, options: Iterable[Capability | str], *, algorithm: str) -> None:
    """Raise :class:`CapabilityError` unless ``task`` declares at least one capability of ``options`` (empty: no
    constraint), e.g. a preference objective whose responses are answer tokens or class labels."""
    options = capability_set(options) if options else frozenset()
    if not options or options & task.capabilities:
        return
    alternatives = " or ".join(f"'{c}' - {c.meaning}" for c in Capability if c in options)
    has = ", ".join(sorted(str(c) for c in task.capabilities))
    raise CapabilityError(
        f"{algorithm} needs one of: {alternatives}; task {task.name!r} ({type(task).__name__}) declares only: {has}. "
        f"Use a task that provides one, or give the adapter that capability (README: 'Write an adapter')."
    )


__all__ = ["TASKS", "require_one_of", "WRITE_AN_ADAPTER", "get_task", "matching_tasks", "missing", "providers", "register_task", "require"]
