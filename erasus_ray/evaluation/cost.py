"""The cost of an unlearning run as a metric: ``seconds``, its wall time.

An evaluation sees a model, never the run that made it, so the caller measures the run (:func:`timed`, or its own
clock) and passes it as the evaluation option ``unlearn_seconds``; ``seconds`` reports it beside the quality metrics,
so a suite result or a protocol report (mean +- std over unlearning seeds) carries cost and quality together.
Lower is cheaper. Cost: nothing.

Example::

    model, secs = timed(lambda: unlearner.fit(forget_data=f, retain_data=r).model)
    MetricSuite(["forget_acc", "seconds"]).run(model, f, r, unlearn_seconds=secs)
"""

from __future__ import annotations

import math
import time
from typing import Callable, TypeVar

from erasus_ray.evaluation.metrics import EvalContext, register_metric

T = TypeVar("T")


def timed(run: Callable[[], T], clock: Callable[[], float] = time.perf_counter) -> tuple[T, float]:
    """``(run(), seconds it took)`` by ``clock`` (monotonic wall time by default; a fake clock in tests)."""
    start = clock()
    result = run()
    return result, clock() - start


@register_metric("seconds", requires=(), splits=("forget",), display=True, options=("unlearn_seconds",))
def seconds(ctx: EvalContext) -> float:
    """Wall time of the unlearning run, in seconds (the ``unlearn_seconds`` option; NaN if negative/non-finite)."""
    value = float(ctx.options.unlearn_seconds)
    return value if math.isfinite(value) and value >= 0 else math.nan


__all__ = ["timed"]
