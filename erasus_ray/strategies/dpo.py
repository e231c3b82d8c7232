"""Direct Preference Optimization used for unlearning (Rafailov, Sharma, Mitchell, Ermon, Manning & Finn,
NeurIPS 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model"; as an unlearning
baseline in TOFU, Maini et al. 2024, and NPO, Zhang et al. COLM 2024)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from erasus_ray.data import Batch
from erasus_ray.strategies._preference import PREFERENCE_NEEDS, PREFERENCE_RESPONSES, build_pairs, chosen_batch, retain_nll
from erasus_ray.strategies.base import STRATEGIES, Strategy, UnlearnContext, weighted_mean


def dpo_loss(
    logp_chosen: torch.Tensor, ref_chosen: torch.Tensor, logp_rejected: torch.Tensor, ref_rejected: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-sample DPO loss ``-log sigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r)))``.

    Log-likelihoods are of whole responses (summed over answer tokens; ``log p(y|x)`` for a classifier). Minimising
    it raises the chosen response's likelihood ratio against the reference and lowers the rejected one's.
    """
    return -F.logsigmoid(beta * ((logp_chosen - ref_chosen) - (logp_rejected - ref_rejected)))


@STRATEGIES.register("dpo")
class DPO(Strategy):
    """DPO with the forget answer as the rejected response and an in-domain alternative answer as the chosen one,
    plus ``alpha`` times the retain NLL.

    Preference pairs are built once in :meth:`setup` and keyed by sample id (see
    :mod:`erasus_ray.strategies._preference`): for a causal LM the chosen response is the answer of the retain
    sample whose prompt is most similar (prompt-token Jaccard; the same question template about another entity in a
    templated QA set), tokenised as ``prompt + answer`` with only the answer supervised; for a classifier it is a
    label other than ``y`` drawn with ``(seed, id)``. The reference policy is the model before unlearning; its
    log-likelihoods of both responses are cached by id, so no second model is kept. ``idk_dpo`` is the same
    objective with a refusal as the chosen response.

    Args:
        beta: inverse temperature of the implicit reward (the NPO paper's DPO baseline uses 0.1).
        alpha: weight of the retain NLL (0 = preference term only; retain data is still required).

    Defaults (lr 1e-3, 10 epochs, beta 0.1, alpha 1, Adam). On the authors benchmark (``variant="ci"``, forget10 = 4 authors x 5 questions, seed 0, full forget set, batch 32)
    the original model has forget / retain ROUGE-L recall 1.000 / 0.997 and Min-K% MIA AUC 0.996; the retrained gold model
    0.091 / 0.990 and 0.456. ``dpo`` with its defaults: forget ROUGE-L 0.091,
    retain 0.967, MIA AUC 0.817 (beta 0.5 pushes the forget answer too little: the margin saturates on the chosen
    side). Digits, class 3 forgotten (gold: retain acc 0.998, test 0.869): forget acc 1.0 -> 0.0, retain 0.993, test 0.867.

    Cost: setup = two forwards per coreset sample (rejected and chosen response; two floats kept per sample);
    per step one forward+backward on the forget batch, on its chosen batch and on a retain batch.

    Example:
        >>> ErasusUnlearner(model, strategy="dpo", selector=None, beta=0.1).fit(forget_data=f, retain_data=r)
    """

    #: log-likelihoods of chosen/rejected responses (sample_logprob); pairs need tokens or labels (checked in setup).
    requires = PREFERENCE_NEEDS
    requires_one_of = PREFERENCE_RESPONSES

    setup_scope = "forget"  # per-id tables from the original model

    needs_retain = True
    default_lr = 1e-3
    default_epochs = 10
    #: where the chosen response comes from (see erasus_ray.strategies._preference)
    chosen_source: ClassVar[str] = "alternative"

    def __init__(self, beta: float = 0.1, alpha: float = 1.0) -> None:
        super().__init__()
        self.beta = self.check_range("beta", beta, 0.0, 1e3, low_open=True)
        self.alpha = self.check_range("alpha", alpha, 0.0, 1e6)

    def _pair_options(self) -> dict[str, Any]:
        return {}

    def setup(self, ctx: UnlearnContext) -> None:
        ctx.state["pairs"] = build_pairs(ctx, self.chosen_source, k=1, **self._pair_options())

    def loss(self, ctx: UnlearnContext, forget: Batch | None, retain: Batch | None) -> tuple[torch.Tensor, dict[str, Any]]:
        pairs = ctx.state["pairs"]
        logp_r = ctx.forward(forget).sample_logprob()
        logp_c = ctx.forward(chosen_batch(ctx, forget, pairs.responses(forget, 0))).sample_logprob()
        per_sample = dpo_loss(logp_c, pairs.ref(forget, 0, logp_c), logp_r, pairs.ref(forget, None, logp_r), self.beta)
        forget_loss = weighted_mean(per_sample, forget)
        retain_loss = retain_nll(ctx, retain, self.alpha, forget_loss)
        total = forget_loss + self.alpha * retain_loss
        return total, {"dpo_loss": forget_loss.detach(), "retain_loss": retain_loss.detach(),
                       "chosen_logp": logp_c.mean().detach(), "rejected_logp": logp_r.mean().detach()}
