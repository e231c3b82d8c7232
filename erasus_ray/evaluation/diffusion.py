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

import warnings
from typing import Iterable

import numpy as np
import torch
from torch import nn

from erasus_ray.errors import InvalidConfigError
from erasus_ray.evaluation.metrics import EvalContext, register_metric
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


__all__ = ["erased_classes", "frechet_distance", "generated", "generation_rate", "judge_features", "retained_classes"]
