"""Selective neuron pruning (Pochinkov & Schoots, 2024, "Dissecting Language Models: Machine Unlearning via
Selective Pruning")."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from erasus_ray.data import IdDataset, make_loader
from erasus_ray.errors import InvalidConfigError
from erasus_ray.strategies.base import STRATEGIES, Strategy, UnlearnContext
from erasus_ray.strategies.fisher_forgetting import retain_subset
from erasus_ray.tasks import Capability

if TYPE_CHECKING:
    from erasus_ray.runners.local import LocalRunner, RunReport


def hidden_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear / GPT-2 Conv1D / Conv2d layers whose outputs are hidden neurons (a convolution's output channels, the
    CNN analogue of the paper's feed-forward neurons): every such layer except the last one (the output layer) and
    layers with weights tied to another module."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    layers = [
        (name, m)
        for name, m in model.named_modules()
        if (isinstance(m, (nn.Linear, nn.Conv2d)) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf")))
        and counts[id(m.weight)] == 1
    ]
    return layers[:-1]


@torch.no_grad()
def mean_abs_activation(model: nn.Module, task, data: IdDataset, layers: list[tuple[str, nn.Module]], batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Per layer, the mean |output| of each neuron over the samples (and tokens) of ``data``."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, inputs, output: torch.Tensor) -> None:
            out = output.detach().movedim(1, -1) if isinstance(module, nn.Conv2d) else output.detach()  # channels last
            flat = out.abs().reshape(-1, out.shape[-1]).double()
            sums[name] = sums.get(name, 0) + flat.sum(0)
            counts[name] = counts.get(name, 0) + flat.shape[0]

        return fn

    for name, module in layers:
        handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in make_loader(data, task.collate, batch_size=batch_size):
            task.forward(model, batch.to(device).data)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: sums[name] / max(counts[name], 1) for name in sums}


def selectivity_scores(forget_act: dict[str, torch.Tensor], retain_act: dict[str, torch.Tensor], eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """The paper's importance ratio ``I_forget / (I_retain + eps)`` per neuron."""
    return {name: forget_act[name] / (retain_act[name] + eps) for name in forget_act}


@torch.no_grad()
def prune_neurons(module: nn.Module, rows: torch.Tensor) -> None:
    """Zero the weights and biases that produce output neurons ``rows`` (Linear: weight rows; Conv2d: output
    channels; Conv1D: columns)."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        module.weight[rows] = 0
    else:
        module.weight[:, rows] = 0
    if getattr(module, "bias", None) is not None:
        module.bias[rows] = 0


@STRATEGIES.register("neuron_pruning")
class NeuronPruning(Strategy):
    """Iteratively zero the hidden neurons most selective for the forget set.

    Each iteration measures every hidden neuron's mean absolute output on the forget coreset (``I_f``) and on the
    retain set (``I_r``), scores it by ``I_f / (I_r + eps)`` and prunes the ``prune_fraction`` of not-yet-pruned
    neurons with the highest scores, over all hidden layers together (the paper prunes feed-forward and attention
    neurons separately with their own fractions; one global ranking is used here). Pruning a neuron zeroes the
    weight row/column and bias that produce it, so its output is exactly 0 (and stays 0 after ReLU/GELU).
    Pochinkov & Schoots measure post-activation MLP neurons; this measures the layer output (pre-activation),
    which is what can be read from a Linear layer without knowing the activation that follows.

    No gradients, no learning rate (the runner's ``lr`` does not apply). Deterministic.

    Args:
        prune_fraction: share of hidden neurons pruned per iteration.
        iterations: number of prune-and-rescore rounds; None (default) takes the runner's ``epochs`` (default 5),
            so ``epochs=`` on the unlearner sets how far pruning goes.
        max_retain: measure ``I_r`` on at most this many retain samples (seeded subset).

    Measured on digits (class 3, full forget set, seed 0, defaults: 5 x 2% = 10% of hidden neurons): forget /
    retain / test accuracy 0.000 / 0.916 / 0.792, Avg.Gap 4.0 pts (gold model 0.000 / 0.998 / 0.869, original 1.000 / 0.998 / 0.975, Avg.Gap 50.6 pts); 3 x 1% keeps retain at 0.995
    but leaves forget accuracy at 0.73. Pruning trades retain fit for forgetting more than the gradient methods.

    Cost: per iteration one forward pass over the coreset and the (sub-sampled) retain set.

    Example:
        >>> ErasusUnlearner(model, strategy="neuron_pruning", prune_fraction=0.02, iterations=5).fit(forget_data=f, retain_data=r)
    """

    #: hooks on the model's own layers over plain forward passes: any task.
    requires = frozenset({Capability.LOSS})

    needs_retain = True
    driver_only_reason = (
        "activation statistics and pruning are computed in the calling process; there are no optimizer steps "
        "to distribute"
    )

    default_epochs = 5

    def __init__(self, prune_fraction: float = 0.02, iterations: int | None = None, max_retain: int | None = 1024) -> None:
        super().__init__()
        self.prune_fraction = self.check_range("prune_fraction", prune_fraction, 0.0, 1.0, low_open=True)
        if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1):
            raise InvalidConfigError(f"{self.name}: iterations must be a positive integer, got {iterations!r}")
        self.iterations = iterations
        if max_retain is not None and int(max_retain) < 1:
            raise InvalidConfigError(f"{self.name}: max_retain must be >= 1, got {max_retain!r}")
        self.max_retain = None if max_retain is None else int(max_retain)

    def unlearn(self, ctx: UnlearnContext, runner: "LocalRunner") -> "RunReport":
        from erasus_ray.runners.local import RunReport

        layers = hidden_layers(ctx.model)
        if not layers:
            raise InvalidConfigError(f"{self.name}: the model has no hidden Linear/Conv1D/Conv2d layers to prune")
        retain = retain_subset(ctx, self.max_retain)
        pruned = {name: torch.zeros(m.weight.shape[0] if isinstance(m, (nn.Linear, nn.Conv2d)) else m.weight.shape[1], dtype=torch.bool)
                  for name, m in layers}
        total = sum(int(v.numel()) for v in pruned.values())
        per_iteration = max(1, int(round(self.prune_fraction * total)))
        iterations = self.iterations if self.iterations is not None else runner.config.epochs
        report = RunReport(epochs=iterations)
        for it in range(iterations):
            scores = selectivity_scores(
                mean_abs_activation(ctx.model, ctx.task, ctx.forget, layers), mean_abs_activation(ctx.model, ctx.task, retain, layers)
            )
            names = [n for n, _ in layers]
            flat = torch.cat([scores[n].cpu().masked_fill(pruned[n], -torch.inf) for n in names])
            # highest score first, ties by position (stable)
            order = torch.sort(-flat, stable=True).indices[:per_iteration]
            order = order[torch.isfinite(flat[order])]
            offsets = torch.tensor([0] + [pruned[n].numel() for n in names]).cumsum(0)
            modules = dict(layers)
            for i, name in enumerate(names):
                rows = order[(order >= offsets[i]) & (order < offsets[i + 1])] - offsets[i]
                if len(rows):
                    prune_neurons(modules[name], rows.to(modules[name].weight.device))
                    pruned[name][rows] = True
            report.steps += 1
            report.forget_samples += len(ctx.forget)
            report.retain_samples += len(retain)
            report.history.append({"iteration": it + 1, "pruned_neurons": float(sum(int(v.sum()) for v in pruned.values()))})
        ctx.state["pruned_neurons"] = {n: torch.nonzero(v).flatten().tolist() for n, v in pruned.items()}
        ctx.model.eval()
        return report
