"""Retraining from scratch on the retain set: exact unlearning, the gold standard every method is measured against."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from erasus_ray.errors import InvalidConfigError
from erasus_ray.strategies.base import STRATEGIES, Strategy, UnlearnContext
from erasus_ray.tasks import Capability
from erasus_ray.training import TrainRecipe, train_model

if TYPE_CHECKING:
    from erasus_ray.runners.local import LocalRunner, RunReport


def reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """Reset every submodule via its ``reset_parameters`` (seeded, without touching the global RNG).

    Raises :class:`InvalidConfigError` when a module owns parameters but cannot reset them (e.g. Hugging Face
    ``Conv1D``): keeping trained weights there would not be retraining, so pass ``model_factory`` instead.
    """
    stuck = [
        name or type(model).__name__
        for name, module in model.named_modules()
        if any(True for _ in module.parameters(recurse=False)) and not hasattr(module, "reset_parameters")
    ]
    if stuck:
        raise InvalidConfigError(
            f"retrain cannot re-initialise modules {stuck[:5]} (no reset_parameters); pass model_factory= to build a fresh model"
        )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model


@STRATEGIES.register("retrain")
class Retrain(Strategy):
    """Train a fresh model on the retain set with the original recipe (``recipe`` / ``model_factory`` passed to
    ``ErasusUnlearner``; otherwise every module's ``reset_parameters`` is called and :class:`TrainRecipe`'s
    defaults are used). Ignores the coreset: its cost scales with the retain set, which is the point.

    Cost: a full training run.
    """

    #: trains a fresh model on the retain set with the task's loss.
    requires = frozenset({Capability.LOSS})

    needs_retain = True
    driver_only_reason = (
        "retraining with the training recipe runs in the calling process"
    )
    uses_forget = False

    def unlearn(self, ctx: UnlearnContext, runner: "LocalRunner") -> "RunReport":
        from erasus_ray.runners.local import RunReport

        if ctx.retain is None or len(ctx.retain) == 0:
            raise InvalidConfigError("retrain needs retain data")
        recipe = ctx.recipe or TrainRecipe(seed=ctx.seed)
        fresh = ctx.model_factory() if ctx.model_factory is not None else reinitialise(ctx.model, ctx.seed)
        fresh.to(ctx.device)
        train_model(fresh, ctx.retain, ctx.task, recipe, progress=runner.config.progress, desc="retrain")
        if fresh is not ctx.model:
            ctx.model.load_state_dict(fresh.state_dict())
        ctx.model.eval()
        steps = recipe.epochs * -(-len(ctx.retain) // recipe.batch_size)
        return RunReport(steps=steps, epochs=recipe.epochs, retain_samples=recipe.epochs * len(ctx.retain))
