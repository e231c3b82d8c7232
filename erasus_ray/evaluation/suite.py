"""A named list of registered metrics, run as one evaluation: the building block of the benchmark protocols.

``MetricSuite(names)`` checks the names against :data:`~erasus_ray.evaluation.metrics.METRICS` when it is built (an
unknown name fails with the close match and every known name), and ``run`` computes them through
:func:`~erasus_ray.evaluation.metrics.run_metrics`, so the values are exactly those of
:func:`~erasus_ray.evaluation.evaluate` with ``metrics=names``. A metric that reads a split the caller did not give
(``mia_loss_auc`` without ``test``) is an error naming the metric and the split, not a silently missing key.

Example::

    result = MetricSuite(["forget_acc", "retain_acc", "mia_loss_auc"]).run(model, forget, retain, test)
    result["forget_acc"]; result.save("metrics.json")

Cost: one no-grad forward pass per split that some metric reads, shared by all the metrics (see ``run_metrics``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

from torch import nn

from erasus_ray.data import as_id_dataset
from erasus_ray.errors import InvalidConfigError
from erasus_ray.evaluation.metrics import METRICS, run_metrics_with_parts
from erasus_ray.tasks import Task, get_task
from erasus_ray.utils.atomic import atomic_write_text


def json_number(value: Any) -> Any:
    """``value`` as JSON can hold it: NaN / inf become None (JSON has no NaN), numpy scalars become Python numbers."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_json(payload: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``payload`` as indented JSON, atomically (a reader sees the old file or the new one, whole)."""
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=json_number) + "\n")


@dataclass
class SuiteResult:
    """The values of one suite run: ``metrics`` (name -> value, in the suite's order), the ``task`` name, the
    ``seed`` and the evaluation ``options``. Reads like a mapping: ``result["forget_acc"]``."""

    metrics: dict[str, float]
    task: str
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    #: what the metrics computed on their way, by name (e.g. each TOFU utility set's parts; ``EvalContext.parts``)
    parts: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, name: str) -> float:
        return self.metrics[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN as None)."""
        return {"task": self.task, "seed": self.seed, "options": dict(self.options),
                "metrics": {k: json_number(v) for k, v in self.metrics.items()},
                **({"parts": {k: json_number(v) for k, v in self.parts.items()}} if self.parts else {})}

    def save(self, path: str | os.PathLike) -> None:
        """:meth:`to_dict` as JSON at ``path``, written atomically."""
        save_json(self.to_dict(), path)


def _recordable(value: Any) -> Any:
    """An option as a result records it: a number / string as is, an object (LiRA's shadows, utility sets) by its
    type name, so the result stays JSON."""
    return value if isinstance(value, (bool, int, float, str, type(None))) else type(value).__name__


class MetricSuite:
    """Registered metrics by name, run together on one model.

    Args:
        names: metric names (see ``METRICS.names()``); an unknown one raises
            :class:`~erasus_ray.errors.UnknownNameError` listing the known ones; a repeated one is an
            :class:`~erasus_ray.errors.InvalidConfigError`.
    """

    def __init__(self, names: Iterable[str]) -> None:
        if isinstance(names, str):
            names = [names]
        self.names = tuple(names)
        if not self.names:
            raise InvalidConfigError(f"names: a suite needs at least one metric; known: {', '.join(METRICS.names())}")
        repeated = sorted({n for n in self.names if self.names.count(n) > 1})
        if repeated:
            raise InvalidConfigError(f"names: metric(s) {repeated} given more than once")
        self.metrics = [METRICS.get(n) for n in self.names]

    def __repr__(self) -> str:
        return f"MetricSuite({list(self.names)!r})"

    def splits(self) -> tuple[str, ...]:
        """The splits some metric of the suite reads, in forget / retain / test order."""
        used = {s for m in self.metrics for s in m.splits}
        return tuple(s for s in ("forget", "retain", "test") if s in used)

    def run(
        self,
        model: nn.Module,
        forget: Any,
        retain: Any,
        test: Any = None,
        task: Task | str = "auto",
        seed: int = 0,
        **options: Any,
    ) -> SuiteResult:
        """Compute the suite's metrics of ``model``. ``forget`` / ``retain`` / ``test``: datasets (anything
        :func:`~erasus_ray.data.as_id_dataset` takes); ``task``: an adapter, a registered name or ``"auto"``;
        ``options``: the fields of :class:`~erasus_ray.evaluation.metrics.MetricOptions`. A metric whose task
        capability is missing raises :class:`~erasus_ray.tasks.CapabilityError` before any forward pass."""
        adapter = get_task(task, model)
        given = {"forget": forget, "retain": retain, "test": test}
        self._check_splits({s for s, d in given.items() if d is not None})
        data = {s: as_id_dataset(d) for s, d in given.items() if d is not None}
        values, parts = run_metrics_with_parts(model, adapter, data, self.names, seed=seed, **options)
        return SuiteResult(values, adapter.name, seed, {k: _recordable(v) for k, v in options.items()}, parts)

    def _check_splits(self, given: set[str]) -> None:
        for metric in self.metrics:
            missing = [s for s in metric.splits if s not in given]
            if missing:
                raise InvalidConfigError(f"metric {metric.name!r} reads split(s) {missing}, which were not given "
                                         f"(pass {', '.join(f'{s}=' for s in missing)})")


__all__ = ["MetricSuite", "SuiteResult", "json_number", "save_json"]
