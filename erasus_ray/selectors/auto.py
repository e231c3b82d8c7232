"""Automatic selector choice: a documented rule over the task, the forget set and the budget."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from erasus_ray.data import IdDataset, make_loader
from erasus_ray.selectors.base import SELECTORS, Coreset, Selector
from erasus_ray.tasks import Capability, Task

#: Above this many forget samples DeepFool's ``C`` input-gradient passes per step are not worth it: EL2N instead.
DEEPFOOL_MAX_FORGET = 20_000
#: A forget set whose most frequent label holds at least this share is treated as a class-like (redundant) request.
CLASS_LIKE_SHARE = 0.5


def forget_label_share(forget: IdDataset, task: Task, batch_size: int = 512) -> float | None:
    """Share of the forget set held by its most frequent label (collation only, no model pass); None without labels."""
    labels = []
    for batch in make_loader(forget, task.collate, batch_size=batch_size, shuffle=False):
        y = task.labels_of(batch.data)
        if y is None:
            return None
        labels.append(torch.as_tensor(y).reshape(-1).cpu())
    counts = np.bincount(torch.cat(labels).numpy().astype(np.int64))
    return float(counts.max() / counts.sum())


@SELECTORS.register("auto")
class AutoSelector(Selector):
    """Pick a selector from the task, the forget set and the budget, run it, and say what was chosen and why
    (``Coreset.info["chose"]``, ``info["why"]``; the chosen selector's own info under ``info["chosen_info"]``).

    The rule, in order:

    1. the budget covers the whole forget set -> ``full`` (nothing to choose);
    2. a task without logits (a loss-only objective) -> ``loss``: the per-sample objective, forward passes only;
       a task without a class label per sample (``labels``; e.g. a causal LM) -> ``el2n``: defined on answer
       tokens, forward passes only, the project default;
    3. a classifier whose forget set is class-like (its most frequent label holds >= 50%: a redundant request such
       as "forget this class") and has at most 20,000 samples -> ``deepfool``: the boundary samples of the class.
       Measured on digits class 3, 10% coreset, ``grad_diff``, 3 seeds: mean Avg.Gap to the gold model 0.0017
       (``deepfool``) vs 0.0030 (``el2n``), 0.0025 (``data_shapley``), 0.0083 (``random``);
    4. a classifier forget set that is too large for DeepFool -> ``el2n`` (forward passes only);
    5. any other classifier forget set (scattered samples) -> ``random``: there the original model is already
       close to the retrained one and every score-based coreset overshoots more than a random one. Measured on
       digits random10, 10% coreset, ``grad_diff``, 3 seeds: mean Avg.Gap 0.028 (``random``) vs 0.070 (``el2n``),
       0.066 (``deepfool``), 0.093 (``data_shapley``); original model 0.014.

    Cost: that of the chosen selector, plus one collation pass over the forget labels.

    Example:
        >>> core = AutoSelector().select(model, forget_loader, fraction=0.1, retain=retain_loader)
        >>> core.info["chose"], core.info["why"]
    """

    #: picks by the task's capabilities; the selector it picks checks its own requirements.
    requires = frozenset({Capability.LOSS})

    distributed_merge = "central"
    central_reason = "chooses from whole-forget-set statistics (size, label share), then runs its choice once in the driver"

    def choose(self, forget: IdDataset, task: Task, budget: int) -> tuple[str, str]:
        n = len(forget)
        if budget >= n:
            return "full", f"the budget ({budget}) covers the whole forget set ({n})"
        if not task.provides(Capability.LOGITS):
            return "loss", f"task {task.name!r} has no logits: loss scores the per-sample objective with forward passes only"
        if not task.provides(Capability.LABELS):
            return "el2n", f"task {task.name!r} has no class label per sample: el2n scores its prediction units with forward passes only"
        share = forget_label_share(forget, task)
        if share is not None and share >= CLASS_LIKE_SHARE and n <= DEEPFOOL_MAX_FORGET:
            return "deepfool", (
                f"class-like forget set (most frequent label holds {share:.0%} >= {CLASS_LIKE_SHARE:.0%}) of {n} <= "
                f"{DEEPFOOL_MAX_FORGET} samples: keep the samples nearest the decision boundary"
            )
        if share is not None and share >= CLASS_LIKE_SHARE:
            return "el2n", f"class-like but large forget set ({n} > {DEEPFOOL_MAX_FORGET} samples): el2n, forward passes only"
        return "random", (
            f"scattered forget set (most frequent label holds {share if share is None else f'{share:.0%}'}): the model is "
            "likely already near the retrained one and score-based coresets overshoot more than a random one"
        )

    def _select(self, model: nn.Module, forget: IdDataset, task: Task, budget: int, seed: int, **context: Any) -> Coreset:
        name, why = self.choose(forget, task, budget)
        chosen = SELECTORS.create(name, batch_size=self.batch_size)
        core = chosen.select(model, forget, task=task, k=budget, seed=seed, **context)
        info = {"chose": name, "why": why, "chosen_info": core.info}
        if "order" in core.info:
            info["order"] = core.info["order"]
        return Coreset(ids=core.ids, weights=core.weights, scores=core.scores, info=info)
