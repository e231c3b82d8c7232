"""FLAT: Forget data only Loss AdjustmenT (Wang, Wei, Liu, Pang, Liu, Shah, Bao, Liu & Wei, ICLR 2025, "LLM
Unlearning via Loss Adjustment with Only Forget Data")."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from erasus_ray.data import Batch
from erasus_ray.errors import InvalidConfigError
from erasus_ray.strategies._preference import DEFAULT_REFUSALS, PREFERENCE_NEEDS, PREFERENCE_RESPONSES, build_pairs, chosen_batch, sample_mean
from erasus_ray.strategies.base import STRATEGIES, Strategy, UnlearnContext, weighted_mean

# Variational f-divergence pieces (Nowozin, Cseke & Tomioka 2016, "f-GAN", Table 2): an output activation g* and the
# convex conjugate f*; D_f(P_e || P_f) >= E_e[g*(v)] - E_f[f*(g*(v))].
DIVERGENCES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "kl": (lambda v: v, lambda t: torch.exp(t - 1.0)),
    "pearson": (lambda v: v, lambda t: 0.25 * t * t + t),
    "tv": (lambda v: 0.5 * torch.tanh(v), lambda t: t),
    "js": (lambda v: math.log(2.0) - F.softplus(-v), lambda t: -torch.log(2.0 - torch.exp(t))),
}


def flat_loss(p_template: torch.Tensor, p_forget: torch.Tensor, divergence: str = "kl") -> torch.Tensor:
    """Per-sample FLAT loss ``-g*(P_e) + f*(g*(P_f))`` (the negated variational f-divergence estimate).

    ``p_template`` / ``p_forget``: the model's score of the template (refusal) and of the forget response; here the
    mean token probability of the response (TOFU's length-normalised probability). For KL, ``g*(v) = v`` and
    ``f*(t) = exp(t - 1)``: ``loss = -P_e + exp(P_f - 1)``. Minimising it raises ``P_e`` and lowers ``P_f``, with
    weights set by the divergence (the paper's "loss adjustment").
    """
    if divergence not in DIVERGENCES:
        raise InvalidConfigError(f"flat: unknown divergence {divergence!r}; known: {', '.join(DIVERGENCES)}")
    g, f_conj = DIVERGENCES[divergence]
    return -g(p_template) + f_conj(g(p_forget))


@STRATEGIES.register("flat")
class FLAT(Strategy):
    """Maximise an f-divergence between template (refusal) answers and forget answers, on forget data only.

    ``loss = mean_i [ -g*(P(e_i | x_i)) + f*(g*(P(y_i | x_i))) ]`` over the forget coreset, no retain term and no
    reference model: the paper's point is that the variational form of the f-divergence already weights learning the
    template against unlearning the forget answer, so retain data is not needed.

    What we chose: the KL variant by default (``divergence="kl"``; ``"js"``, ``"tv"`` and ``"pearson"`` are also
    available); ``P`` is the mean over the response's tokens of the token probability (for a classifier ``p(y|x)``);
    the template response is a refusal as in ``idk_dpo`` (one of ``refusals`` per sample, drawn with ``(seed, id)``,
    tokenised with ``tokenizer`` or the task's tokenizer; without one, the empty answer = eos). For a classifier the
    template is a seeded random other label.

    Args:
        divergence: ``"kl"`` | ``"js"`` | ``"tv"`` | ``"pearson"``.
        refusals, tokenizer, refusal_ids: the template answers (see ``idk_dpo``).

    Defaults (lr 3e-4, 10 epochs, KL, Adam). On the authors benchmark (``variant="ci"``, forget10 = 4 authors x 5 questions, seed 0, full forget set, batch 32)
    the original model has forget / retain ROUGE-L recall 1.000 / 0.997 and Min-K% MIA AUC 0.996; the retrained gold model
    0.091 / 0.990 and 0.456. ``flat`` (refusals tokenised with the benchmark's tokenizer):
    forget ROUGE-L 0.396, retain 0.886, test 0.106, MIA AUC 0.948; lr 5e-4 reaches forget 0.104 but retain 0.601 -
    without retain data, utility is the price of forgetting here. Digits, class 3 forgotten (gold: retain acc 0.998,
    test 0.869): forget acc 1.0 -> 0.0, retain 0.954, test 0.842.

    Cost: setup = one pass to build templates (no reference log-likelihoods); per step one forward+backward on the
    forget batch and one on its template batch. No retain data is read.

    Example:
        >>> ErasusUnlearner(model, strategy="flat", selector=None, divergence="kl").fit(forget_data=f)
    """

    #: f-divergence over unit target probabilities of refusal/forget responses; pairs need tokens or labels.
    requires = PREFERENCE_NEEDS
    requires_one_of = PREFERENCE_RESPONSES

    needs_retain = False
    default_lr = 3e-4
    default_epochs = 10

    def __init__(
        self,
        divergence: str = "kl",
        refusals: Sequence[str] = DEFAULT_REFUSALS,
        tokenizer: Any = None,
        refusal_ids: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        if divergence not in DIVERGENCES:
            raise InvalidConfigError(f"flat: unknown divergence {divergence!r}; known: {', '.join(DIVERGENCES)}")
        self.divergence = divergence
        if isinstance(refusals, str) or not refusals or not all(isinstance(r, str) and r for r in refusals):
            raise InvalidConfigError("flat: refusals must be a non-empty list of non-empty strings")
        self.refusals = tuple(refusals)
        self._tokenizer = tokenizer
        self.refusal_ids = None if refusal_ids is None else [list(map(int, r)) for r in refusal_ids]

    def setup(self, ctx: UnlearnContext) -> None:
        ctx.state["pairs"] = build_pairs(
            ctx, "refusal", k=1, refusals=self.refusals, tokenizer=self._tokenizer, refusal_ids=self.refusal_ids,
            with_reference=False,
        )

    def loss(self, ctx: UnlearnContext, forget: Batch | None, retain: Batch | None) -> tuple[torch.Tensor, dict[str, Any]]:
        pairs = ctx.state["pairs"]
        out_f = ctx.forward(forget)
        out_e = ctx.forward(chosen_batch(ctx, forget, pairs.responses(forget, 0)))
        p_f = sample_mean(out_f, out_f.unit_target_prob())
        p_e = sample_mean(out_e, out_e.unit_target_prob())
        forget_loss = weighted_mean(flat_loss(p_e, p_f, self.divergence), forget)
        return forget_loss, {"flat_loss": forget_loss.detach(), "p_forget": p_f.mean().detach(), "p_template": p_e.mean().detach()}
