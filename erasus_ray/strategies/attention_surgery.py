"""Attention-head surgery: prune the heads that matter far more to the forget set than to the retain set
(head importance of Michel, Levy & Neubig, NeurIPS 2019, "Are Sixteen Heads Really Better than One?"; the
forget/retain importance ratio of Pochinkov & Schoots, 2024, "Dissecting Language Models: Machine Unlearning via
Selective Pruning")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from erasus_ray.data import IdDataset, make_loader
from erasus_ray.errors import InvalidConfigError
from erasus_ray.strategies.base import STRATEGIES, Strategy, UnlearnContext
from erasus_ray.strategies.fisher_forgetting import retain_subset
from erasus_ray.tasks import Capability

if TYPE_CHECKING:
    from erasus_ray.runners.local import LocalRunner, RunReport

OUT_PROJ_NAMES = ("c_proj", "o_proj", "out_proj", "dense")


@dataclass
class AttentionSite:
    """One attention module: its name, its output projection (whose input is the heads' concatenated outputs),
    the number of heads and each head's width."""

    name: str
    out_proj: nn.Module
    num_heads: int
    head_dim: int

    def zero_head(self, head: int) -> None:
        """Remove head ``head`` for good: zero the out-projection weights that read its output slice."""
        cols = slice(head * self.head_dim, (head + 1) * self.head_dim)
        w = self.out_proj.weight
        with torch.no_grad():
            if isinstance(self.out_proj, nn.Linear):  # weight [out, in]
                w[:, cols] = 0
            else:  # Hugging Face Conv1D: weight [in, out]
                w[cols, :] = 0


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Every attention module with a known head count and an output projection (GPT-2 ``c_proj``, Llama ``o_proj``,
    ``out_proj``, BERT-style ``dense``), in module order."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None)  # a vision-language model keeps its LM's heads there
    config_heads = (getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
                    or getattr(text_config, "num_attention_heads", None))
    sites = []
    for name, module in model.named_modules():
        heads = getattr(module, "num_heads", None) or getattr(module, "n_head", None)
        leaf = name.rsplit(".", 1)[-1].lower()
        if heads is None and ("attn" in leaf or "attention" in leaf):
            heads = config_heads  # e.g. Llama's self_attn keeps the head count in the config only
        if not isinstance(heads, int) or heads < 1:
            continue
        proj = next((getattr(module, p) for p in OUT_PROJ_NAMES if isinstance(getattr(module, p, None), nn.Module)), None)
        weight = getattr(proj, "weight", None)
        if proj is None or not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            continue
        width = weight.shape[1] if isinstance(proj, nn.Linear) else weight.shape[0]
        if width % heads:
            continue
        sites.append(AttentionSite(name, proj, heads, width // heads))
    return sites


def head_importance(
    model: nn.Module, ctx: UnlearnContext, data: IdDataset, sites: list[AttentionSite], *,
    weights: dict[int, float] | None = None, batch_size: int = 32,
) -> tuple[torch.Tensor, int]:
    """``([sites, max_heads] importance, batches)``: Michel et al.'s ``I_h = E_x |d loss(x) / d g_h|`` for a gate
    ``g_h = 1`` on each head's output.

    The per-sample gate gradient is exact and needs no per-sample backward: samples are independent, so with the
    summed loss ``d loss_b / d g_h = sum_{t, d in head h} o_{b,t,d} * (d loss / d o_{b,t,d})`` from the out-projection's
    input ``o`` and its gradient, caught by one hook in one ordinary backward pass. Cost: one forward+backward per
    sample (batched). A site whose rows are shared by the batch (``task.shared_inputs``: a caption set) has no
    per-sample gate gradient; there each sample gets an equal share of the batch's ``|d sum loss / d g_h|``.
    """
    max_heads = max(s.num_heads for s in sites)
    total = torch.zeros(len(sites), max_heads)
    weight_sum, batches = 0.0, 0
    captured: dict[int, torch.Tensor] = {}

    def keeper(i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            args[0].retain_grad()
            captured[i] = args[0]
        return hook

    was_training = model.training
    model.eval()
    handles = [s.out_proj.register_forward_pre_hook(keeper(i)) for i, s in enumerate(sites)]
    try:
        for batch in make_loader(data, ctx.task.collate, batch_size=batch_size, weights=weights):
            batch = batch.to(ctx.device)
            captured.clear()
            model.zero_grad(set_to_none=True)
            out = ctx.task.forward(model, batch.data)
            out.sample_loss().sum().backward()
            w = batch.weights.float().cpu() if batch.weights is not None else torch.ones(len(batch))
            for i, site in enumerate(sites):
                o = captured[i]
                per = (o * o.grad).detach().float()  # [B, (T,) H*hd]
                per = per.reshape(per.shape[0], -1, site.num_heads, site.head_dim).sum(dim=(1, 3))
                if per.shape[0] != len(batch):
                    # rows shared by the whole batch (a caption set encoded once, task.shared_inputs): only the
                    # batch's summed gate gradient exists, so each sample is given an equal share of its magnitude
                    per = per.sum(0, keepdim=True).expand(len(batch), -1) / len(batch)
                total[i, : site.num_heads] += (per.abs().cpu() * w[:, None]).sum(0)
            weight_sum += float(w.sum())
            batches += 1
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return total / max(weight_sum, 1e-12), batches


def rank_heads(forget_imp: torch.Tensor, retain_imp: torch.Tensor, eps: float) -> torch.Tensor:
    """``[sites, heads]`` scores ``I_forget / (I_retain + eps)`` (Pochinkov & Schoots' relative importance)."""
    return forget_imp / (retain_imp + eps)


@STRATEGIES.register("attention_surgery")
class AttentionSurgery(Strategy):
    """Score every attention head by how much more the forget loss depends on it than the retain loss, and prune
    (zero) the top ``num_heads`` heads. LM only; no training.

    There is no single published method by this name. The closest published ones remove attention components for
    unlearning or to cut a recall: Geva et al. (EMNLP 2023, "Dissecting Recall of Factual Associations in
    Auto-Regressive Language Models") block attention edges ("knockout") to find where a fact is read; Pochinkov &
    Schoots (2024) prune the neurons and heads whose importance on the forget data is large relative to the retain
    data. This follows the latter, with Michel et al.'s (2019) gradient head importance ``E_x |d loss / d g_h|``
    (a gate on each head's output) as the importance, since it is exact per sample at the cost of one backward pass,
    and scores ``I_forget / (I_retain + eps)``. A head is removed by zeroing the columns of the attention's output
    projection that read it (the projection's bias stays): the returned model is a plain model of the same
    architecture, and the pruned heads stay pruned under further fine-tuning only if those weights are masked.

    Args:
        num_heads: heads to prune (the top of the ranking over all layers).
        eps: added to the retain importance (relative to its mean over heads) so that heads the retain set never
            uses do not divide by zero; the score is ``I_f / (I_r + eps * mean(I_r))``.
        max_retain: estimate the retain importance on at most this many retain samples (seeded subset); None: all.
        stats_batch_size: batch size of the importance passes.

    Measured on a 1-block, 4-head GPT-2 trained on 24 copy sequences (``a b c a b c a b c``: the answer needs
    attention) and 40 successor sequences (``x x+1 x+2 ...``), forgetting the copy sequences
    (``tests/test_strategies_edit.py``): forget NLL 0.11 -> 0.19 (top head) / 1.06 (top 2 heads), retain NLL
    0.01 -> 0.03 / 0.08. Where the forget samples share no mechanism with each other that the retain samples lack
    (the registry contract's 8 random memorised sequences) pruning is not selective: forget and retain NLL rise
    alike (0.02 -> 0.18 / 0.20 for the top head of 2), so the generic LM contract is not applied to it.

    Cost: one forward+backward per forget and per retain sample (batched), no optimizer step.

    Example:
        >>> res = ErasusUnlearner(lm, strategy="attention_surgery", selector=None, num_heads=2).fit(
        ...     forget_data=f, retain_data=r)
        >>> res.report.history[0]     # pruned heads and their scores
    """

    #: ranks the attention heads of a token-sequence model by their forget/retain loss importance.
    requires = frozenset({Capability.TOKENS})

    needs_retain = True
    driver_only_reason = (
        "head scores and head zeroing are computed in the calling process; there are no optimizer steps to "
        "distribute"
    )
    lm_contract_exempt_reason = (
        "head pruning removes a mechanism the forget samples share; the contract LM (1 block, 2 heads) forgets 8 "
        "random sequences that use the same heads as the retain ones (pruning the top head: forget loss 0.02 -> 0.18, "
        "retain 0.02 -> 0.20); tests/test_strategies_edit.py checks a concept LM instead"
    )

    def __init__(self, num_heads: int = 1, eps: float = 0.1, max_retain: int | None = 512, stats_batch_size: int = 32) -> None:
        super().__init__()
        if not isinstance(num_heads, int) or num_heads < 1:
            raise InvalidConfigError(f"attention_surgery: num_heads must be a positive integer, got {num_heads!r}")
        self.num_heads = num_heads
        self.eps = self.check_range("eps", eps, 0.0, 1e6, low_open=True)
        if max_retain is not None and int(max_retain) < 1:
            raise InvalidConfigError(f"attention_surgery: max_retain must be >= 1, got {max_retain!r}")
        self.max_retain = None if max_retain is None else int(max_retain)
        self.stats_batch_size = int(self.check_range("stats_batch_size", stats_batch_size, 1, 1e9))

    def candidate_sites(self, ctx: UnlearnContext) -> list[AttentionSite]:
        """The attention modules whose heads may be pruned (default: every one :func:`attention_sites` finds)."""
        return attention_sites(ctx.model)

    def scores(self, ctx: UnlearnContext) -> tuple[list[AttentionSite], torch.Tensor, int, int]:
        """``(sites, [sites, heads] scores (-inf where a site has fewer heads), batches, retain samples)``."""
        sites = self.candidate_sites(ctx)
        if not sites:
            raise InvalidConfigError(
                "attention_surgery: found no attention module with a head count and an output projection "
                f"({', '.join(OUT_PROJ_NAMES)}) in the model"
            )
        total_heads = sum(s.num_heads for s in sites)
        if self.num_heads > total_heads:
            raise InvalidConfigError(f"attention_surgery: num_heads={self.num_heads} but the model has {total_heads} heads")
        retain = retain_subset(ctx, self.max_retain)
        forget_imp, nf = head_importance(ctx.model, ctx, ctx.forget, sites, weights=ctx.forget_weights, batch_size=self.stats_batch_size)
        retain_imp, nr = head_importance(ctx.model, ctx, retain, sites, batch_size=self.stats_batch_size)
        valid = torch.zeros_like(forget_imp, dtype=torch.bool)
        for i, s in enumerate(sites):
            valid[i, : s.num_heads] = True
        eps = self.eps * float(retain_imp[valid].mean().clamp_min(1e-12))
        score = rank_heads(forget_imp, retain_imp, eps).masked_fill(~valid, float("-inf"))
        return sites, score, nf + nr, len(retain)

    def unlearn(self, ctx: UnlearnContext, runner: "LocalRunner") -> "RunReport":
        from erasus_ray.runners.local import RunReport

        sites, score, batches, retain_n = self.scores(ctx)
        flat = score.flatten()
        # stable order: by score, ties by (layer, head) position
        order = sorted(range(flat.numel()), key=lambda k: (-float(flat[k]), k))[: self.num_heads]
        heads = score.shape[1]
        entry: dict[str, Any] = {"pruned_heads": float(self.num_heads)}
        for k in order:
            site, head = sites[k // heads], k % heads
            site.zero_head(head)
            entry[f"{site.name}.head{head}"] = float(flat[k])
        ctx.model.eval()
        report = RunReport(steps=batches, epochs=1, forget_samples=len(ctx.forget), retain_samples=retain_n)
        report.history.append(entry)
        return report
