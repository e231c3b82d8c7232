"""IdkPO: DPO towards an "I don't know" answer (the preference-optimisation baseline of TOFU, Maini, Feng,
Schwarzschild, Lipton & Kolter, COLM 2024, "TOFU: A Task of Fictitious Unlearning for LLMs"; DPO: Rafailov et al.,
NeurIPS 2023)."""

from __future__ import annotations

from typing import Any, Sequence

from erasus_ray.errors import InvalidConfigError
from erasus_ray.strategies._preference import DEFAULT_REFUSALS, PREFERENCE_NEEDS, PREFERENCE_RESPONSES
from erasus_ray.strategies.base import STRATEGIES
from erasus_ray.strategies.dpo import DPO


@STRATEGIES.register("idk_dpo")
class IdkDPO(DPO):
    """DPO with the forget answer rejected and a refusal chosen, plus ``alpha`` times the retain NLL.

    The chosen response of each forget sample is one of ``refusals`` drawn with ``(seed, id)``, tokenised as
    ``" " + text + eos`` with ``tokenizer`` (default: the task adapter's ``tokenizer`` attribute, which the authors
    benchmark sets) and appended to the sample's prompt; only the refusal tokens are supervised. ``refusal_ids``
    gives the token ids directly. With neither a tokenizer nor ids the refusal is the empty answer (eos only): the
    model learns to stop instead of stating the fact. Classifier: there is no "I don't know" label, so the chosen
    response is a seeded random other label, as in ``dpo``.

    Args:
        beta: inverse temperature (TOFU/NPO use 0.1 with their learning rates).
        alpha: weight of the retain NLL.
        refusals: the refusal strings (default: five TOFU-style "I don't know" answers).
        tokenizer: a Hugging Face tokenizer for ``refusals`` (not recorded in the run's hyperparameters).
        refusal_ids: token-id lists used instead of ``refusals``.

    Defaults (lr 3e-3, 20 epochs, beta 0.1, alpha 1, Adam). On the authors benchmark (``variant="ci"``, forget10 = 4 authors x 5 questions, seed 0, full forget set, batch 32)
    the original model has forget / retain ROUGE-L recall 1.000 / 0.997 and Min-K% MIA AUC 0.996; the retrained gold model
    0.091 / 0.990 and 0.456. ``idk_dpo``: forget ROUGE-L 0.715, retain 0.999,
    MIA AUC 0.982 - it keeps utility but forgets little: raising the refusal's likelihood alone satisfies the
    preference margin (the known weakness of IdkPO). Stronger settings trade utility: lr 1e-2 gives forget 0.295 but
    retain 0.490; 40 epochs at 3e-3 stays at 0.72. At lr 1e-3 x 10 epochs the greedy answers do not change (1.0).
    Digits, class 3 forgotten (gold: retain acc 0.998, test 0.869): forget acc 1.0 -> 0.0, retain 0.989, test 0.864.

    Cost: as ``dpo`` (two forwards per coreset sample in setup; per step forward+backward on forget, refusal and
    retain batches).

    Example:
        >>> ErasusUnlearner(model, strategy="idk_dpo", selector=None, tokenizer=tok).fit(forget_data=f, retain_data=r)
    """

    #: as dpo, with refusal answers (tokenised for a token task, other labels for a labelled one).
    requires = PREFERENCE_NEEDS
    requires_one_of = PREFERENCE_RESPONSES

    chosen_source = "refusal"
    default_lr = 3e-3
    default_epochs = 20

    def __init__(
        self,
        beta: float = 0.1,
        alpha: float = 1.0,
        refusals: Sequence[str] = DEFAULT_REFUSALS,
        tokenizer: Any = None,
        refusal_ids: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__(beta=beta, alpha=alpha)
        if isinstance(refusals, str) or not refusals or not all(isinstance(r, str) and r for r in refusals):
            raise InvalidConfigError(f"{self.name}: refusals must be a non-empty list of non-empty strings")
        self.refusals = tuple(refusals)
        self._tokenizer = tokenizer
        self.refusal_ids = None if refusal_ids is None else [list(map(int, r)) for r in refusal_ids]

    def _pair_options(self) -> dict[str, Any]:
        return {"refusals": self.refusals, "tokenizer": self._tokenizer, "refusal_ids": self.refusal_ids}
