"""Unlearning only the last layers (Goel, Prabhu, Sanyal, Lim, Torr & Kumaraguru, 2022, "Towards Adversarial
Evaluation of Machine Unlearning" / "Evaluating Inexact Unlearning Requires Revisiting Forgetting": the CF-k and
EU-k baselines that touch only the last k layers)."""

from __future__ import annotations

from typing import Any

import torch

from erasus_ray.errors import InvalidConfigError
from erasus_ray.strategies._composed import ComposedStrategy, freeze_except, unfreeze, weight_layers
from erasus_ray.strategies.base import STRATEGIES, UnlearnContext
from erasus_ray.tasks import Capability


@STRATEGIES.register("layer_freezing")
class LayerFreezing(ComposedStrategy):
    """Freeze everything except the last ``num_layers`` (k) weight layers (or the named ``modules``) and run an objective on them.

    ``mode="objective"`` (default) trains the unfrozen layers with ``objective`` (default ``grad_diff``: ascent on
    the forget coreset, descent on retain). ``mode="eu_k"`` is Goel et al.'s EU-k: the last k layers are
    re-initialised (seeded) and trained on the retain set only (``objective`` is then ``fine_tune``): exact
    unlearning for those layers when the frozen layers never saw the forget set, an approximation otherwise.
    ``mode="cf_k"`` is CF-k: the last k layers fine-tuned on retain only (forgetting by interference).

    Frozen parameters are bit-identical after the run (gradients are never computed for them).

    Args:
        num_layers: k, the number of weight layers from the output end to train (Linear/Conv/Conv1D/Embedding modules, with
            their biases).
        modules: module names to train instead of the last k.
        mode: ``"objective"`` | ``"eu_k"`` | ``"cf_k"``.
        objective / objective_params: the loss-based strategy for ``mode="objective"``.
        EU-k re-initialises from the run's ``seed``.

    Measured on digits (class 3, full forget set, seed 0, defaults): forget / retain / test accuracy
    0.000 / 0.998 / 0.875, Avg.Gap 0.1 pts (gold model 0.000 / 0.998 / 0.869, original 1.000 / 0.998 / 0.975, Avg.Gap 50.6 pts).

    Cost: a forward pass through the whole model and a backward only through the trained layers per step.

    Example:
        >>> ErasusUnlearner(model, strategy="layer_freezing", num_layers=1).fit(forget_data=f, retain_data=r)
    """

    #: freezes layers of the model itself; requirements() adds its objective's.
    requires = frozenset({Capability.LOSS})

    default_lr = 1e-3
    default_epochs = 20

    def __init__(
        self,
        num_layers: int = 1,
        modules: list[str] | None = None,
        mode: str = "objective",
        objective: str = "grad_diff",
        objective_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise InvalidConfigError(f"{self.name}: num_layers must be a positive integer, got {num_layers!r}")
        if mode not in ("objective", "eu_k", "cf_k"):
            raise InvalidConfigError(f"{self.name}: mode must be 'objective', 'eu_k' or 'cf_k', got {mode!r}")
        self.num_layers = num_layers
        self.modules = list(modules) if modules else None
        self.mode = mode
        self._init_objective("fine_tune" if mode != "objective" else objective, objective_params)
        self.uses_forget = self._inner.uses_forget  # type: ignore[misc]

    def trained_modules(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        layers = weight_layers(model)
        if self.modules is not None:
            named = dict(model.named_modules())
            missing = [m for m in self.modules if m not in named]
            if missing:
                raise InvalidConfigError(f"{self.name}: no module named {missing}; e.g. {[n for n, _ in layers][-4:]}")
            return [(m, named[m]) for m in self.modules]
        if self.num_layers > len(layers):
            raise InvalidConfigError(f"{self.name}: num_layers={self.num_layers} but the model has {len(layers)} weight layers")
        return layers[-self.num_layers:]

    def setup(self, ctx: UnlearnContext) -> None:
        super().setup(ctx)
        chosen = self.trained_modules(ctx.model)
        if self.mode == "eu_k":
            generator_state = torch.get_rng_state()
            torch.manual_seed(ctx.seed)
            for _, module in chosen:
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            torch.set_rng_state(generator_state)
        freeze_except(ctx, {id(p) for _, m in chosen for p in m.parameters()})
        ctx.state["layer_freezing_trained"] = [n for n, _ in chosen]

    def finish(self, ctx: UnlearnContext) -> None:
        super().finish(ctx)
        unfreeze(ctx)
