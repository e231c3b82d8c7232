"""GraNd: the expected per-sample gradient norm (Paul, Ganguli & Dziugaite, NeurIPS 2021,
"Deep Learning on a Data Diet: Finding Important Examples Early in Training")."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from erasus_ray.data import IdDataset
from erasus_ray.errors import InvalidConfigError
from erasus_ray.selectors._checks import require_gradients, torch_func_errors
from erasus_ray.selectors._factored import factored_grad_sq_norms, factored_supported
from erasus_ray.selectors.base import SELECTORS, ScoreSelector
from erasus_ray.tasks import Capability, Task
from erasus_ray.utils import model_device


def trainable_params(model: nn.Module, scope: str | Sequence[str] = "all") -> dict[str, torch.Tensor]:
    """Named trainable parameters in ``scope``: ``"all"``, ``"last"`` (the parameters of the last module that has
    any, e.g. the output layer), or a list of module-name prefixes."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise InvalidConfigError("the model has no trainable parameters to take gradients of")
    if scope == "all":
        chosen = named
    elif scope == "last":
        # every parameter of the module that owns the last one (e.g. an output layer's weight and bias)
        owner = named[-1][0].rsplit(".", 1)[0] if "." in named[-1][0] else ""
        chosen = [(n, p) for n, p in named if (n.rsplit(".", 1)[0] if "." in n else "") == owner]
    else:
        prefixes = [scope] if isinstance(scope, str) else list(scope)
        chosen = [(n, p) for n, p in named if any(n == q or n.startswith(q + ".") for q in prefixes)]
        if not chosen:
            raise InvalidConfigError(f"no trainable parameters under {prefixes}")
    return {n: p.detach() for n, p in chosen}


def per_sample_grad_norms(
    model: nn.Module,
    task: Task,
    data: Any,
    params: dict[str, torch.Tensor],
    chunk_size: int | None = None,
    method: str = "func",
) -> torch.Tensor:
    """``[B]`` L2 norms of each sample's loss gradient w.r.t. ``params``.

    ``method="func"``: ``torch.func`` (``vmap(grad)``), one vectorised backward per batch - no Python loop over
    samples - for any differentiable model. ``"factored"``: from layer factors in one ordinary backward
    (:mod:`erasus_ray.selectors._factored`; Linear/Conv1D/Conv2d/LayerNorm/Embedding parameters, a weight tied
    between an embedding and a Linear head). ``"auto"``: factored when exact for
    ``params``, else func. Parameters outside ``params`` are held fixed at their current values.
    """
    if method not in ("func", "factored", "auto"):
        raise InvalidConfigError(f"method must be 'auto', 'factored' or 'func', got {method!r}")
    if method != "func":
        supported = factored_supported(model, set(params), norms_only=True, task=task)
        if supported:
            try:
                return factored_grad_sq_norms(model, task, data, set(params)).sqrt().to(torch.float32)
            except ValueError as err:  # found during the forward (a layer run twice, a batch-wide lookup)
                if method == "factored":
                    raise InvalidConfigError(f"method='factored': {err}; use method='auto' or 'func'") from err
        elif method == "factored":
            raise InvalidConfigError(
                "method='factored' needs every parameter in scope to belong to an nn.Linear/Conv1D/Conv2d/LayerNorm/"
                "Embedding layer, shared at most between one embedding and one Linear head; use method='auto' or "
                "'func', or a narrower scope"
            )
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    buffers = dict(model.named_buffers())

    def loss_one(p: dict[str, torch.Tensor], sample: Any) -> torch.Tensor:
        one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, sample)
        args, kwargs = task.functional_inputs(one)
        raw = functional_call(model, ({**fixed, **p}, buffers), args, kwargs)
        return task.dense_sample_loss(raw, one).sum()

    with task.functional_context(model), torch_func_errors("gradient_norm"):
        grads = vmap(grad(loss_one), in_dims=(None, 0), chunk_size=chunk_size)(params, data)
    sq = sum(g.reshape(g.shape[0], -1).float().pow(2).sum(1) for g in grads.values())
    return sq.sqrt()


@SELECTORS.register("gradient_norm")
class GradientNormSelector(ScoreSelector):
    """Score each forget sample by the norm of its loss gradient ``||grad_theta l(x, y)||_2`` (GraNd).

    ``scope`` chooses the parameters: ``"all"`` (the paper's definition, default), ``"last"`` (the output layer,
    DeepCore's cheap variant) or module-name prefixes. Pass ``checkpoints`` to average over several models as in
    the paper; otherwise the current model is the single scorer.

    ``method``: ``"auto"`` (default) computes the norms from layer factors in one ordinary forward+backward
    when every parameter in scope is an unshared Linear/Conv1D weight or bias (MLP heads, GPT-2 blocks with
    ``scope`` excluding the tied embedding); otherwise ``torch.func`` per-sample gradients (``"func"``).

    Cost: factored - about one training step per batch (see ``benchmarks/selector_scoring``); ``torch.func`` -
    one vectorised forward+backward per sample, ~0.1-0.2x training throughput on CPU (STACK.md), memory per
    chunk ``chunk_size x |params|``.

    Example:
        >>> coreset = GradientNormSelector(scope="last").select(model, forget_loader, k=20)
    """

    #: per-sample gradient norms (vmap or layer factors: a sample's loss evaluated alone).
    requires = frozenset({Capability.INDEPENDENT})

    default_order = "high"
    forward_only = False

    def __init__(
        self,
        batch_size: int = 64,
        order: str | None = None,
        scope: str | Sequence[str] = "all",
        chunk_size: int | None = None,
        checkpoints: Sequence[dict] | None = None,
        method: str = "auto",
    ) -> None:
        super().__init__(batch_size=batch_size, order=order)
        if method not in ("func", "factored", "auto"):
            raise InvalidConfigError(f"gradient_norm: method must be 'auto', 'factored' or 'func', got {method!r}")
        self.method = method
        self.scope = scope
        self.chunk_size = chunk_size
        self.checkpoints = list(checkpoints) if checkpoints else None

    def _scores_for(self, model: nn.Module, forget: IdDataset, task: Task) -> np.ndarray:
        params = trainable_params(model, self.scope)
        device = model_device(model)
        out = []
        for i, batch in enumerate(self.loader(forget, task)):
            if i == 0:
                require_gradients(model, task, batch.to(device).data, params, self.name)
            norms = per_sample_grad_norms(model, task, batch.to(device).data, params, self.chunk_size, method=self.method)
            out.append(norms.detach().cpu())
        return torch.cat(out).numpy()

    def score(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, **context: Any) -> np.ndarray:
        if not self.checkpoints:
            return self._scores_for(model, forget, task)
        original = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            total = np.zeros(len(forget))
            for state in self.checkpoints:
                model.load_state_dict(state)
                total += self._scores_for(model, forget, task)
            return total / len(self.checkpoints)
        finally:
            model.load_state_dict(original)
