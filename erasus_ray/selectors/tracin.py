"""TracIn (Pruthi, Liu, Kale & Sundararajan, NeurIPS 2020, "Estimating Training Data Influence by Tracing
Gradient Descent"), in its checkpoint form TracInCP."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from erasus_ray.data import IdDataset, as_id_dataset
from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.selectors._checks import probe_batch
from erasus_ray.selectors._per_sample import GaussianProjector, iter_per_sample_grads, mean_grad, require_gradients
from erasus_ray.selectors.base import SELECTORS, ScoreSelector, SharedState
from erasus_ray.selectors.gradient_norm import trainable_params
from erasus_ray.tasks import Capability, Task
from erasus_ray.utils import clone_model, model_device

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

    The set target ``g_S`` is set-level: :meth:`shared_state` computes it once over the whole forget set, so a
    sharded (Ray) run gives the single-process scores.

    Cost: per checkpoint, one forward+backward per forget batch (layer factors for Linear / Conv1D / Conv2d /
    LayerNorm scopes, ``torch.func`` per-sample passes otherwise) plus, for a set target, one ordinary backward
    pass over that set; memory ``batch_size x |params|`` (``x proj_dim`` projected).

    Example:
        >>> ckpts = [(torch.load("epoch1.pt"), 0.1), (torch.load("epoch5.pt"), 0.01)]
        >>> coreset = TracInSelector(checkpoints=ckpts).select(model, forget_loader, fraction=0.1, seed=0)
        >>> coreset.scores  # id -> TracIn self-influence
    """

    #: per-sample gradients under vmap (a sample's loss evaluated alone).
    requires = frozenset({Capability.INDEPENDENT})

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

    def _projector(self, params: dict[str, torch.Tensor], seed: int) -> GaussianProjector | None:
        if self.proj_dim is None:
            return None
        p0 = next(iter(params.values()))
        return GaussianProjector([p.numel() for p in params.values()], self.proj_dim, seed, dtype=p0.dtype, device=p0.device)

    def _models(self, model: nn.Module) -> Iterator[tuple[nn.Module, float]]:
        """``(model at checkpoint c, lr_c)``; the current model with lr 1 without checkpoints. Checkpoints load into
        one copy, so the caller's model is untouched."""
        if not self.checkpoints:
            yield model, 1.0
            return
        scorer = clone_model(model)
        scorer.eval()
        for state, lr in self.checkpoints:
            scorer.load_state_dict(state)
            yield scorer, lr

    def shared_state(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, **context: Any) -> SharedState:
        """The set-level target: per checkpoint, the (projected) mean-loss gradient ``g_S`` over the *whole* forget
        set (or the retain set), computed once - a sharded run reuses it on every shard. None for ``"self"``."""
        require_gradients(model, task, probe_batch(forget, task, model_device(model)), trainable_params(model, self.scope), "tracin")
        target_ds = None
        if self.target == "forget":
            target_ds = forget
        elif self.target == "retain":
            retain = context.get("retain")
            if retain is None or len(as_id_dataset(retain)) == 0:
                raise InvalidDataError("tracin target='retain' needs retain data: pass select(..., retain=retain_data)")
            target_ds = as_id_dataset(retain).sorted()
        info: dict[str, Any] = {"target": self.target, "scope": self.scope if isinstance(self.scope, str) else list(self.scope),
                                "proj_dim": self.proj_dim, "checkpoints": len(self.checkpoints or [])}
        if not self.checkpoints:
            info["fallback"] = "current model only"
        directions = None
        if target_ds is not None:
            directions = []
            for scorer, _ in self._models(model):
                params = trainable_params(scorer, self.scope)
                direction = mean_grad(scorer, task, target_ds, params, self.batch_size).unsqueeze(0)
                projector = self._projector(params, seed)
                directions.append((projector.project(direction) if projector is not None else direction)[0].detach())
        return SharedState(directions, info)

    def score(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, *, shared: SharedState | None = None,
              **context: Any) -> np.ndarray:
        state = shared if shared is not None else self.shared_state(model, forget, task, seed, **context)
        total = torch.zeros(len(forget), dtype=torch.float64)
        for c, (scorer, lr) in enumerate(self._models(model)):
            params = trainable_params(scorer, self.scope)
            direction = None if state.value is None else state.value[c].double()
            out = []
            for _, g in iter_per_sample_grads(scorer, task, forget, params, batch_size=self.batch_size,
                                              chunk_size=self.chunk_size, projector=self._projector(params, seed)):
                g = g.double()
                out.append((g.pow(2).sum(1) if direction is None else g @ direction.to(g.device)).cpu())
            total += lr * torch.cat(out)
        return total.numpy()
