"""Safe Latent Diffusion (Schramowski, Brack, Deiseroth & Kersting, CVPR 2023, "Safe Latent Diffusion: Mitigating
Inappropriate Degeneration in Diffusion Models"): safety guidance at sampling time, no training."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from erasus_ray.runner_io import RunReport
from erasus_ray.strategies._diffusion import erased_classes, require_guidance
from erasus_ray.strategies.base import STRATEGIES, Strategy, UnlearnContext
from erasus_ray.tasks import Capability
from erasus_ray.tasks.denoising import _noise_prediction

if TYPE_CHECKING:
    from erasus_ray.runners.local import LocalRunner


def safety_guidance(eps_c: torch.Tensor, eps_s: torch.Tensor, eps_u: torch.Tensor, threshold: float,
                    momentum_scale: float) -> torch.Tensor:
    """SLD's safety term ``mu * (eps_S - eps_u) / (1 - s_m)``: ``mu`` is 1 on the elements where the request's noise
    estimate is within ``threshold`` of the unsafe concept's, ``|eps_c - eps_S| < lambda``, else 0 (see
    :class:`SafeLatents` for the two choices this makes); ``1 / (1 - s_m)`` is the fixed point of SLD's momentum."""
    close = ((eps_c - eps_s).abs() < threshold).to(eps_c.dtype)
    return close * (eps_s - eps_u) / (1.0 - momentum_scale)


class SafeLatentsModel(nn.Module):
    """The base model with SLD's safety guidance folded into its conditional noise prediction.

    ``forward(x_t, t, **condition(c))`` (class labels, or a prompt model's token ids) returns ``eps(x_t, c) - safety`` for every row whose class is not the null
    class (the unconditional prediction is the base model's). A classifier-free-guided sampler then computes
    ``eps_u + w (eps_c - eps_u - safety)``, SLD's guided estimate (its eq. 3), so every sampler and judged metric of the
    diffusion task sees the guidance without knowing of it. The safety term is applied below ``max_timestep`` (SLD's
    warm-up, expressed as a noise level since a forward call carries no step count). ``config`` is the base's, so
    samplers read its image size. The base weights are the original's, unchanged.

    Cost: every conditional row costs ``2 + len(concepts)`` forwards of the base (its own, the null class, each concept).
    """

    def __init__(self, base: nn.Module, concepts: list[int], null_class: int, threshold: float, momentum_scale: float,
                 max_timestep: int, condition: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.base = base
        self.config = base.config
        self.register_buffer("concepts", torch.tensor(concepts, dtype=torch.long))
        #: the task's ``condition_kwargs``: classes -> the model's conditioning keywords (class labels, or a prompt
        #: model's token ids), so the wrapper serves class- and prompt-conditioned models alike
        self.condition = condition
        self.null_class = int(null_class)
        self.threshold, self.momentum_scale, self.max_timestep = float(threshold), float(momentum_scale), int(max_timestep)

    def _eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return _noise_prediction(self.base(x_t, t, **cond))

    def _as(self, cls: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.condition(torch.full((len(like),), cls, dtype=torch.long, device=like.device))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int, **cond: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device).expand(len(x_t))
        eps = self._eps(x_t, t, cond)
        null = self._as(self.null_class, x_t)
        # a row is conditional where its conditioning differs from the null condition's (class or empty prompt)
        conditional = torch.stack([(v != null[k]).reshape(len(x_t), -1).any(1) for k, v in cond.items()]).any(0)
        rows = conditional & (t < self.max_timestep)
        if not bool(rows.any()):
            return eps
        x, tt = x_t[rows], t[rows]
        eps_c, eps_u = eps[rows], self._eps(x, tt, self._as(self.null_class, x))
        safety = sum(safety_guidance(eps_c, self._eps(x, tt, self._as(int(s), x)), eps_u, self.threshold,
                                     self.momentum_scale) for s in self.concepts.tolist())
        out = eps.clone()
        out[rows] = eps_c - safety
        return out


@STRATEGIES.register("safe_latents")
class SafeLatents(Strategy):
    """Return the model wrapped so that its guided sampling steers away from the erased classes (no training).

    SLD adds to classifier-free guidance a *safety guidance* term: ``eps = eps_u + s_g (eps_p - eps_u - gamma)`` with
    ``gamma = mu * (eps_S - eps_u)``, ``eps_S`` the estimate under the unsafe concept ``S``, ``mu`` switching the term
    on where the request's estimate ``eps_p`` is close to the concept's (closer than ``lambda``), a momentum that
    accumulates ``gamma`` over the steps, and a warm-up before which nothing is applied. Here ``S`` is each class of
    the forget set and ``p`` the requested class; :class:`SafeLatentsModel` folds ``gamma`` into the conditional
    prediction, so the task's own sampler (and the judged generation metrics) produce SLD's images.

    Why this method for the seed's "Safe Latents": SLD is the published method of that name; it edits the latent
    trajectory at sampling time and leaves every weight as it was (the returned model's ``base`` is the original).
    It fits the strategy interface as an inference-time strategy, like ``dexperts``: ``unlearn`` takes no runner
    steps and replaces ``ctx.model`` with the wrapper.

    Choices, where SLD's text-prompt setting does not carry over to a class request:
        - ``mu``: SLD's implementation scales by ``clamp(s_S (eps_p - eps_S), 0, 1)`` on the elements where
          ``eps_p - eps_S < lambda``; for a request *of the concept itself* (``p = S``) that scale is exactly 0 and
          SLD would do nothing, because it was built for prompts that merely drift towards the concept. ``mu`` is
          therefore 1 wherever ``|eps_p - eps_S| < lambda`` (the scale at SLD's cap, with the closeness test made
          two-sided): for ``p = S`` everywhere, for another class only on the few elements where it agrees with ``S``.
        - momentum: a forward call carries no trajectory, so the momentum enters at its fixed point: with SLD's
          update ``nu <- beta nu + (1 - beta)(gamma + s_m nu)`` the applied term tends to ``gamma / (1 - s_m)``.
          With SLD-Max's ``s_m = 0.5`` that is ``2 gamma``: a request of ``S`` becomes ``eps_u - s_g (eps_S - eps_u)``,
          negative guidance away from the class.
        - warm-up: as a noise level, ``warmup`` = the fraction of the schedule's highest timesteps left unguided
          (SLD-Max: no warm-up, the default; SLD-Medium skips the first 10 of 50 steps, ``warmup=0.2``).

    Args:
        threshold: ``lambda`` (SLD-Medium: 0.01).
        momentum_scale: ``s_m`` in ``[0, 1)`` (SLD-Max: 0.5).
        warmup: fraction of the highest-noise timesteps without safety guidance.

    Defaults measured on digits_diffusion: see ``benchmarks/diffusion/RESULTS.md`` (section "New methods") and the
    slow effect test.

    Cost: no training. Sampling costs ``2 + len(concepts)`` base forwards per conditional row instead of 1, i.e.
    about twice as much with one erased class; the wrapper holds no extra weights.

    Example:
        >>> res = ErasusUnlearner(unet, strategy="safe_latents", selector=None).fit(forget_data=threes)
        >>> task.sample(res.model, torch.full((8,), 3))   # guided away from 3
    """

    requires = frozenset({Capability.LABELS, Capability.GUIDANCE})

    driver_only_reason = ("it trains nothing: the guided wrapper is built in the calling process and applies the safety "
                          "guidance at sampling time")
    closed_loop_reason = "it takes no runner steps: the guided model exists at once and is verified once"

    def __init__(self, threshold: float = 0.01, momentum_scale: float = 0.5, warmup: float = 0.0) -> None:
        super().__init__()
        self.threshold = self.check_range("threshold", threshold, 0.0, 1e6, low_open=True)
        self.momentum_scale = self.check_range("momentum_scale", momentum_scale, 0.0, 0.99)
        self.warmup = self.check_range("warmup", warmup, 0.0, 1.0)

    def unlearn(self, ctx: UnlearnContext, runner: "LocalRunner") -> RunReport:
        require_guidance(ctx, self.name)
        task = ctx.task
        max_t = int(round((1.0 - self.warmup) * task.num_timesteps))  # type: ignore[attr-defined]
        ctx.model = SafeLatentsModel(ctx.model.eval(), erased_classes(ctx), task.null_class, self.threshold,  # type: ignore[attr-defined]
                                     self.momentum_scale, max_t, task.condition_kwargs).eval()  # type: ignore[attr-defined]
        return RunReport(steps=0, info={"concepts": ctx.model.concepts.tolist(), "max_timestep": max_t})
