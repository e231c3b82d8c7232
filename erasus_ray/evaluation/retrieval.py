"""Retrieval metrics over a fixed reference set (a contrastive model's class captions): image -> text recall@k.

* ``<split>_recall5``: fraction of the split's images whose own caption is among the 5 captions most similar to the
  image (Radford et al., ICML 2021, report zero-shot retrieval as recall@k). Recall@1 over the caption set is the
  zero-shot accuracy ``<split>_acc`` (the argmax caption), so it is not registered twice.

Only adapters with a caption set (``ContrastiveTask(captions=...)``) get it by default: it is declared on the task
attribute ``captions``. It is shown in tables but kept out of Avg.Gap, which already counts the accuracy.
Cost: nothing beyond the shared forward pass (a top-k over the K caption logits per unit).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from erasus_ray.evaluation.metrics import EvalContext, MetricOptions, register_column, register_split_metric
from erasus_ray.evaluation.stats import Column
from erasus_ray.tasks import Capability

#: the k of the registered ``<split>_recall<k>`` metric
RECALL_K = 5


def recall_at_k(logits: torch.Tensor, targets: torch.Tensor, owner: torch.Tensor, batch_size: int, k: int) -> torch.Tensor:
    """``[B]`` per-sample recall@k: the fraction of a sample's units whose target is among the ``k`` highest logits
    (k capped at the number of classes; a sample with no units gets NaN)."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    hits = (top == targets[:, None]).any(-1).to(torch.float32)
    total = torch.zeros(batch_size, device=logits.device).index_add_(0, owner, hits)
    count = torch.zeros(batch_size, device=logits.device).index_add_(0, owner, torch.ones_like(hits))
    return total / count


@register_column(f"recall{RECALL_K}")
def recall_column(options: MetricOptions, model: nn.Module) -> Column:
    """Per-sample recall@5 of the shared forward pass."""
    return lambda out: recall_at_k(out.logits, out.targets, out.owner, out.batch_size, RECALL_K).cpu().numpy()


@register_split_metric(f"recall{RECALL_K}", requires={Capability.LOGITS}, columns=(f"recall{RECALL_K}",),
                       task_attrs=("captions",))
def split_recall(ctx: EvalContext, split: str) -> float:
    """Image -> text recall@5 over the caption set (NaN when the split is empty)."""
    values = np.asarray(ctx.stats(split).columns[f"recall{RECALL_K}"], dtype=float)
    return float(np.nanmean(values)) if len(values) else float("nan")


__all__ = ["RECALL_K", "recall_at_k"]
