"""Metrics register themselves; a task family's suite is a list of their names.

Each metric is a small function ``fn(ctx) -> float`` registered with :func:`register_metric` (or, for one metric per
split, :func:`register_split_metric`) under a name, with what it needs from the task (``requires``, parsed with
:func:`~erasus_ray.tasks.capability_set`), which splits it reads, the extra per-sample columns it reads from the shared
forward pass, whether its gap to the retrained model is part of Avg.Gap and whether tables show it.

The expensive work is shared, never repeated per metric: an :class:`EvalContext` lives for one evaluation and caches
one forward pass per split (:func:`~erasus_ray.evaluation.stats.set_stats`, with the union of the columns the selected
metrics declare) and anything else a metric memoises with :meth:`EvalContext.cached` (greedy generation for ROUGE).

A task's default suite is its ``default_metrics`` (a tuple of names on the task class), minus the metrics whose
requirements it lacks; a task that declares none gets every registered metric it can run, so a loss-only task
gets the per-split losses and the loss-threshold MIA without any list. Example::

    @register_metric("forget_loss_std", requires={"loss"}, splits=("forget",))
    def forget_loss_std(ctx):
        return float(ctx.stats("forget").loss.std())

    evaluate(model, forget=f, retain=r, test=t, metrics=["forget_acc", "forget_loss_std"])
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

from torch import nn

from erasus_ray.data import IdDataset
from erasus_ray.errors import InvalidConfigError, InvalidDataError, UnknownNameError
from erasus_ray.evaluation.stats import Column, SetStats, set_stats
from erasus_ray.tasks import TASKS, Capability, Task, capability_set, require

#: The splits an evaluation measures: the forget set, the retain set and held-out test data.
SPLITS = ("forget", "retain", "test")


@dataclass(frozen=True)
class MetricOptions:
    """Settings of one evaluation, read by the metrics that use them.

    Attributes:
        seed: seed of randomised metrics (the SVC membership attack's shadow split).
        batch_size: batch size of the forward passes (None: the task's ``eval_batch_size``).
        max_new_tokens: generation length for ROUGE (None: the longest reference answer over the splits, + 2).
        mink_k: fraction of lowest token log-probs a Min-K% Prob score averages, in (0, 1].
        eos_token_id: end-of-sequence token for generation and references (None: the model's config).
        dp_delta: the delta of the empirical (epsilon, delta) lower bound (``mia_epsilon``,
            :mod:`erasus_ray.evaluation.privacy`).
        lira: the shadow models of the LiRA attack (``mia_lira_auc``), a
            :class:`~erasus_ray.evaluation.lira.LiraShadows`; trained once and reused by every evaluation given it.
        utility_sets: TOFU's model utility also averages these QA sets (name -> id dataset of
            :func:`~erasus_ray.evaluation.protocols.tofu_data.tofu_dataset`-style items), TOFU's "Real Authors" /
            "World Facts" (``model_utility``; None: the retain set only).
        unlearn_seconds: wall time of the unlearning run that produced the model (``seconds``); the caller measures
            it (an evaluation sees the model, never the run).
    """

    seed: int = 0
    batch_size: int | None = None
    max_new_tokens: int | None = None
    mink_k: float = 0.2
    eos_token_id: int | None = None
    dp_delta: float = 1e-5
    lira: Any = None
    utility_sets: Any = None
    unlearn_seconds: float | None = None


class EvalContext:
    """One evaluation of one model: the splits, the options and a cache of what metrics share.

    ``stats(split)`` is one forward pass over the split (computed on first use, with every column the evaluation's
    metrics declare); ``cached(key, fn)`` memoises anything else (generation). Built by :func:`run_metrics`.
    """

    def __init__(self, model: nn.Module, task: Task, splits: Mapping[str, IdDataset], options: MetricOptions,
                 columns: Mapping[str, Column]) -> None:
        self.model, self.task, self.splits, self.options = model, task, dict(splits), options
        self.columns = dict(columns)
        self._cache: dict[Any, Any] = {}
        #: components a metric computed on its way (e.g. each utility set's parts of TOFU's model utility), by name:
        #: reported beside the metrics by :class:`~erasus_ray.evaluation.suite.MetricSuite` (``SuiteResult.parts``)
        self.parts: dict[str, float] = {}

    @property
    def seed(self) -> int:
        return self.options.seed

    @property
    def batch_size(self) -> int:
        return self.options.batch_size or self.task.eval_batch_size

    def stats(self, split: str) -> SetStats:
        """Per-sample statistics of ``split`` from one forward pass, shared by every metric of this evaluation."""
        return self.cached(("stats", split), lambda: set_stats(
            self.model, self.task, self.splits[split], self.batch_size, self.columns))

    def cached(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per evaluation and ``key``; later calls return the same value."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


@dataclass(frozen=True)
class Metric:
    """A registered metric: ``compute(ctx) -> float`` and its declarations (see the module docstring)."""

    name: str
    compute: Callable[[EvalContext], float]
    requires: frozenset[Capability]
    splits: tuple[str, ...]
    columns: tuple[str, ...] = ()
    gap: bool = False
    display: bool = False
    doc: str = ""
    #: fields every item of its splits must carry beyond what the task reads (TOFU's paraphrased / perturbed answers);
    #: a split without them is refused with InvalidDataError naming them
    item_fields: tuple[str, ...] = ()
    #: :class:`MetricOptions` fields it reads that have no default (LiRA's shadow models, the unlearning run's wall
    #: time): never in a default suite; asked for by name without them, refused with InvalidConfigError naming them
    options: tuple[str, ...] = ()
    #: attributes of the task adapter it reads that an adapter may leave None (MUSE's word ROUGE reads
    #: ``tokenizer``); refused with InvalidConfigError naming them where they are None
    task_attrs: tuple[str, ...] = ()


class MetricRegistry:
    """Name -> :class:`Metric` (names are case-sensitive: ``forget_rougeL``); an unknown name fails with the close
    match and the known names, as the strategy registry does. Columns (extra per-sample values of the shared forward
    pass, e.g. Min-K% scores) register here too, as factories ``fn(options) -> Column``."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}
        self._columns: dict[str, Callable[[MetricOptions, nn.Module], Column]] = {}

    def add(self, metric: Metric) -> Metric:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name!r} is already registered")
        unknown = [c for c in metric.columns if c not in self._columns]
        if unknown:
            raise InvalidConfigError(f"metric {metric.name!r}: unknown column(s) {unknown}; known: {sorted(self._columns)}")
        bad = [s for s in metric.splits if s not in SPLITS]
        if bad or not metric.splits:
            raise InvalidConfigError(f"metric {metric.name!r}: splits must be some of {SPLITS}, got {metric.splits}")
        self._metrics[metric.name] = metric
        return metric

    def remove(self, name: str) -> None:
        """Unregister ``name`` (for tests that register a metric of their own)."""
        self._metrics.pop(name, None)

    def add_column(self, name: str, factory: Callable[[MetricOptions, nn.Module], Column]) -> None:
        self._columns[name] = factory

    def column(self, name: str, options: MetricOptions, model: nn.Module) -> Column:
        return self._columns[name](options, model)

    def get(self, name: str) -> Metric:
        if name in self._metrics:
            return self._metrics[name]
        close = difflib.get_close_matches(str(name), list(self._metrics), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(f"Unknown metric {name!r}.{hint} Known metrics: {', '.join(self.names())}")

    def names(self) -> list[str]:
        """Registered metric names, in registration order."""
        return list(self._metrics)

    def __contains__(self, name: object) -> bool:
        return name in self._metrics

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


#: The metric registry.
METRICS = MetricRegistry()


def register_metric(
    name: str,
    *,
    requires: Iterable[Capability | str] = (Capability.LOSS,),
    splits: Iterable[str],
    columns: Iterable[str] = (),
    gap: bool = False,
    display: bool = False,
    item_fields: Iterable[str] = (),
    options: Iterable[str] = (),
    task_attrs: Iterable[str] = (),
) -> Callable[[Callable[[EvalContext], float]], Callable[[EvalContext], float]]:
    """Decorator: register ``fn(ctx) -> float`` as metric ``name``.

    ``requires``: the task capabilities it needs (a misspelt one fails here); ``splits``: the splits it reads (it is
    left out of an evaluation that lacks one); ``columns``: extra per-sample columns it reads from ``ctx.stats``;
    ``gap``: its gap to the retrained model counts in Avg.Gap (unless the task's suite says otherwise); ``display``:
    tables show it (likewise); ``item_fields``: dataset fields it reads beyond the task's contract (a data
    requirement, refused with :class:`InvalidDataError` on items without them); ``options``: the
    :class:`MetricOptions` fields it needs set (refused with :class:`InvalidConfigError` while they are None);
    ``task_attrs``: task adapter attributes it needs set (likewise).
    """

    def decorator(fn: Callable[[EvalContext], float]) -> Callable[[EvalContext], float]:
        METRICS.add(Metric(name, fn, capability_set(requires, f"metric {name!r}"), tuple(splits), tuple(columns),
                           gap, display, (fn.__doc__ or "").strip(), tuple(item_fields), tuple(options),
                           tuple(task_attrs)))
        return fn

    return decorator


def register_split_metric(
    suffix: str,
    *,
    requires: Iterable[Capability | str] = (Capability.LOSS,),
    columns: Iterable[str] = (),
    gap: Iterable[str] = (),
    display: Iterable[str] = SPLITS,
    task_attrs: Iterable[str] = (),
) -> Callable[[Callable[[EvalContext, str], float]], Callable[[EvalContext, str], float]]:
    """Decorator: register ``fn(ctx, split) -> float`` once per split, as ``forget_<suffix>``, ``retain_<suffix>``
    and ``test_<suffix>``. ``gap`` / ``display``: the splits whose metric counts in Avg.Gap / is shown;
    ``task_attrs``: as :func:`register_metric`."""
    gap, display = set(gap), set(display)

    def decorator(fn: Callable[[EvalContext, str], float]) -> Callable[[EvalContext, str], float]:
        for split in SPLITS:
            register_metric(f"{split}_{suffix}", requires=requires, splits=(split,), columns=columns,
                            gap=split in gap, display=split in display, task_attrs=task_attrs)(_bind_split(fn, split))
        return fn

    return decorator


def _bind_split(fn: Callable[[EvalContext, str], float], split: str) -> Callable[[EvalContext], float]:
    def metric(ctx: EvalContext) -> float:
        return fn(ctx, split)

    metric.__doc__ = fn.__doc__
    return metric


def register_column(name: str) -> Callable[[Callable[[MetricOptions, nn.Module], Column]], Callable[[MetricOptions, nn.Module], Column]]:
    """Decorator: register ``factory(options, model) -> column`` where ``column(out)`` gives one value per sample of
    a batch's :class:`~erasus_ray.tasks.TaskOutput`; metrics that declare the column read it from ``ctx.stats``."""

    def decorator(factory: Callable[[MetricOptions, nn.Module], Column]) -> Callable[[MetricOptions, nn.Module], Column]:
        METRICS.add_column(name, factory)
        return factory

    return decorator


#: A task adapter or its class: suites are class attributes, so tables can be laid out without an instance.
TaskLike = Task | type[Task]


def _runnable(task: TaskLike, name: str) -> bool:
    # a task attribute left None (a contrastive adapter without a caption set) rules a metric out of the suite, as a
    # missing capability does; asked for by name, run_metrics refuses it naming the attribute
    metric = METRICS.get(name)
    return metric.requires <= task.capabilities and all(getattr(task, a, None) is not None for a in metric.task_attrs)


def metric_names_for(task: TaskLike) -> tuple[str, ...]:
    """The task's default suite: its ``default_metrics`` that it can run or, when it declares none, every registered
    metric whose requirements (capabilities, task attributes) it meets (in registration order) and that reads no extra item fields (a protocol's
    metric, e.g. TOFU's truth ratio, needs items that plain data lacks: asked for by name, never a default) nor
    options without a default (LiRA's shadow models). An
    unknown declared name is an UnknownNameError."""
    declared = task.default_metrics
    names = [n for n in METRICS.names() if not (METRICS.get(n).item_fields or METRICS.get(n).options)] \
        if declared is None else declared
    return tuple(n for n in names if _runnable(task, n))


def _by_task_or_flag(task: TaskLike, names: Iterable[str], declared: tuple[str, ...] | None, flag: str) -> tuple[str, ...]:
    # the task's list rules over the metrics of its suite; any other metric counts by its own flag
    names = list(names)
    chosen = [n for n in declared if n in names] if declared is not None else []
    governed = set(metric_names_for(task)) if declared is not None else set()
    return tuple(chosen + [n for n in names if n not in governed and getattr(METRICS.get(n), flag)])


def gap_names_for(task: TaskLike, names: Iterable[str] | None = None) -> tuple[str, ...]:
    """Which of ``names`` (default: the task's suite) make up Avg.Gap: the task's ``gap_metrics`` for the metrics of
    its suite, each other metric's own ``gap`` flag."""
    return _by_task_or_flag(task, metric_names_for(task) if names is None else names, task.gap_metrics, "gap")


def display_names_for(task: TaskLike, names: Iterable[str] | None = None) -> tuple[str, ...]:
    """Which of ``names`` (default: the task's suite) tables show, in column order: the task's ``display_metrics``
    for the metrics of its suite, each other metric's own ``display`` flag."""
    return _by_task_or_flag(task, metric_names_for(task) if names is None else names, task.display_metrics, "display")


def gap_metrics(metrics: dict[str, float], gold: dict[str, float], keys: tuple[str, ...]) -> dict[str, float]:
    """``gap_<k> = |metrics[k] - gold[k]|`` for each key present in both, and ``avg_gap`` their mean."""
    gaps = {
        f"gap_{k}": abs(metrics[k] - gold[k])
        for k in keys
        if k in metrics and k in gold and not (math.isnan(metrics[k]) or math.isnan(gold[k]))
    }
    gaps["avg_gap"] = sum(gaps.values()) / len(gaps) if gaps else float("nan")
    return gaps


def display_names_for_row(row: Mapping[str, Any]) -> tuple[str, ...]:
    """Table columns for a result row whose task is not at hand (a CSV read back): the display metrics of the first
    registered task whose every display metric has a value in ``row``; ``()`` if none fits."""
    for name in TASKS.names():
        keys = display_names_for(TASKS.get(name))
        if keys and all(row.get(k) is not None for k in keys):
            return keys
    return ()


def run_metrics(
    model: nn.Module,
    task: Task,
    splits: Mapping[str, IdDataset | None],
    names: Iterable[str] | None = None,
    **options: Any,
) -> dict[str, float]:
    """Compute the metrics ``names`` (default: :func:`metric_names_for` ``(task)``) of ``model`` on ``splits``.

    ``splits`` maps ``"forget"`` / ``"retain"`` / ``"test"`` to id datasets; a metric that reads a split not given
    (or None) is left out of the result. A named metric whose requirements the task lacks raises
    :class:`~erasus_ray.tasks.CapabilityError` naming the metric, the task and the capability, before any work.
    ``options`` are the fields of :class:`MetricOptions`. The model is evaluated in eval mode and left in the mode it
    came in. Returns ``{name: value}`` in the order of ``names``.

    Cost: one no-grad forward pass per split that some selected metric reads (shared by all of them, whatever their
    number), plus what a metric memoises (greedy generation per split for ROUGE), never a pass per metric.
    """
    return run_metrics_with_parts(model, task, splits, names, **options)[0]


def run_metrics_with_parts(
    model: nn.Module,
    task: Task,
    splits: Mapping[str, IdDataset | None],
    names: Iterable[str] | None = None,
    **options: Any,
) -> tuple[dict[str, float], dict[str, float]]:
    """:func:`run_metrics` and the parts its metrics computed on the way (:attr:`EvalContext.parts`): ``(values,
    parts)``."""
    opts = _options(options)
    names = metric_names_for(task) if names is None else tuple(names)
    metrics = [METRICS.get(n) for n in names]
    for m in metrics:
        require(task, m.requires, algorithm=f"metric {m.name!r}")
    given = {s: d for s, d in splits.items() if d is not None}
    unknown = set(given) - set(SPLITS)
    if unknown:
        raise InvalidConfigError(f"splits: unknown split(s) {sorted(unknown)}; known: {SPLITS}")
    metrics = [m for m in metrics if all(s in given for s in m.splits)]
    for m in metrics:  # the data first: plain items given to a protocol metric is the likelier mistake
        _check_item_fields(m, given)
        _check_options(m, opts, task)
    columns = {c: METRICS.column(c, opts, model) for m in metrics for c in m.columns}
    ctx = EvalContext(model, task, given, opts, columns)
    was_training = model.training
    model.eval()
    try:
        values = {m.name: m.compute(ctx) for m in metrics}
        return values, dict(ctx.parts)
    finally:
        model.train(was_training)


def _check_options(metric: Metric, options: MetricOptions, task: Task) -> None:
    """Refuse, before any forward pass, a metric whose required options or task attributes are not set."""
    unset = [f for f in metric.options if getattr(options, f) is None]
    if unset:
        raise InvalidConfigError(f"metric {metric.name!r} needs the evaluation option(s) {unset} (see MetricOptions)")
    absent = [a for a in metric.task_attrs if getattr(task, a, None) is None]
    if absent:
        hint = "e.g. CausalLMTask(tokenizer=...)" if absent == ["tokenizer"] else "an adapter that provides them"
        raise InvalidConfigError(f"metric {metric.name!r} needs the task adapter's {absent} (the {task.name!r} "
                                 f"adapter here has none; {hint})")


def _check_item_fields(metric: Metric, splits: Mapping[str, IdDataset]) -> None:
    """Refuse, before any forward pass, a split whose items lack a field the metric reads (``item_fields``)."""
    for split in metric.splits:
        data = splits[split]
        for row in range(len(data)):
            item = data[row][1]
            missing = [f for f in metric.item_fields if not isinstance(item, Mapping) or f not in item]
            if missing:
                raise InvalidDataError(f"metric {metric.name!r} reads item field(s) {missing}, which the items of split "
                                       f"{split!r} lack (sample id {int(data.ids[row])}); plain QA items have none")


def _options(options: Mapping[str, Any]) -> MetricOptions:
    try:
        return MetricOptions(**options)
    except TypeError:
        known = list(MetricOptions.__dataclass_fields__)
        raise InvalidConfigError(f"evaluation options: unknown {sorted(set(options) - set(known))}; known: {known}") from None


__all__ = [
    "METRICS", "SPLITS", "EvalContext", "Metric", "MetricOptions", "MetricRegistry", "display_names_for",
    "display_names_for_row",
    "gap_metrics", "gap_names_for", "metric_names_for", "register_column", "register_metric", "register_split_metric", "run_metrics_with_parts",
    "run_metrics",
]
