"""Alternate Preference Optimization, AltPO (Mekala, Dorna, Dubey, Lalwani, Koleczek, Rungta, Hasan & Lobo,
COLING 2025, "Alternate Preference Optimization for Unlearning Factual Knowledge in Large Language Models")."""

from __future__ import annotations

from typing import Any

import torch

from erasus_ray.data import Batch
from erasus_ray.strategies._preference import PREFERENCE_NEEDS, PREFERENCE_RESPONSES, build_pairs, chosen_batch, retain_nll
from erasus_ray.strategies.base import STRATEGIES, Strategy, UnlearnContext, weighted_mean
from erasus_ray.strategies.dpo import dpo_loss


@STRATEGIES.register("altpo")
class AltPO(Strategy):
    """Negative feedback on the forget answer plus positive feedback on ``k`` in-domain alternative answers.

    For each forget sample with alternatives ``a_1..a_k``:
    ``loss = (1/k) sum_j [ DPO(a_j > y) + lam * NLL(a_j | x) / |a_j| ] + alpha * NLL(retain)``,
    where ``DPO(a_j > y) = -log sigmoid(beta * ((log pi(a_j|x) - log pi_ref(a_j|x)) - (log pi(y|x) - log pi_ref(y|x))))``.
    The paper pairs a DPO-style preference of alternate answers over the forget answer with an explicit likelihood
    term on the alternates, so that the model keeps answering the question (plausibly, falsely) instead of
    collapsing or refusing.

    What we chose where the paper leaves freedom: the paper generates alternate answers with the LLM itself
    (prompted to write plausible alternatives). Offline we take them from the data: the answers of the ``k``
    retain samples whose prompts are most similar (prompt-token Jaccard, ties broken with ``(seed, id)``), which in
    a templated QA set (authors benchmark, TOFU) are other authors' answers to the same question template - plausible,
    in-domain and false for this author. Answers identical to the forget answer are skipped. For a classifier the
    alternatives are ``k`` distinct labels other than ``y`` drawn with ``(seed, id)``. The NLL term is per token
    (mean over the alternate's tokens).

    Args:
        num_alternatives: k, the number of alternate answers per forget sample (the paper uses several generated alternates).
        beta: inverse temperature of the preference term.
        lam: weight of the alternates' NLL (positive feedback).
        alpha: weight of the retain NLL.

    Defaults (lr 5e-4, 20 epochs, k 2, beta 0.1, lam 1, alpha 1, Adam). On the authors benchmark (``variant="ci"``, forget10 = 4 authors x 5 questions, seed 0, full forget set, batch 32)
    the original model has forget / retain ROUGE-L recall 1.000 / 0.997 and Min-K% MIA AUC 0.996; the retrained gold model
    0.091 / 0.990 and 0.456. ``altpo``: forget ROUGE-L 0.101,
    retain 0.928, test 0.151 (gold 0.146), MIA AUC 0.842; at lr 1e-3 x 10 epochs: 0.101 / 0.845. Digits, class 3
    forgotten (gold: retain acc 0.998, test 0.869): forget acc 1.0 -> 0.0, retain 0.962, test 0.836 (the NLL on wrong
    labels costs some accuracy there).

    Cost: setup = ``2 + k`` forwards per coreset sample; per step one forward+backward on the forget batch, ``k`` on
    its alternate batches and one on a retain batch.

    Example:
        >>> ErasusUnlearner(model, strategy="altpo", selector=None, num_alternatives=2).fit(forget_data=f, retain_data=r)
    """

    #: log-likelihoods of chosen/rejected responses (sample_logprob); pairs need tokens or labels (checked in setup).
    requires = PREFERENCE_NEEDS
    requires_one_of = PREFERENCE_RESPONSES

    setup_scope = "forget"  # per-id tables from the original model

    needs_retain = True
    default_lr = 5e-4
    default_epochs = 20

    def __init__(self, num_alternatives: int = 2, beta: float = 0.1, lam: float = 1.0, alpha: float = 1.0) -> None:
        super().__init__()
        self.num_alternatives = int(self.check_range("num_alternatives", num_alternatives, 1, 64))
        self.beta = self.check_range("beta", beta, 0.0, 1e3, low_open=True)
        self.lam = self.check_range("lam", lam, 0.0, 1e6)
        self.alpha = self.check_range("alpha", alpha, 0.0, 1e6)

    def setup(self, ctx: UnlearnContext) -> None:
        ctx.state["pairs"] = build_pairs(ctx, "alternative", k=self.num_alternatives)

    def loss(self, ctx: UnlearnContext, forget: Batch | None, retain: Batch | None) -> tuple[torch.Tensor, dict[str, Any]]:
        pairs = ctx.state["pairs"]
        logp_r = ctx.forward(forget).sample_logprob()
        ref_r = pairs.ref(forget, None, logp_r)
        pref_terms, nll_terms = [], []
        for j in range(self.num_alternatives):
            out = ctx.forward(chosen_batch(ctx, forget, pairs.responses(forget, j)))
            logp_a = out.sample_logprob()
            pref_terms.append(dpo_loss(logp_a, pairs.ref(forget, j, logp_a), logp_r, ref_r, self.beta))
            nll_terms.append(out.sample_loss())
        pref = weighted_mean(torch.stack(pref_terms).mean(0), forget)
        nll = weighted_mean(torch.stack(nll_terms).mean(0), forget)
        retain_loss = retain_nll(ctx, retain, self.alpha, pref)
        total = pref + self.lam * nll + self.alpha * retain_loss
        return total, {"pref_loss": pref.detach(), "alt_nll": nll.detach(), "retain_loss": retain_loss.detach()}
