"""Contract checks for a strategy, a selector or a task adapter on one family of the matrix.

Each check either runs the algorithm and checks its effect, or expects a clean refusal: when the task lacks a
capability the algorithm declares in ``requires``, the algorithm must raise
:class:`~erasus_ray.tasks.CapabilityError` at construction, ``fit`` or ``select``. A :class:`CapabilityError` raised
*although* the declared requirements are met means an undeclared requirement (it surfaced mid-run, e.g. from
``TaskOutput.logits``): the check fails and names the capability to declare. Any other exception propagates.

Like scikit-learn's ``check_estimator``, a user's own algorithm or adapter can be checked the same way::

    from erasus_ray.testing import build_family, check_strategy
    check_strategy(MyStrategy, build_family("mlp"))
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.func import grad, vmap

from erasus_ray.data import Batch, IdDataset, make_loader
from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.selectors import SELECTORS, Selector
from erasus_ray.strategies import STRATEGIES, Strategy
from erasus_ray.tasks import Capability, CapabilityError, Task, missing
from erasus_ray.testing._family import Family
from erasus_ray.utils import model_hash

#: Runner steps a strategy check takes: a handful, enough for an effect on a tiny model.
STRATEGY_STEPS = 6


def declared_requires(algorithm: Any) -> frozenset[Capability]:
    """What a configured algorithm declares it needs: ``requirements()`` (its class ``requires``, refined by its
    configuration - a meta strategy's stages, a grad_diff cap)."""
    return frozenset(algorithm.requirements())


def declared_refusal(algorithm: Any, task: Task) -> list[str]:
    """Why ``algorithm`` declares it cannot run on ``task``: the capabilities of ``requirements()`` the task lacks,
    or the message of its ``check_task`` (which also checks ``requires_one_of`` and a meta strategy's stages); empty
    when its declarations are met. Runs no model."""
    lacking = [str(c) for c in missing(task, declared_requires(algorithm))]
    if lacking:
        return lacking
    try:
        algorithm.check_task(task)
    except CapabilityError as err:
        return [str(err)]
    return []


def _class_of(algorithm: Any, registry: Any, base: type) -> tuple[type, Any]:
    if isinstance(algorithm, base):
        return type(algorithm), algorithm
    if isinstance(algorithm, type):
        return algorithm, None
    return registry.get(algorithm), None


def _batch(task: Task, data: IdDataset, size: int | None = None) -> Batch:
    return next(iter(make_loader(data, task.collate, batch_size=size or len(data))))


@torch.no_grad()
def mean_loss(model: nn.Module, task: Task, data: IdDataset) -> float:
    """Mean per-sample objective of ``model`` over ``data`` (one batch)."""
    return float(task.forward(model, _batch(task, data).data).sample_loss().mean())


def _undeclared(what: str, needs: frozenset[Capability], err: CapabilityError) -> AssertionError:
    has = ", ".join(sorted(str(c) for c in needs))
    return AssertionError(f"{what} raised CapabilityError although its declared requirements ({has}) are met: "
                          f"declare the capability it uses in `requires` ({err})")


class _Refusal:
    """``with _Refusal(name, lacking):`` passes only if the block raises CapabilityError."""

    def __init__(self, what: str, lacking: list[str]) -> None:
        self.what, self.lacking = what, lacking

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: Any, tb: Any) -> bool:
        if kind is None:
            raise AssertionError(f"{self.what} ran although the task lacks {self.lacking}, which it "
                                 "declares it requires: it must refuse with CapabilityError")
        return issubclass(kind, CapabilityError)


def _prepare(algorithm: Any, registry: Any, base: type, family: Family, kwargs: dict[str, Any]) -> tuple[type, Any, str, frozenset[Capability], list[str]]:
    """``(class, configured instance, how to name it, its declared needs, what the family's task lacks of them)``."""
    cls, instance = _class_of(algorithm, registry, base)
    kind = "strategy" if base is Strategy else "selector"
    built = instance if instance is not None else cls(**kwargs)
    what = f"{kind} {getattr(cls, 'name', cls.__name__)!r} on family {family.name!r}"
    return cls, built, what, declared_requires(built), declared_refusal(built, family.task)


def _run_declared(what: str, needs: Any, lacking: list[str], run: Callable[[], Any]) -> tuple[dict[str, Any] | None, Any]:
    """``run()`` judged against the declarations: where the task lacks what the algorithm declares (``lacking``),
    it must raise CapabilityError (returned as the refusal record); otherwise its result is returned, and a
    CapabilityError fails as an undeclared requirement."""
    if lacking:
        with _Refusal(what, lacking):
            run()
        return {"outcome": "refused", "lacking": lacking}, None
    try:
        return None, run()
    except CapabilityError as err:
        raise _undeclared(what, needs, err) from err


def check_strategy(strategy: str | type[Strategy] | Strategy, family: Family, **hparams: Any) -> dict[str, Any]:
    """Run ``strategy`` for :data:`STRATEGY_STEPS` steps on ``family`` through ``ErasusUnlearner.fit`` (or expect its
    capability refusal). Checks: the forget loss rises (a strategy that reads the forget set) or the model changes (a
    retain-only baseline), and nothing is NaN. Returns ``{"outcome": "refused" | "ran", ...}``. Cost: the run."""
    from erasus_ray import ErasusUnlearner

    cls, built, what, needs, lacking = _prepare(strategy, STRATEGIES, Strategy, family, hparams)

    def fit() -> Any:
        unlearner = ErasusUnlearner(
            family.model, strategy=built, selector=None, fraction=None, task=family.task, seed=0, progress=False,
            max_steps=STRATEGY_STEPS, model_factory=family.model_factory, recipe=family.recipe,
            **family.unlearn_kwargs)
        return unlearner.fit(forget_data=family.forget, retain_data=family.retain)

    before = mean_loss(family.model, family.task, family.forget)
    refused, result = _run_declared(what, needs, lacking, fit)
    if refused:
        return refused
    after = mean_loss(result.model, family.task, family.forget)
    bad = [n for n, p in result.model.named_parameters() if not bool(torch.isfinite(p).all())]
    assert not bad and np.isfinite(after), f"{what}: non-finite parameters {bad[:5]} or forget loss {after}"
    if cls.uses_forget:
        assert after > before, f"{what} must raise the forget loss ({before:.4f} -> {after:.4f})"
    else:
        assert model_hash(result.model) != model_hash(family.model), f"{what} left the model unchanged"
    return {"outcome": "ran", "before": before, "after": after, "steps": result.report.steps}


def check_selector(selector: str | type[Selector] | Selector, family: Family, *, k: int = 4, **kwargs: Any) -> dict[str, Any]:
    """Select ``k`` forget ids with ``selector`` on ``family`` (or expect its capability refusal). Checks: ``k`` unique
    forget ids (all of them for ``full``), one weight each, and scores, when it scores, for every forget id, finite
    and not all equal. Returns ``{"outcome": "refused" | "ran", ...}``. Cost: one selection."""
    cls, built, what, needs, lacking = _prepare(selector, SELECTORS, Selector, family, kwargs)

    def select() -> Any:
        return built.select(family.model, family.forget, task=family.task, k=k, seed=0, retain=family.retain,
                            model_factory=family.model_factory)

    refused, core = _run_declared(what, needs, lacking, select)
    if refused:
        return refused
    forget_ids = set(int(i) for i in family.forget.ids)
    chosen = [int(i) for i in core.ids]
    assert len(chosen) == len(set(chosen)) == len(core.weights), f"{what}: ids must be unique, one weight each"
    assert set(chosen) <= forget_ids, f"{what}: ids {sorted(set(chosen) - forget_ids)} are not forget ids"
    assert len(chosen) in (k, len(forget_ids)), f"{what}: selected {len(chosen)} ids for a budget of {k}"
    assert np.isfinite(np.asarray(core.weights, dtype=float)).all(), f"{what}: non-finite weights"
    if core.scores is not None:
        scores = np.array([core.scores[i] for i in sorted(core.scores)], dtype=float)
        assert set(core.scores) == forget_ids, f"{what}: scores must cover exactly the forget ids"
        assert np.isfinite(scores).all(), f"{what}: non-finite scores"
        assert np.ptp(scores) > 0, f"{what}: every score is equal ({scores[0]}): nothing was measured"
    return {"outcome": "ran", "ids": chosen}


def check_task(task: Task, family: Family, *, size: int = 6, atol: float = 1e-5) -> dict[str, Any]:
    """Validate an adapter on ``family``'s model and data: the batched and the dense per-sample objectives agree,
    id-keyed randomness repeats, a sample's objective ignores its batch mates when ``independent`` is declared (and
    its per-sample gradients under ``vmap`` equal one-sample backward passes), and every declared capability works
    (logits, labels, features, head) while undeclared logits are refused. Returns what was checked."""
    model, data = family.model, family.forget.subset(family.forget.ids[:size])
    checked = ["loss"]
    batch = _batch(task, data)
    with torch.no_grad():
        args, kwargs = task.model_inputs(batch.data)
        raw = model(*args, **kwargs)
        out = task.read_output(raw, batch.data)
        dense = task.dense_sample_loss(raw, batch.data)
        again = task.forward(model, _batch(task, data).data).sample_loss()
    losses = out.sample_loss()
    assert losses.shape == (size,) and bool(torch.isfinite(losses).all()), f"{task!r}: per-sample loss {losses}"
    torch.testing.assert_close(dense, losses, atol=atol, rtol=1e-5, msg=f"{task!r}: dense_sample_loss != sample_loss")
    torch.testing.assert_close(again, losses, atol=atol, rtol=1e-5, msg=f"{task!r}: the objective does not repeat")
    if task.provides(Capability.INDEPENDENT):
        _check_independent(task, model, data, losses, atol)
        checked.append("independent")
    if task.provides(Capability.LOGITS):
        assert out.logits.shape[0] == out.targets.shape[0] == out.owner.shape[0], f"{task!r}: units disagree"
        checked.append("logits")
    else:
        try:
            out.logits
        except CapabilityError:
            pass
        else:
            raise AssertionError(f"{task!r} gives logits but does not declare 'logits'")
    checked += _check_optional(task, model, batch)
    return {"checked": checked}


def _check_independent(task: Task, model: nn.Module, data: IdDataset, losses: torch.Tensor, atol: float) -> None:
    """A sample's loss in a reversed batch and alone equals its loss in the batch; vmap gradients equal loops."""
    reversed_batch = _batch(task, data.subset(data.ids[::-1]))
    with torch.no_grad():
        flipped = task.forward(model, reversed_batch.data).sample_loss().flip(0)
        alone = task.forward(model, _batch(task, data.subset(data.ids[:1])).data).sample_loss()
    torch.testing.assert_close(flipped, losses, atol=atol, rtol=1e-4,
                               msg=f"{task!r} declares 'independent' but a sample's loss depends on its batch mates")
    torch.testing.assert_close(alone[0], losses[0], atol=atol, rtol=1e-4, msg=f"{task!r}: a sample alone scores differently")
    from erasus_ray.selectors._per_sample import FunctionalLoss

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    two = _batch(task, data.subset(data.ids[:2]))
    fn = FunctionalLoss(model, task, params)
    with task.functional_context(model):
        fast = vmap(grad(fn.one), in_dims=(None, 0))(params, two.data)
    for row in range(2):
        one = _batch(task, data.subset(data.ids[row:row + 1]))
        slow = grad(lambda p: fn.batch(p, one.data).sum())(params)
        for name in params:
            torch.testing.assert_close(fast[name][row], slow[name], atol=1e-5, rtol=1e-4,
                                       msg=f"{task!r}: per-sample gradient under vmap differs for {name}")


def _check_optional(task: Task, model: nn.Module, batch: Batch) -> list[str]:
    size, checked = len(batch), []
    if task.provides(Capability.LABELS):
        labels = task.labels_of(batch.data)
        assert labels is not None and labels.shape == (size,) and not labels.is_floating_point(), f"{task!r}: labels {labels}"
        checked.append("labels")
    if task.provides(Capability.FEATURES):
        with torch.no_grad():
            feats = task.features(model, batch.data)
        assert feats.ndim == 2 and feats.shape[0] == size and bool(torch.isfinite(feats).all()), f"{task!r}: features"
        checked.append("features")
    if task.provides(Capability.HEAD):
        head = task.head_module(model)
        assert any(head is m for m in model.modules()), f"{task!r}: head_module is not a module of the model"
        checked.append("head")
    return checked


def check_metric(metric: str, family: Family) -> dict[str, Any]:
    """Compute the registered ``metric`` of ``family``'s model on its forget / retain / test sets (or expect its
    capability refusal when the task lacks what the metric declares). Checks: a finite value (a rate in [0, 1] for
    names ending in ``_acc``, ``_auc``, ``_efficacy``, ``_rougeL``, ``_prob`` or ``_exact``); a CapabilityError while the
    declarations are met fails as an undeclared requirement. Returns ``{"outcome": "refused" | "ran", "value": ...}``.
    Cost: one forward pass per split the metric reads (plus generation for text metrics)."""
    from erasus_ray.evaluation import METRICS, run_metrics

    declared = METRICS.get(metric).requires
    what = f"metric {metric!r} on family {family.name!r}"
    lacking = [str(c) for c in missing(family.task, declared)]
    splits = {"forget": family.forget, "retain": family.retain, "test": family.test}

    def compute() -> dict[str, float]:
        return run_metrics(family.model, family.task, splits, [metric], max_new_tokens=4,
                           **_metric_options(METRICS.get(metric).options, family))

    absent = [f for f in METRICS.get(metric).item_fields if not _items_carry(family, f)]
    if not lacking and absent:  # a declared data requirement the family's items do not meet: a clear refusal
        try:
            compute()
        except InvalidDataError as err:
            assert all(f in str(err) for f in absent), f"{what}: the refusal must name {absent}: {err}"
            return {"outcome": "refused", "lacking": absent}
        raise AssertionError(f"{what} ran although the items lack its declared fields {absent}")
    no_attrs = [a for a in METRICS.get(metric).task_attrs if getattr(family.task, a, None) is None]
    if not lacking and no_attrs:  # the adapter lacks an attribute the metric declares (a tokenizer): a clear refusal
        with _RaisesNaming(InvalidConfigError, no_attrs, what):
            compute()
        return {"outcome": "refused", "lacking": no_attrs}

    refused, values = _run_declared(what, declared, lacking, compute)
    if refused:
        return refused
    value = values[metric]
    assert np.isfinite(value), f"{what}: non-finite value {value}"
    if metric.endswith(RATE_SUFFIXES):
        assert -1e-9 <= value <= 1 + 1e-9, f"{what}: a rate outside [0, 1]: {value}"
    return {"outcome": "ran", "value": float(value)}


class _RaisesNaming:
    """Context: the block must raise ``error`` whose message names every one of ``names``."""

    def __init__(self, error: type[Exception], names: list[str], what: str) -> None:
        self.error, self.names, self.what = error, names, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: Any, tb: Any) -> bool:
        if kind is None:
            raise AssertionError(f"{self.what} ran although it lacks its declared {self.names}")
        if not issubclass(kind, self.error):
            return False
        assert all(n in str(err) for n in self.names), f"{self.what}: the refusal must name {self.names}: {err}"
        return True


def _metric_options(names: tuple[str, ...], family: Family) -> dict[str, Any]:
    """Stand-in values of the evaluation options a metric needs set: a wall time, and two copies of the family's
    model as LiRA's OUT shadows (the contract is that it runs with them, not that it attacks well)."""
    import copy

    from erasus_ray.evaluation.lira import LiraShadows

    stand_in = {"unlearn_seconds": lambda: 1.0,
                "lira": lambda: LiraShadows(models=[family.model, copy.deepcopy(family.model)])}
    return {name: stand_in[name]() for name in names}


def _items_carry(family: Family, field: str) -> bool:
    """Whether the family's forget items (dicts) carry ``field``."""
    item = family.forget[0][1] if len(family.forget) else None
    return isinstance(item, dict) and field in item


#: metric name endings that denote a rate or probability in [0, 1]
RATE_SUFFIXES = ("_acc", "_auc", "_efficacy", "_rougeL", "_prob", "_exact")
