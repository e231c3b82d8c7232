"""Negative Preference Optimization (Zhang, Lin, Bai & Mei, COLM 2024, "Negative Preference Optimization:
From Catastrophic Collapse to Effective Unlearning")."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from erasus_ray.data import Batch, make_loader
from erasus_ray.strategies.base import STRATEGIES, Strategy, UnlearnContext, weighted_mean
from erasus_ray.tasks import Capability


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-sample NPO loss ``-(2/beta) * log sigmoid(-beta * (log pi_theta(y|x) - log pi_ref(y|x)))``.

    ``logp`` / ``ref_logp`` are sequence log-likelihoods (summed over answer tokens; ``log p(y|x)`` for a
    classifier). It equals ``(2/beta) log(1 + (pi_theta/pi_ref)^beta)``: bounded below by 0, and its gradient
    vanishes as the forget likelihood falls, unlike gradient ascent.
    """
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp))


@STRATEGIES.register("npo")
class NPO(Strategy):
    """NPO on the forget coreset plus a retain NLL term (NPO+RT when ``alpha > 0``).

    The reference policy is the model before unlearning; its log-likelihoods on the coreset are computed once
    in :meth:`setup` and looked up by sample id, so no second model is kept in memory.

    Args:
        beta: inverse temperature (paper: 0.1 for TOFU).
        alpha: weight of the retain NLL term (0 = plain NPO).

    Cost: one extra forward per coreset sample (setup), then one forward+backward on forget and retain per step.
    """

    #: log-likelihood of each forget sample against the reference's (sample_logprob).
    requires = frozenset({Capability.LOGITS})

    setup_scope = "forget"  # per-id tables from the original model

    needs_retain = True
    default_lr = 1e-3
    default_epochs = 10

    def __init__(self, beta: float = 0.1, alpha: float = 1.0) -> None:
        super().__init__()
        self.beta = self.check_range("beta", beta, 0.0, 1e3, low_open=True)
        self.alpha = self.check_range("alpha", alpha, 0.0, 1e6)

    @torch.no_grad()
    def setup(self, ctx: UnlearnContext) -> None:
        was_training = ctx.model.training
        ctx.model.eval()
        ref: dict[int, float] = {}
        for batch in make_loader(ctx.forget, ctx.task.collate, batch_size=64):
            logp = ctx.forward(batch.to(ctx.device)).sample_logprob().float().cpu()
            ref.update(zip(batch.ids.tolist(), logp.tolist()))
        ctx.state["npo_ref_logp"] = ref
        ctx.model.train(was_training)

    def loss(self, ctx: UnlearnContext, forget: Batch | None, retain: Batch | None) -> tuple[torch.Tensor, dict[str, Any]]:
        ref_table = ctx.state["npo_ref_logp"]
        logp = ctx.forward(forget).sample_logprob()
        ref = torch.tensor([ref_table[int(i)] for i in forget.ids], device=logp.device, dtype=logp.dtype)
        forget_loss = weighted_mean(npo_loss(logp, ref, self.beta), forget)
        retain_loss = ctx.forward(retain).sample_loss().mean() if (retain is not None and self.alpha > 0) else logp.new_zeros(())
        total = forget_loss + self.alpha * retain_loss
        return total, {"npo_loss": forget_loss.detach(), "retain_loss": retain_loss.detach()}
