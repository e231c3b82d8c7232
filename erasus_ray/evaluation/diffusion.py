"""Judged generation metrics for class-conditional diffusion models (concept erasure of a class).

A judge classifier (``DiffusionTask(judge=...)``) labels generated images. The erased classes are the labels of the
forget split (a class-erasure benchmark's forget set is the class's images); the retained classes are the retain
split's other labels.

* ``erased_generation_rate``: fraction of the images generated for an erased class that the judge assigns to it
  (averaged over erased classes). The gold model, never trained on the class, sets the level to reach.
* ``retained_generation_acc``: the same fraction for the retained classes (fidelity that must not drop).
* ``retained_frechet``: Frechet distance (Heusel et al., NeurIPS 2017, the FID formula) between the judge's
  penultimate features of generated and of real retain images of the retained classes.
* The sample-level membership attack is ``mia_loss_auc`` on a task with fixed ``timesteps`` (see
  :mod:`erasus_ray.tasks.diffusion`).

Without a judge these metrics raise :class:`InvalidConfigError` naming ``judge``; a task without one does not list
them in its suite. Cost: ``task.eval_samples`` images per class, each ``task.sample_steps`` guided forward passes,
generated once per evaluation (shared by the three metrics) and judged in one pass.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from erasus_ray.errors import InvalidConfigError
from erasus_ray.evaluation.metrics import EvalContext, register_metric
from erasus_ray.evaluation.verification import GENERATION_BOUNDS, TARGETS, Criterion, Guard, Measurement, Target, Verdict, verification_tolerance
from erasus_ray.tasks import Capability, Task

_NEEDS = {Capability.GUIDANCE, Capability.LABELS}


def _judge(task: Task) -> nn.Module:
    judge = getattr(task, "judge", None)
    if judge is None:
        raise InvalidConfigError("judged generation metrics need a judge classifier: DiffusionTask(judge=...)")
    return judge


@torch.no_grad()
def generated(task: Task, model: nn.Module, cls: int, n: int | None = None, seed: int = 0) -> torch.Tensor:
    """``n`` (default ``task.eval_samples``) images of class ``cls`` sampled from ``model`` (seeded per class)."""
    n = n or task.eval_samples  # type: ignore[attr-defined]
    return task.sample(model, torch.full((n,), int(cls)), seed=int(seed) * 1009 + int(cls))  # type: ignore[attr-defined]


@torch.no_grad()
def generation_rate(task: Task, model: nn.Module, cls: int, n: int | None = None, seed: int = 0) -> float:
    """Fraction of ``n`` images generated for ``cls`` that the task's judge classifies as ``cls``."""
    images = generated(task, model, cls, n, seed)
    return float((_judge(task)(images).argmax(-1) == int(cls)).float().mean())


def _classes(ctx: EvalContext, split: str) -> list[int]:
    labels = ctx.stats(split).label
    return sorted(set(int(c) for c in labels)) if labels is not None else []


def erased_classes(ctx: EvalContext) -> list[int]:
    return _classes(ctx, "forget")


def retained_classes(ctx: EvalContext) -> list[int]:
    erased = set(erased_classes(ctx))
    return [c for c in _classes(ctx, "retain") if c not in erased]


def _samples(ctx: EvalContext, cls: int) -> torch.Tensor:
    return ctx.cached(("diffusion_samples", cls), lambda: generated(ctx.task, ctx.model, cls, seed=ctx.seed))


def _mean_rate(ctx: EvalContext, classes: Iterable[int]) -> float:
    judge = _judge(ctx.task)
    rates = [float((judge(_samples(ctx, c)).argmax(-1) == c).float().mean()) for c in classes]
    return float(np.mean(rates)) if rates else float("nan")


@register_metric("erased_generation_rate", requires=_NEEDS, splits=("forget",), gap=True, display=True)
def erased_generation_rate(ctx: EvalContext) -> float:
    """Fraction of images generated for the erased class(es) that the judge assigns to them."""
    _judge(ctx.task)
    return _mean_rate(ctx, erased_classes(ctx))


@register_metric("retained_generation_acc", requires=_NEEDS, splits=("forget", "retain"), gap=True, display=True)
def retained_generation_acc(ctx: EvalContext) -> float:
    """Fraction of images generated for the retained classes that the judge assigns to the requested class."""
    _judge(ctx.task)
    return _mean_rate(ctx, retained_classes(ctx))


def judge_features(judge: nn.Module, images: torch.Tensor) -> np.ndarray:
    """The input of the judge's last ``nn.Linear`` (its penultimate features) for ``images``, as float64."""
    last = [m for m in judge.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise InvalidConfigError("judge: the Frechet distance reads the input of the judge's last nn.Linear; it has none")
    captured: list[torch.Tensor] = []
    handle = last[-1].register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
    try:
        with torch.no_grad():
            judge(images)
    finally:
        handle.remove()
    return captured[-1].flatten(1).double().cpu().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` between two feature sets (rows = samples)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        # post-ReLU features have dead units: singular covariances are expected, and sqrtm still converges
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(s_a @ s_b)
        if not np.isfinite(root).all():  # as pytorch-fid: a tiny ridge where the product has no square root
            ridge = np.eye(len(s_a)) * 1e-6
            root = linalg.sqrtm((s_a + ridge) @ (s_b + ridge))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * np.real(root)))


def _real_images(ctx: EvalContext, classes: set[int]) -> torch.Tensor:
    data = ctx.splits["retain"]
    items = (data[row][1] for row in range(len(data)))
    return torch.stack([torch.as_tensor(x) for x, y in items if int(y) in classes])


@register_metric("retained_frechet", requires=_NEEDS, splits=("forget", "retain"), gap=True, display=True)
def retained_frechet(ctx: EvalContext) -> float:
    """Frechet distance, in the judge's feature space, between generated and real images of the retained classes."""
    judge, classes = _judge(ctx.task), retained_classes(ctx)
    if not classes:
        return float("nan")
    fake = torch.cat([_samples(ctx, c) for c in classes])
    return frechet_distance(judge_features(judge, fake), judge_features(judge, _real_images(ctx, set(classes))))


# --- the closed loop's target ---------------------------------------------------------------------------------------



@TARGETS.register("generation")
class GenerationTarget(Target):
    """A class erased from a class-conditional diffusion model, judged on what it generates: the rate at which the
    task's judge assigns images generated for the erased class(es) to them is at most the gold model's rate plus the
    95% sampling tolerance of a rate on that many images (:func:`verification_tolerance`), or at most ``max_rate``;
    and, as a utility guard, the retained classes' judged accuracy stays within the guard's ``max_acc_drop`` (or
    above ``min_retained``) of the original model's, or of the gold model's where that is lower: a model retrained
    without the class is what erasure aims at, so the guard never asks for more than it keeps (digits_prompt_diffusion
    seed 1: original 0.951, gold 0.917 of the other classes; an original-only guard rejected every ESD-x step that
    erased). The loss-based guard (retain loss) still applies.

    Why a model-level measurement: erasing a concept means the model stops *generating* it, which per-sample
    denoising losses on the forget images do not tell (gradient ascent on them raises the loss long before the
    samples change, and keeps raising it until every class is noise). Per sample (for the adaptive coreset), while
    the rate is above its bound a forget image fails while its denoising loss is below the retain sample's median
    (the model still fits it like data it keeps), lowest loss first.

    Cost per measurement: ``task.eval_samples`` images per class of the model (erased and retained), each
    ``task.sample_steps`` guided DDIM steps, and one judge pass; the gold model's rate once.
    """

    requires = ("judge",)
    capabilities = frozenset({Capability.GUIDANCE, Capability.LABELS})

    @classmethod
    def from_request(cls, task: Task, classes: Iterable[int] | None, *, gold: Any = None,
                     bounds: Mapping[str, Any] | None = None) -> "GenerationTarget":
        """:func:`generation_target` (what :func:`~erasus_ray.evaluation.verification.resolve_target` calls)."""
        return generation_target(task, classes, gold=gold, bounds=bounds)

    def __init__(self, task: Task, classes: Iterable[int], *, gold: nn.Module | None = None, max_rate: float | None = None,
                 min_retained: float | None = None, floor: float = 0.05, seed: int = 0) -> None:
        _judge(task)
        self.task, self.classes = task, sorted(int(c) for c in classes)
        if not self.classes:
            raise InvalidConfigError("target 'generation' needs at least one erased class")
        for c in self.classes:
            task.check_class(c, "erased class")  # type: ignore[attr-defined]
        if gold is None and max_rate is None:
            raise InvalidConfigError("target 'generation' needs gold= (a model trained without the class) or a max "
                                     "erased_generation_rate bound")
        self.gold, self.max_rate, self.min_retained = gold, max_rate, min_retained
        self.floor, self.seed = float(floor), int(seed)
        self.retained = [c for c in range(task.num_classes) if c not in self.classes]  # type: ignore[attr-defined]
        self.gold_rate: float | None = None
        self.gold_retained: float | None = None
        self.bound = max_rate

    def measure_model(self, model: nn.Module) -> dict[str, float]:  # type: ignore[override]
        rate = lambda cs: float(np.mean([generation_rate(self.task, model, c, seed=self.seed) for c in cs]))  # noqa: E731
        out = {"erased_generation_rate": rate(self.classes)}
        if self.retained:
            out["retained_generation_acc"] = rate(self.retained)
        return out

    def prepare(self, original: Measurement, n_classes: int | None) -> None:
        super().prepare(original, n_classes)
        if self.gold is not None and self.gold_rate is None:
            gold = self.measure_model(self.gold)
            self.gold_rate, self.gold_retained = gold["erased_generation_rate"], gold.get("retained_generation_acc")
            n = self.task.eval_samples * len(self.classes)  # type: ignore[attr-defined]
            gold_bound = self.gold_rate + verification_tolerance(self.gold_rate, n, self.floor)
            self.bound = gold_bound if self.max_rate is None else min(self.max_rate, gold_bound)

    def verdict(self, m: Measurement) -> Verdict:
        note = (f"gold model: {self.gold_rate:.4f} + sampling tolerance" if self.gold_rate is not None else "given bound")
        return Verdict([Criterion("erased_generation_rate", m.model_metrics["erased_generation_rate"], high=self.bound,
                                  note=f"{note}; {self.task.eval_samples} images per class")])  # type: ignore[attr-defined]

    def guard_criteria(self, now: Measurement, original: Measurement, guard: Guard) -> list[Criterion]:
        key = "retained_generation_acc"
        if key not in now.model_metrics or key not in original.model_metrics:
            return []
        if self.min_retained is not None:
            return [Criterion(key, now.model_metrics[key], low=self.min_retained, note="given bound")]
        n = self.task.eval_samples * len(self.retained)  # type: ignore[attr-defined]
        refs = {"original": original.model_metrics[key], "gold": self.gold_retained}
        name, ref = min(((k, v) for k, v in refs.items() if v is not None), key=lambda kv: kv[1])
        low = ref - verification_tolerance(ref, n, guard.max_acc_drop)
        return [Criterion(key, now.model_metrics[key], low=low, note=f"{name} model: {ref:.4f}")]

    def failing_ids(self, m: Measurement) -> np.ndarray:
        f = m.forget
        if m.model_metrics["erased_generation_rate"] <= self.bound + 1e-12:
            return np.zeros(0, np.int64)
        low = f.loss < float(np.median(m.retain.loss)) if m.retain is not None else np.ones(len(f), bool)
        return f.ids[low][np.argsort(f.loss[low], kind="stable")]

    def describe(self) -> dict[str, Any]:
        return {"target": self.name, "classes": self.classes, "gold_rate": self.gold_rate, "bound": self.bound,
                "min_retained": self.min_retained}


def generation_target(task: Task, classes: Iterable[int] | None, *, gold: Any = None,
                      bounds: Mapping[str, Any] | None = None, seed: int = 0) -> GenerationTarget:
    """The :class:`GenerationTarget` that :func:`~erasus_ray.evaluation.verification.resolve_target` builds: the
    erased classes are the forget set's (whole) classes; ``bounds`` may set ``erased_generation_rate``'s ``max`` and
    ``retained_generation_acc``'s ``min``; ``gold`` must be a model (its metrics are not enough: the rate is judged
    on what it generates)."""
    if classes is None:
        raise InvalidConfigError("target 'generation' needs a forget set made of whole classes (labels no retain "
                                 "sample has) and retain data")
    if gold is not None and not isinstance(gold, nn.Module):
        raise InvalidConfigError("target 'generation' needs gold= as a model (the judged rate of what it generates), "
                                 f"got {type(gold).__name__}")
    bounds = dict(bounds or {})
    unknown = sorted(set(bounds) - set(GENERATION_BOUNDS))
    if unknown:
        raise InvalidConfigError(f"generation bounds cannot be mixed with {unknown}; known: {', '.join(GENERATION_BOUNDS)}")
    side = lambda key, end: _bound(bounds[key], key, end) if key in bounds else None  # noqa: E731
    return GenerationTarget(task, classes, gold=gold, max_rate=side("erased_generation_rate", "max"),
                            min_retained=side("retained_generation_acc", "min"), seed=seed)


def _bound(spec: Any, key: str, end: str) -> float:
    value = spec.get(end) if isinstance(spec, Mapping) else (spec[1] if end == "max" else spec[0])
    other = spec.get("min" if end == "max" else "max") if isinstance(spec, Mapping) else None
    if value is None or other is not None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidConfigError(f"target bound for {key!r} must set only a finite {end!r}, got {spec!r}")
    return float(value)


__all__ = ["GENERATION_BOUNDS", "GenerationTarget", "generation_target", "erased_classes", "frechet_distance", "generated", "generation_rate", "judge_features", "retained_classes"]
