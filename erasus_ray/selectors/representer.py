"""Representer points (Yeh, Kim, Yen & Ravikumar, NeurIPS 2018, "Representer Point Selection for Explaining
Deep Neural Networks")."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from erasus_ray.data import IdDataset, as_id_dataset
from erasus_ray.errors import InvalidConfigError
from erasus_ray.selectors.base import SELECTORS, Coreset, ScoreSelector
from erasus_ray.tasks import Capability, Task
from erasus_ray.tasks.base import TaskOutput
from erasus_ray.utils import model_device

IMPORTANCE = ("norm", "label")


@SELECTORS.register("representer")
class RepresenterSelector(ScoreSelector):
    """Score each forget sample by the size of its representer value.

    Yeh et al. write a model whose last layer is linear (trained with an L2 penalty ``lambda ||W||^2`` to a
    stationary point) as ``Phi(x_t) = sum_i alpha_i f_i^T f_t`` with penultimate features ``f_i`` and
    representer weights ``alpha_i = -1/(2 lambda n) dL(x_i, y_i)/dPhi(x_i)`` (one per class). The contribution of
    training point ``i`` to any prediction is ``alpha_i f_i^T f_t``, bounded by ``||alpha_i|| ||f_i|| ||f_t||``, so
    the global importance used here is

    * ``importance="norm"`` (default): ``||alpha_i||_2 * ||f_i||_2`` - the largest pull ``i`` can exert on a
      prediction of unit-norm features;
    * ``importance="label"``: ``|alpha_{i, y_i}| * ||f_i||_2`` - the weight on ``i``'s own label only.

    For a causal LM the "logits" are the per-token logits of the sample's supervised tokens, ``alpha`` stacks one
    row per token (the sample's loss is the mean over its tokens, so each row carries ``1/T``) and its Frobenius
    norm is used; ``f_i`` comes from the task adapter (``task.forward(..., features=True)``: the mean final hidden
    state over the supervised positions). The model is taken as it is (the paper first fine-tunes the last layer
    with the L2 penalty to a stationary point; we do not). ``l2`` (lambda) and ``n_train`` (n: the training-set
    size, by default ``len(forget) + len(retain)`` when ``retain=`` is given, else ``len(forget)``) only rescale
    all scores by ``1/(2 lambda n)``: they change ``coreset.scores``, never the ranking. No randomness (``seed``
    is unused).

    Cost: one forward pass per sample (with a hook for the features) and the gradient of the loss w.r.t. the
    logits only - no parameter gradients.

    Example:
        >>> sel = RepresenterSelector(l2=1e-3)
        >>> coreset = sel.select(model, forget_loader, retain=retain_loader, fraction=0.1)
        >>> coreset.scores  # id -> ||alpha_i|| * ||f_i||
    """

    #: representer values: the loss gradient w.r.t. the logits times the features.
    requires = frozenset({Capability.LOGITS, Capability.FEATURES})

    default_order = "high"
    forward_only = True

    def __init__(
        self, batch_size: int = 128, order: str | None = None, l2: float = 1e-3, n_train: int | None = None,
        importance: str = "norm",
    ) -> None:
        super().__init__(batch_size=batch_size, order=order)
        if not float(l2) > 0:
            raise InvalidConfigError(f"l2 (lambda) must be > 0, got {l2!r}")
        if importance not in IMPORTANCE:
            raise InvalidConfigError(f"importance must be one of {IMPORTANCE}, got {importance!r}")
        if n_train is not None and (isinstance(n_train, bool) or not isinstance(n_train, (int, np.integer)) or n_train < 1):
            raise InvalidConfigError(f"n_train must be a positive integer, got {n_train!r}")
        self.l2 = float(l2)
        self.n_train = n_train
        self.importance = importance

    def _select(self, model: nn.Module, forget: IdDataset, task: Task, budget: int, seed: int, **context: Any) -> Coreset:
        info: dict[str, Any] = {}
        coreset = super()._select(model, forget, task, budget, seed, _info=info, **context)
        coreset.info.update(info)
        return coreset

    def representer_weights(self, model: nn.Module, data: Any, task: Task, n: int) -> tuple[TaskOutput, torch.Tensor]:
        """The forward output (with features) and ``alpha`` per prediction unit ``[N, C]`` for one batch."""
        with torch.no_grad():
            out = task.forward(model, data, features=True)
        if out.features is None:
            raise InvalidConfigError(f"task {task!r} returned no features; representer needs penultimate features")
        logits = out.logits.detach().float().requires_grad_(True)
        with torch.enable_grad():
            loss = TaskOutput(logits, out.targets, out.owner, out.batch_size).sample_loss().sum()
            (dlogits,) = torch.autograd.grad(loss, logits)
        return out, -dlogits / (2.0 * self.l2 * n)

    def score(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, **context: Any) -> np.ndarray:
        info = context.pop("_info", None)
        info = {} if info is None else info
        retain = context.get("retain")
        n = self.n_train or (len(forget) + (len(as_id_dataset(retain)) if retain is not None else 0))
        info.update({"l2": self.l2, "n_train": int(n), "importance": self.importance})
        device = model_device(model)
        scores = []
        for b in self.loader(forget, task):
            out, alpha = self.representer_weights(model, b.to(device).data, task, n)
            if self.importance == "norm":
                unit = alpha.pow(2).sum(-1)
            else:
                unit = alpha.gather(1, out.targets.unsqueeze(1)).squeeze(1).pow(2)
            per_sample = torch.zeros(out.batch_size, dtype=unit.dtype, device=unit.device).index_add(0, out.owner, unit)
            feats = out.features.detach().float().reshape(out.batch_size, -1)
            scores.append((per_sample.sqrt() * feats.norm(dim=1)).double().cpu())
        return torch.cat(scores).numpy()
