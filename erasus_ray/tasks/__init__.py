"""Task adapters: one per model family. ``get_task`` accepts an instance or a name."""

from __future__ import annotations

from typing import Any

from torch import nn

from erasus_ray.errors import UnknownNameError
from erasus_ray.tasks.base import Task, TaskOutput
from erasus_ray.tasks.causal_lm import CausalLMTask
from erasus_ray.tasks.classification import ClassificationTask

TASKS: dict[str, type[Task]] = {"classification": ClassificationTask, "causal_lm": CausalLMTask}


def _looks_like_causal_lm(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is None:
        return False
    archs = getattr(config, "architectures", None) or []
    cls = type(model).__name__
    return any("CausalLM" in a or "LMHead" in a for a in archs) or "CausalLM" in cls or "LMHeadModel" in cls


def get_task(task: Task | str | None, model: nn.Module | None = None, **kwargs: Any) -> Task:
    """Resolve ``task`` (an adapter, ``"classification"``, ``"causal_lm"`` or ``"auto"``) to an adapter.

    ``"auto"`` uses the adapter a model declares in its ``task_adapter`` attribute (e.g. a SISA ensemble of causal
    LMs), else picks ``causal_lm`` for Hugging Face causal LMs (by their config) and ``classification`` otherwise;
    for a causal LM the pad token id is read from the model config when present.
    """
    if isinstance(task, Task):
        return task
    name = "auto" if task is None else str(task).lower()
    declared = getattr(model, "task_adapter", None) if model is not None else None
    if name == "auto" and isinstance(declared, Task):
        return declared
    if name == "auto":
        name = "causal_lm" if model is not None and _looks_like_causal_lm(model) else "classification"
    if name not in TASKS:
        raise UnknownNameError(f"Unknown task {task!r}. Known tasks: auto, {', '.join(sorted(TASKS))}")
    if name == "causal_lm" and "pad_token_id" not in kwargs and model is not None:
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(model, "config", None), "eos_token_id", None)
        if pad is not None:
            kwargs["pad_token_id"] = int(pad)
    return TASKS[name](**kwargs)


__all__ = ["Task", "TaskOutput", "ClassificationTask", "CausalLMTask", "TASKS", "get_task"]
