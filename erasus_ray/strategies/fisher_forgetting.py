"""Fisher forgetting (Golatkar, Achille & Soatto, CVPR 2020, "Eternal Sunshine of the Spotless Net: Selective
Forgetting in Deep Networks")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from erasus_ray.data import IdDataset, make_loader
from erasus_ray.errors import InvalidConfigError
from erasus_ray.selectors.gradient_norm import trainable_params
from erasus_ray.strategies.base import STRATEGIES, Strategy, UnlearnContext
from erasus_ray.tasks import Capability, Task

if TYPE_CHECKING:
    from erasus_ray.runners.local import LocalRunner, RunReport


def diagonal_fisher(
    model: nn.Module,
    task: Task,
    data: IdDataset,
    *,
    batch_size: int = 64,
    chunk_size: int | None = None,
    weights: Mapping[int, float] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Diagonal empirical Fisher ``F = E_i[(d l_i / d theta)^2]`` over ``data``, one entry per trainable parameter.

    Per-sample gradients come from ``torch.func`` (``vmap(grad)``, ``chunk_size`` samples at a time), so there is no
    Python loop over samples. ``weights`` (id -> weight, e.g. coreset weights) turns the mean into a weighted mean.
    The model is evaluated in eval mode (no dropout). Returns ``(fisher by parameter name, batches processed)``.

    Cost: one forward+backward per sample; memory ``chunk_size x |params|`` for the per-sample gradients.
    """
    params = trainable_params(model)
    buffers = dict(model.named_buffers())
    device = next(iter(params.values())).device

    def loss_one(p: dict[str, torch.Tensor], sample: Any) -> torch.Tensor:
        one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, sample)
        args, kwargs = task.functional_inputs(one)
        raw = functional_call(model, (p, buffers), args, kwargs)
        return task.dense_sample_loss(raw, one).sum()

    per_sample_grad = vmap(grad(loss_one), in_dims=(None, 0), chunk_size=chunk_size)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    total_weight, batches = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with task.functional_context(model):
            for batch in make_loader(data, task.collate, batch_size=batch_size, weights=weights):
                batch = batch.to(device)
                grads = per_sample_grad(params, batch.data)
                w = batch.weights if batch.weights is not None else torch.ones(len(batch), device=device)
                w = w.to(device, torch.float32)
                for n, g in grads.items():
                    sq = g.float().pow(2)
                    fisher[n] += torch.einsum("b,b...->...", w, sq)
                total_weight += float(w.sum())
                batches += 1
    finally:
        model.train(was_training)
    return {n: f / max(total_weight, 1e-12) for n, f in fisher.items()}, batches


def retain_subset(ctx: UnlearnContext, max_retain: int | None) -> IdDataset:
    """The retain set, or a seeded random subset of ``max_retain`` of its samples (for the Fisher estimate)."""
    retain = ctx.retain
    if retain is None or len(retain) == 0:
        raise InvalidConfigError("this strategy needs retain data")
    if max_retain is None or len(retain) <= max_retain:
        return retain
    g = torch.Generator().manual_seed(ctx.seed)
    rows = torch.randperm(len(retain), generator=g)[:max_retain].sort().values.numpy()
    return retain.subset(retain.ids[rows])


def fisher_noise_variance(fisher: torch.Tensor, alpha: float, max_var: float, eps: float = 1e-8) -> torch.Tensor:
    """Per-parameter noise variance ``alpha * min(1 / (F + eps), max_var)``."""
    return alpha * (1.0 / (fisher + eps)).clamp(max=max_var)


@STRATEGIES.register("fisher_forgetting")
class FisherForgetting(Strategy):
    """Add Gaussian noise shaped by the inverse Fisher of the retain set: ``theta += sqrt(var) * n``, ``n ~ N(0, I)``.

    ``var = alpha * min(1 / (F_retain + eps), max_var)`` per parameter, with ``F_retain`` the diagonal empirical
    Fisher of the retain set (:func:`diagonal_fisher`). Parameters the retain set relies on (large Fisher) get little
    noise; those it does not (information only about the forget set) are scrubbed by large noise. This is the
    paper's Fisher forgetting in the form of its reference code (noise variance ``alpha / F`` with the inverse
    clamped); that code's class-specific tweaks (zeroing the forgotten class's output row, per-row variance
    averaging, x10 for the last layer) are model- and scenario-specific and left out, and the Fisher is the
    empirical one (squared gradients at the true labels), which works for any task adapter. The noise is drawn
    from a generator seeded with the run's seed.

    The step is training-free, so the runner's ``lr`` / ``epochs`` do not apply; the report counts the Fisher
    batches as steps.

    Args:
        alpha: noise scale (the reference code uses values around 1e-6).
        max_var: clamp of the inverse Fisher (paper code: 1e3), which bounds the noise where ``F ~ 0``.
        eps: added to ``F`` before inverting.
        max_retain: estimate the Fisher on at most this many retain samples (a seeded random subset); None: all.
        fisher_batch_size / chunk_size: per-sample-gradient batching (``chunk_size`` bounds ``vmap`` memory).

    Measured on digits (class 3, full retain set of 1290; defaults alpha 1e-6, max_var 1e4): the noise is *not*
    selective for a forgotten class. Seed 0: forget accuracy 1.00 -> 0.42 (forget loss 0.04 -> 1.46), retain
    accuracy 0.998 -> 0.982 (gold 0.998), other-class test accuracy 0.975 -> 0.957 (gold 0.969). Seeds 1/2/3:
    forget accuracy stays 0.97/0.96/0.95 while retain accuracy drops to 0.959/0.862/0.980. Every (alpha, max_var)
    tried (alpha 1e-8..3e-5, max_var 1e3..1e7, also with the true Fisher) costs retain accuracy before it removes
    class 3; the reference code's class forgetting comes from its class-specific step (zeroing that output row),
    not from the noise. Treat it as the weak baseline it is in the SCRUB and SalUn comparisons.

    Cost: one forward+backward per retain sample (vectorised), then one noise draw per parameter.

    Example:
        >>> ErasusUnlearner(model, strategy="fisher_forgetting", selector=None, alpha=1e-6).fit(forget_data=f, retain_data=r)
    """

    #: a diagonal Fisher from per-sample gradients under vmap (a sample's loss evaluated alone).
    requires = frozenset({Capability.INDEPENDENT})

    strength = ("alpha", 3.0)  # closed loop: more noise forgets more

    needs_retain = True
    driver_only_reason = (
        "the diagonal retain Fisher and the noise draw are computed in the calling process; there are no "
        "optimizer steps to distribute"
    )
    uses_forget = False

    def __init__(
        self,
        alpha: float = 1e-6,
        max_var: float = 1e4,
        eps: float = 1e-8,
        max_retain: int | None = None,
        fisher_batch_size: int = 64,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.alpha = self.check_range("alpha", alpha, 0.0, 1e6, low_open=True)
        self.max_var = self.check_range("max_var", max_var, 0.0, 1e12, low_open=True)
        self.eps = self.check_range("eps", eps, 0.0, 1.0, low_open=True)
        if max_retain is not None and int(max_retain) < 1:
            raise InvalidConfigError(f"{self.name}: max_retain must be >= 1, got {max_retain!r}")
        self.max_retain = None if max_retain is None else int(max_retain)
        self.fisher_batch_size = int(self.check_range("fisher_batch_size", fisher_batch_size, 1, 1e9))
        self.chunk_size = None if chunk_size is None else int(self.check_range("chunk_size", chunk_size, 1, 1e9))

    @torch.no_grad()
    def add_noise(self, model: nn.Module, fisher: dict[str, torch.Tensor], seed: int) -> None:
        """``theta += sqrt(alpha * min(1/(F+eps), max_var)) * N(0, I)``, drawn in parameter order from ``seed``."""
        named = dict(model.named_parameters())
        device = next(iter(named.values())).device
        gen = torch.Generator(device=device).manual_seed(seed)
        for name, f in fisher.items():
            p = named[name]
            std = fisher_noise_variance(f, self.alpha, self.max_var, self.eps).sqrt()
            noise = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32)
            p.add_((std * noise).to(p.dtype))

    def unlearn(self, ctx: UnlearnContext, runner: "LocalRunner") -> "RunReport":
        from erasus_ray.runners.local import RunReport

        retain = retain_subset(ctx, self.max_retain)
        fisher, batches = diagonal_fisher(
            ctx.model, ctx.task, retain, batch_size=self.fisher_batch_size, chunk_size=self.chunk_size
        )
        self.add_noise(ctx.model, fisher, ctx.seed)
        ctx.model.eval()
        return RunReport(steps=batches, epochs=1, retain_samples=len(retain))
