"""GraNd averaged over an ensemble of briefly trained models (Paul, Ganguli & Dziugaite, NeurIPS 2021, "Deep
Learning on a Data Diet: Finding Important Examples Early in Training")."""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from erasus_ray.data import IdDataset, as_id_dataset
from erasus_ray.errors import InvalidConfigError
from erasus_ray.selectors._reference import union_with_ids
from erasus_ray.selectors.base import SELECTORS, Coreset, ScoreSelector
from erasus_ray.selectors.gradient_norm import GradientNormSelector
from erasus_ray.tasks import Capability, Task
from erasus_ray.training import TrainRecipe, train_model
from erasus_ray.utils import model_device


def reinitialised_copy(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with fresh weights: ``reset_parameters()`` of every submodule that has one (and the
    Hugging Face ``init_weights()`` when present), under ``torch.manual_seed(seed)``."""
    fresh = copy.deepcopy(model)
    torch.manual_seed(int(seed))
    for module in fresh.modules():
        if hasattr(module, "reset_parameters") and callable(module.reset_parameters):
            module.reset_parameters()
    if hasattr(fresh, "init_weights") and callable(fresh.init_weights):
        fresh.init_weights()
    return fresh


@SELECTORS.register("grand_ensemble")
class GraNdEnsembleSelector(ScoreSelector):
    """Score each forget sample by its expected gradient norm ``E_m ||grad l_m(x, y)||`` over ``num_models``
    models, each freshly initialised (seed ``seed + m``) and trained ``epochs`` epochs on forget + retain - the
    paper's GraNd, which averages over independent early-training runs. Where the paper leaves freedom: the
    models come from ``model_factory`` (constructor or ``select(..., model_factory=...)``), else from a
    re-initialised copy of the given model (``reset_parameters`` / ``init_weights``); training uses
    ``optimizer`` / ``lr`` / ``batch_size`` on at most ``max_retain`` retain rows (seeded) plus the forget set
    (forget only without ``retain=``). Gradients w.r.t. ``scope`` (``"all"``, the paper's choice, default).

    ``order="high"`` (default): the paper keeps high-GraNd samples (hard, informative). ``info["models"]`` lists
    how each model was built.

    Measured on digits (10% coreset, ``grad_diff``, 3 seeds, mean Avg.Gap to the retrained model; ``random``: 0.0083
    on class 3, 0.028 on random10), defaults (re-initialised copies, no factory): class 3: 0.0021, random10: 0.089.

    Cost: ``num_models x epochs`` training epochs over forget + retain, then one vectorised per-sample
    forward+backward over the forget set per model.

    Example:
        >>> GraNdEnsembleSelector(model_factory=make_model, num_models=4, epochs=3).select(model, forget, k=20, retain=retain)
    """

    #: per-sample gradient norms of briefly trained copies.
    requires = frozenset({Capability.INDEPENDENT})

    default_order = "high"
    forward_only = False
    distributed_merge = "central"
    central_reason = ("trains its ensemble of freshly initialised models on forget + retain before scoring (model "
                      "training over the whole set, not separable per shard)")

    def __init__(
        self,
        batch_size: int = 64,
        order: str | None = None,
        num_models: int = 3,
        epochs: int = 3,
        lr: float = 1e-3,
        optimizer: str = "adam",
        model_factory: Callable[[], nn.Module] | None = None,
        scope: str | Sequence[str] = "all",
        max_retain: int | None = 5000,
    ) -> None:
        super().__init__(batch_size=batch_size, order=order)
        for name, value in (("num_models", num_models), ("epochs", epochs)):
            if isinstance(value, bool) or int(value) < 1:
                raise InvalidConfigError(f"{name} must be a positive integer, got {value!r}")
        if not float(lr) > 0:
            raise InvalidConfigError(f"lr must be > 0, got {lr!r}")
        self.num_models = int(num_models)
        self.epochs = int(epochs)
        self.lr = float(lr)
        self.optimizer = optimizer
        self.model_factory = model_factory
        self.scope = scope
        self.max_retain = max_retain

    def _scores(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, context: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        factory = context.get("model_factory") or self.model_factory
        retain = context.get("retain")
        retain = None if retain is None else as_id_dataset(retain).sorted()
        if retain is not None and self.max_retain is not None and len(retain) > self.max_retain:
            keep = np.sort(np.random.default_rng(seed).choice(len(retain), int(self.max_retain), replace=False))
            retain = retain.subset(retain.ids[keep])
        data = union_with_ids(forget, retain)
        scorer = GradientNormSelector(batch_size=self.batch_size, scope=self.scope)
        total = np.zeros(len(forget))
        built = []
        for m in range(self.num_models):
            s = seed + m
            if factory is not None:
                torch.manual_seed(s)
                member = factory().to(model_device(model))
                built.append(f"model_factory, seed {s}")
            else:
                member = reinitialised_copy(model, s)
                built.append(f"re-initialised copy, seed {s}")
            for p in member.parameters():
                p.requires_grad_(True)
            with torch.enable_grad():
                train_model(member, data, task, TrainRecipe(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                                                            optimizer=self.optimizer, seed=s))
            member.eval()
            total += scorer._scores_for(member, forget, task)
        info = {"models": built, "epochs": self.epochs, "trained_on": "forget + retain" if retain is not None and len(retain) else "forget only"}
        return total / self.num_models, info

    def score(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, **context: Any) -> np.ndarray:
        return self._scores(model, forget, task, seed, context)[0]

    def _select(self, model: nn.Module, forget: IdDataset, task: Task, budget: int, seed: int, **context: Any) -> Coreset:
        scores, info = self._scores(model, forget, task, seed, context)
        coreset = self.coreset_from_scores(forget.ids, scores, budget)
        coreset.info.update(info)
        return coreset
