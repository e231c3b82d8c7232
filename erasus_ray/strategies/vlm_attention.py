"""Attention-based vision-language unlearning: prune the attention heads of one tower (or both) that the forget pairs
depend on far more than the retain pairs. No single published method goes by this name; the closest published one
is Pochinkov & Schoots (2024, "Dissecting Language Models: Machine Unlearning via Selective Pruning"), who prune the
heads and neurons whose importance on the forget data is large relative to the retain data in language models and
vision transformers alike - here with Michel, Levy & Neubig's (NeurIPS 2019) gradient head importance of the
VLM's own objective (zero-shot / in-batch contrastive loss, or the answer loss of a generative VLM), restricted to a
tower through the task's ``towers`` capability (so the image encoder's attention can be edited while the text
side stays exactly as it was)."""

from __future__ import annotations

from erasus_ray.errors import InvalidConfigError
from erasus_ray.strategies.attention_surgery import AttentionSite, AttentionSurgery, attention_sites
from erasus_ray.strategies.base import STRATEGIES, UnlearnContext
from erasus_ray.strategies.vision_text_split import TOWERS, tower_names
from erasus_ray.tasks import Capability


@STRATEGIES.register("vlm_attention")
class VLMAttention(AttentionSurgery):
    """Score the attention heads of ``tower`` (``"vision"``, ``"text"`` or ``"both"``) by ``I_forget / I_retain``
    (Michel et al.'s gradient importance of the task's per-sample objective) and zero the top ``num_heads``.

    Every parameter outside the chosen tower is left bit-identical; inside it only the out-projection columns that
    read the pruned heads change. No training.

    Args:
        tower: whose heads are candidates.
        num_heads / eps / max_retain / stats_batch_size: as :class:`~erasus_ray.strategies.attention_surgery.AttentionSurgery`.

    Cost: one forward+backward per forget and per retain sample (batched) and one to find the towers; no optimizer
    step.

    Example:
        >>> ErasusUnlearner(clip, strategy="vlm_attention", tower="vision", num_heads=1).fit(forget_data=f, retain_data=r)
    """

    requires = frozenset({Capability.TOWERS})
    lm_contract_exempt_reason = None

    def __init__(self, tower: str = "both", num_heads: int = 1, eps: float = 0.1, max_retain: int | None = 512,
                 stats_batch_size: int = 32) -> None:
        super().__init__(num_heads=num_heads, eps=eps, max_retain=max_retain, stats_batch_size=stats_batch_size)
        if tower not in TOWERS + ("both",):
            raise InvalidConfigError(f"{self.name}: tower must be one of {TOWERS + ('both',)}, got {tower!r}")
        self.tower = tower

    def candidate_sites(self, ctx: UnlearnContext) -> list[AttentionSite]:
        towers = tower_names(ctx)
        chosen = set(towers["vision"]) | set(towers["text"]) if self.tower == "both" else set(towers[self.tower])
        params = {id(p): n for n, p in ctx.model.named_parameters()}
        return [s for s in attention_sites(ctx.model) if params.get(id(s.out_proj.weight)) in chosen]
