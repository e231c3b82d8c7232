"""Random relabelling (Golatkar, Achille & Soatto, CVPR 2020, "Eternal Sunshine of the Spotless Net", the
random-label fine-tuning baseline; Graves, Nagisetty & Ganesh, AAAI 2021, "Amnesiac Machine Learning")."""

from __future__ import annotations

from typing import Any

import torch

from erasus_ray.data import Batch
from erasus_ray.strategies.base import STRATEGIES, Strategy, UnlearnContext, weighted_mean
from erasus_ray.tasks import Capability, TaskOutput

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, id) pairs over the generator's seed space


def wrong_targets(
    out: TaskOutput, ids: torch.Tensor, seed: int, cache: dict[int, torch.Tensor] | None = None
) -> torch.Tensor:
    """A uniformly random *wrong* target for every unit: ``(y + k) mod C`` with ``k`` uniform in ``1..C-1``.

    The offsets of a sample depend only on ``(seed, sample id)``, so a sample keeps its random labels across
    epochs and batchings (Amnesiac ML relabels once). For an LM every answer token gets its own random vocabulary
    token. ``cache`` (id -> offsets) avoids re-drawing them each step.
    """
    num_classes = out.logits.shape[-1]
    offsets = torch.empty_like(out.targets)
    for row, sample_id in enumerate(ids.tolist()):
        where = (out.owner == row).nonzero(as_tuple=True)[0]
        drawn = None if cache is None else cache.get(int(sample_id))
        if drawn is None or drawn.numel() != where.numel():
            g = torch.Generator().manual_seed((int(seed) * _MIX + int(sample_id)) % (2**63))
            drawn = torch.randint(1, num_classes, (where.numel(),), generator=g)
            if cache is not None:
                cache[int(sample_id)] = drawn
        offsets[where] = drawn.to(offsets.device)
    return (out.targets + offsets) % num_classes


@STRATEGIES.register("random_label")
class RandomLabel(Strategy):
    """Fine-tune the forget units toward fixed random wrong labels while fitting the retain set.

    ``loss = mean_i CE(f(x_i), y~_i) + alpha * L_retain`` with ``y~`` drawn once per sample (seeded) uniformly
    from the labels other than the true one (vocabulary tokens other than the true token for an LM).

    Args:
        alpha: weight of the retain cross-entropy.

    Defaults (lr 1e-3, 30 epochs, alpha 10, Adam), measured on digits with class 3 forgotten (full forget set of
    146, batch 32; gold retrained model: retain acc 0.998, test acc 0.869): forget acc 1.0 -> 0.0, retain acc
    0.996, test acc 0.867. Fitting random labels drags nearby retain classes along, so the retain term needs a
    large weight and time to repair them: alpha 1 x 10 epochs leaves retain acc 0.963, alpha 10 x 20 epochs 0.991.

    Cost: one forward+backward on a forget batch and one on a retain batch per step.

    Example:
        >>> ErasusUnlearner(model, strategy="random_label", selector=None).fit(forget_data=f, retain_data=r)
    """

    #: cross-entropy of the logits against random wrong targets.
    requires = frozenset({Capability.LOGITS})

    needs_retain = True
    default_lr = 1e-3
    default_epochs = 30

    def __init__(self, alpha: float = 10.0) -> None:
        super().__init__()
        self.alpha = self.check_range("alpha", alpha, 0.0, 1e6)

    def setup(self, ctx: UnlearnContext) -> None:
        ctx.state["random_label_offsets"] = {}

    def loss(self, ctx: UnlearnContext, forget: Batch | None, retain: Batch | None) -> tuple[torch.Tensor, dict[str, Any]]:
        out = ctx.forward(forget)
        wrong = wrong_targets(out, forget.ids, ctx.seed, ctx.state.get("random_label_offsets"))
        relabelled = TaskOutput(out.logits, wrong, out.owner, out.batch_size)
        relabel_loss = weighted_mean(relabelled.sample_loss(), forget)
        if retain is not None and self.alpha > 0:
            retain_loss = ctx.forward(retain).sample_loss().mean()
        else:
            retain_loss = relabel_loss.new_zeros(())
        total = relabel_loss + self.alpha * retain_loss
        logs = {
            "relabel_loss": relabel_loss.detach(),
            "forget_loss": weighted_mean(out.sample_loss(), forget).detach(),
            "retain_loss": retain_loss.detach(),
        }
        return total, logs

    def finish(self, ctx: UnlearnContext) -> None:
        ctx.state.pop("random_label_offsets", None)
