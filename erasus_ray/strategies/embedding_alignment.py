"""Embedding alignment: move each forget input's representation onto that of an unrelated retain input. Closest
published methods: Contrastive Unlearning (Lee, Zhang, Yang, Lou & Xiong, IJCAI 2024, "Contrastive Unlearning: A
Contrastive Approach to Machine Unlearning"), which pulls forget embeddings towards retain embeddings of other
classes, and representation misdirection (RMU: Li et al., ICML 2024, "The WMDP Benchmark"), which steers forget
activations at a layer to a fixed target."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from erasus_ray.data import Batch, make_loader
from erasus_ray.errors import InvalidConfigError
from erasus_ray.strategies._preference import retain_nll
from erasus_ray.strategies.base import STRATEGIES, Strategy, UnlearnContext, weighted_mean
from erasus_ray.strategies.rmu import activations
from erasus_ray.tasks import Capability


def pooled(acts: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` representation: activations as they are, or averaged over positions for ``[B, T, D]``."""
    return acts if acts.ndim == 2 else acts.flatten(1, -2).mean(1)


def assign_anchors(
    forget_ids: list[int], forget_labels: list[int | None], retain_ids: list[int], retain_labels: list[int | None], seed: int
) -> dict[int, int]:
    """For each forget id, a retain id drawn with ``(seed, id)``; with labels, one of a different label."""
    out = {}
    retain_arr = np.asarray(retain_ids)
    retain_lab = np.asarray([-1 if y is None else y for y in retain_labels])
    for fid, y in zip(forget_ids, forget_labels):
        candidates = retain_arr if y is None else retain_arr[retain_lab != y]
        if len(candidates) == 0:
            raise InvalidConfigError(f"embedding_alignment: no retain sample to align forget id {fid} with")
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(fid) & 0xFFFFFFFF])
        out[int(fid)] = int(candidates[rng.integers(len(candidates))])
    return out


@STRATEGIES.register("embedding_alignment")
class EmbeddingAlignment(Strategy):
    """``loss = mean_i MSE(h(x_i^f), h_0(a(i))) + alpha * NLL(retain)``.

    ``h`` is the representation at ``layer``, ``h_0`` the same before unlearning, and ``a(i)`` the anchor of forget
    sample ``i``: a retain sample drawn with ``(seed, id)`` - for a classifier one of a *different* class (Contrastive
    Unlearning's negatives), for an LM any retain sample (another entity's question). The anchors' representations are
    computed once in :meth:`setup` and cached by id. After training the model reads a forget input as it reads an
    unrelated known input, so downstream layers produce that input's (wrong) answer rather than the fact.

    Why this and not RMU: RMU's target is a scaled random vector, which makes forget inputs produce off-distribution
    activations (gibberish for an LM, one fixed class for a classifier - see ``rmu``); aligning with real retain
    representations keeps them on the data manifold. Unlike Contrastive Unlearning we use a plain MSE to one anchor
    instead of an InfoNCE over a batch of positives/negatives (one target per sample, no temperature to tune), and
    the retain term is the task's NLL instead of the original training loss.

    Args:
        layer: ``"auto"`` (the adapter's penultimate features: a classifier's head input; an LM's final hidden state
            averaged over answer positions) or a module name (its output, averaged over positions if 3-D).
        alpha: weight of the retain NLL.

    Defaults (lr 3e-3, 20 epochs, layer auto, alpha 1, Adam). On the authors benchmark (``variant="ci"``, forget10 = 4 authors x 5 questions, seed 0, full forget set, batch 32)
    the original model has forget / retain ROUGE-L recall 1.000 / 0.997 and Min-K% MIA AUC 0.996; the retrained gold model
    0.091 / 0.990 and 0.456. ``embedding_alignment``: forget ROUGE-L 0.212,
    retain 1.000, test 0.152, MIA AUC 0.886 (lr 1e-3 x 10 epochs: 0.497 / 1.000; lr 1e-2: 0.298 / 0.527). Digits,
    class 3 forgotten (gold: retain acc 0.998, test 0.869): forget acc 1.0 -> 0.0, retain 0.998, test 0.869. There the
    forget features cannot each reach a different random anchor (the inputs are alike): they move towards the anchors'
    centroid (MSE to the anchors falls by about half) and are read as a retained class.

    Cost: setup = one forward per coreset sample (labels) and per anchor; per step one forward+backward on the forget
    batch and one on a retain batch. No frozen model copy is kept.

    Example:
        >>> ErasusUnlearner(model, strategy="embedding_alignment", selector=None).fit(forget_data=f, retain_data=r)
    """

    #: layer='auto' aligns the adapter's penultimate features (another layer: loss only; labels used where declared).
    requires = frozenset({Capability.FEATURES})

    needs_retain = True
    default_lr = 3e-3
    default_epochs = 20

    def __init__(self, layer: str = "auto", alpha: float = 1.0) -> None:
        super().__init__()
        if not isinstance(layer, str) or not layer:
            raise InvalidConfigError(f"embedding_alignment: layer must be 'auto' or a module name, got {layer!r}")
        self.layer = layer
        self.alpha = self.check_range("alpha", alpha, 0.0, 1e6)

    def requirements(self) -> frozenset[Capability]:
        """``layer="auto"`` reads the adapter's features; a named layer is hooked on the model itself."""
        return type(self).requires if self.layer == "auto" else frozenset({Capability.LOSS})

    def _labels(self, ctx: UnlearnContext, dataset) -> tuple[list[int], list[int | None]]:
        ids: list[int] = []
        labels: list[int | None] = []
        for batch in make_loader(dataset, ctx.task.collate, batch_size=256):
            ids += batch.ids.tolist()
            y = ctx.task.labels_of(batch.data) if ctx.task.provides(Capability.LABELS) else None
            labels += [None] * len(batch) if y is None else [int(v) for v in y]
        return ids, labels

    @torch.no_grad()
    def setup(self, ctx: UnlearnContext) -> None:
        if ctx.retain is None or len(ctx.retain) == 0:
            raise InvalidConfigError("embedding_alignment needs retain data for its anchors")
        if self.layer != "auto":
            try:
                ctx.model.get_submodule(self.layer)
            except AttributeError as err:
                raise InvalidConfigError(f"embedding_alignment: no module named {self.layer!r}") from err
        f_ids, f_labels = self._labels(ctx, ctx.forget)
        r_ids, r_labels = self._labels(ctx, ctx.retain)
        anchors = assign_anchors(f_ids, f_labels, r_ids, r_labels, ctx.seed)
        anchor_ids = sorted(set(anchors.values()))
        was_training = ctx.model.training
        ctx.model.eval()
        reps: dict[int, torch.Tensor] = {}
        for batch in make_loader(ctx.retain.subset(anchor_ids), ctx.task.collate, batch_size=64):
            acts = pooled(activations(ctx, batch.to(ctx.device), self.layer)).float().cpu()
            reps.update(zip(batch.ids.tolist(), acts))
        ctx.state["align_target"] = {fid: reps[aid] for fid, aid in anchors.items()}
        ctx.state["align_anchor"] = anchors
        ctx.model.train(was_training)

    def loss(self, ctx: UnlearnContext, forget: Batch | None, retain: Batch | None) -> tuple[torch.Tensor, dict[str, Any]]:
        acts = pooled(activations(ctx, forget, self.layer))
        target = torch.stack([ctx.state["align_target"][int(i)] for i in forget.ids]).to(acts.device, acts.dtype)
        forget_loss = weighted_mean((acts - target).pow(2).mean(-1), forget)
        retain_loss = retain_nll(ctx, retain, self.alpha, forget_loss)
        total = forget_loss + self.alpha * retain_loss
        return total, {"align_mse": forget_loss.detach(), "retain_loss": retain_loss.detach()}
