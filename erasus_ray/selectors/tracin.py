"""TracIn (Pruthi, Liu, Kale & Sundararajan, NeurIPS 2020, "Estimating Training Data Influence by Tracing
Gradient Descent"), in its checkpoint form TracInCP."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from erasus_ray.data import IdDataset, as_id_dataset
from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.selectors._per_sample import GaussianProjector, iter_per_sample_grads, mean_grad
from erasus_ray.selectors.base import SELECTORS, Coreset, ScoreSelector
from erasus_ray.selectors.gradient_norm import trainable_params
from erasus_ray.tasks import Task
from erasus_ray.utils import clone_model

TARGETS = ("self", "forget", "retain")


@SELECTORS.register("tracin")
class TracInSelector(ScoreSelector):
    """TracInCP: ``sum_c lr_c * g_z(theta_c) . g_t(theta_c)`` over saved checkpoints ``(state_dict, lr)``.

    Targets (``g_S`` = gradient of the mean loss over set S at each checkpoint):

    * ``"self"`` (default): ``sum_c lr_c ||g_z(theta_c)||^2``, the self-influence the paper uses to find
      mislabelled / memorised examples - how much training on z lowered z's own loss along the trajectory.
    * ``"forget"`` / ``"retain"``: ``sum_c lr_c g_z . g_S`` - the first-order drop in S's mean loss caused by the
      steps taken on z (positive = z is a *proponent* of S). Default order: ``"high"`` for forget (samples that
      drove the forget set's fit), ``"low"`` for retain (samples that helped the retain set least or hurt it).

    Without ``checkpoints`` the current model is the only one, with ``lr = 1`` (recorded as
    ``coreset.info["fallback"] = "current model only"``): for ``"self"`` that is GraNd's squared gradient norm.
    ``scope`` picks the parameters (``"last"``, the output layer as in the paper's experiments, by default);
    ``proj_dim`` (with ``seed``) replaces gradients by a seeded Gaussian JL projection, which preserves dot products
    in expectation (the paper's random-projection variant, TracInCP-RP). Checkpoints are loaded into a copy of the
    model, so the caller's model is untouched.

    Cost: per checkpoint, one vectorised forward+backward per forget sample (``torch.func``) plus, for a set
    target, one ordinary backward pass over that set; memory ``batch_size x |params|`` (``x proj_dim`` projected).

    Example:
        >>> ckpts = [(torch.load("epoch1.pt"), 0.1), (torch.load("epoch5.pt"), 0.01)]
        >>> coreset = TracInSelector(checkpoints=ckpts).select(model, forget_loader, fraction=0.1, seed=0)
        >>> coreset.scores  # id -> TracIn self-influence
    """

    default_order = "high"
    forward_only = False

    def __init__(
        self,
        batch_size: int = 64,
        order: str | None = None,
        checkpoints: Sequence[tuple[dict, float]] | None = None,
        target: str = "self",
        scope: str | Sequence[str] = "last",
        proj_dim: int | None = None,
        chunk_size: int | None = None,
    ) -> None:
        if target not in TARGETS:
            raise InvalidConfigError(f"target must be one of {TARGETS}, got {target!r}")
        super().__init__(batch_size=batch_size, order=order or ("low" if target == "retain" else "high"))
        ckpts = []
        for i, item in enumerate(checkpoints or []):
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and hasattr(item[0], "keys")):
                raise InvalidConfigError(
                    f"checkpoints[{i}] must be a (state_dict, learning_rate) pair, got {type(item).__name__}"
                )
            lr = float(item[1])
            if not np.isfinite(lr):
                raise InvalidConfigError(f"checkpoints[{i}] has a non-finite learning rate {item[1]!r}")
            ckpts.append((item[0], lr))
        self.checkpoints = ckpts or None
        self.target = target
        self.scope = scope
        self.proj_dim = proj_dim
        self.chunk_size = chunk_size

    def _select(self, model: nn.Module, forget: IdDataset, task: Task, budget: int, seed: int, **context: Any) -> Coreset:
        info: dict[str, Any] = {}
        coreset = super()._select(model, forget, task, budget, seed, _info=info, **context)
        coreset.info.update(info)
        return coreset

    def _one(self, model: nn.Module, forget: IdDataset, task: Task, target_ds: IdDataset | None, seed: int) -> torch.Tensor:
        params = trainable_params(model, self.scope)
        projector = None
        if self.proj_dim is not None:
            p0 = next(iter(params.values()))
            projector = GaussianProjector([p.numel() for p in params.values()], self.proj_dim, seed, dtype=p0.dtype, device=p0.device)
        direction = None
        if target_ds is not None:
            direction = mean_grad(model, task, target_ds, params, self.batch_size).unsqueeze(0)
            if projector is not None:
                direction = projector.project(direction)
        out = []
        for _, g in iter_per_sample_grads(model, task, forget, params, batch_size=self.batch_size,
                                          chunk_size=self.chunk_size, projector=projector):
            g = g.double()
            out.append((g.pow(2).sum(1) if direction is None else g @ direction[0].double()).cpu())
        return torch.cat(out)

    def score(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, **context: Any) -> np.ndarray:
        info = context.pop("_info", None)
        info = {} if info is None else info
        target_ds = None
        if self.target == "forget":
            target_ds = forget
        elif self.target == "retain":
            retain = context.get("retain")
            if retain is None or len(as_id_dataset(retain)) == 0:
                raise InvalidDataError("tracin target='retain' needs retain data: pass select(..., retain=retain_data)")
            target_ds = as_id_dataset(retain).sorted()
        info.update({"target": self.target, "scope": self.scope if isinstance(self.scope, str) else list(self.scope),
                     "proj_dim": self.proj_dim})
        if not self.checkpoints:
            info["fallback"] = "current model only"
            info["checkpoints"] = 0
            return self._one(model, forget, task, target_ds, seed).numpy()
        info["checkpoints"] = len(self.checkpoints)
        scorer = clone_model(model)
        scorer.eval()
        total = torch.zeros(len(forget), dtype=torch.float64)
        for state, lr in self.checkpoints:
            scorer.load_state_dict(state)
            total += lr * self._one(scorer, forget, task, target_ds, seed)
        return total.numpy()
