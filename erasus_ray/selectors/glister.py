"""GLISTER (Killamsetty et al., AAAI 2021, "GLISTER: Generalization based Data Subset Selection for Efficient and
Robust Learning"): greedy selection maximising a Taylor approximation of the validation log-likelihood after a
gradient step on the subset (GLISTER-ONLINE, last-layer approximation)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from erasus_ray.data import IdDataset, as_id_dataset
from erasus_ray.errors import InvalidConfigError
from erasus_ray.selectors._embeddings import _batches, _features_of, gradient_factors, score_map, to_numpy_ids
from erasus_ray.selectors.base import SELECTORS, Coreset, Selector
from erasus_ray.selectors.submodular import greedy_scores, maximize
from erasus_ray.tasks import Capability, Task


class _ValidationSet:
    """Validation prediction units (logits, targets, owner sample) and sample features, for last-layer updates."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, data: IdDataset, task: Task, batch_size: int, bias: bool = False) -> None:
        logits, targets, owner, feats = [], [], [], []
        offset = 0
        for out in _batches(model, data, task, batch_size):
            logits.append(out.logits.detach().double())
            targets.append(out.targets)
            owner.append(out.owner + offset)
            feats.append(_features_of(out).double())
            offset += out.batch_size
        self.logits = torch.cat(logits)
        self.targets = torch.cat(targets)
        self.owner = torch.cat(owner)
        self.features = _with_bias(torch.cat(feats), bias)
        self.m = offset
        self.counts = torch.bincount(self.owner, minlength=self.m).clamp_min(1).double()

    def errors_and_loss(self, delta: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Per-sample mean error ``softmax - onehot`` ``[m, C]`` and mean loss, with sample logit shifts ``delta``."""
        z = self.logits + delta[self.owner]
        logp = z.log_softmax(-1)
        unit_loss = F.nll_loss(logp, self.targets, reduction="none")
        e = logp.exp()
        e[torch.arange(len(e), device=e.device), self.targets] -= 1.0
        acc = torch.zeros(self.m, e.shape[1], dtype=e.dtype, device=e.device).index_add_(0, self.owner, e)
        per_sample = torch.zeros(self.m, dtype=e.dtype, device=e.device).index_add_(0, self.owner, unit_loss)
        return acc / self.counts[:, None], float((per_sample / self.counts).mean())


def _with_bias(features: torch.Tensor, bias: bool) -> torch.Tensor:
    """``[f, 1]`` when the output layer has a bias: its gradient ``e`` is the weight gradient's column for a constant
    input 1, so a step on ``[W, b]`` moves logits by ``-lr (f_v . f_s + 1) e_s``."""
    if not bias:
        return features
    return torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype, device=features.device)], 1)


def head_has_bias(model: nn.Module, task: Task) -> bool:
    """Whether the task's output layer (``task.head_module``, classifiers) has a bias; False when the task does not
    name its head (an LM's tied ``lm_head`` has none)."""
    if not task.provides("head"):
        return False
    return getattr(task.head_module(model), "bias", None) is not None


class GlisterObjective:
    """The GLISTER greedy objective over the forget rows, in the last-layer (``W``) approximation.

    With ``S`` chosen, the model is ``W_S = W - lr sum_{s in S} e_s f_s^T`` (one gradient step on ``S``), which
    moves validation sample ``v``'s logits by ``-lr sum_s (f_v . f_s) e_s``. (With an output bias ``f`` carries a
    trailing 1, so ``W`` stands for ``[W, b]``.) The gain of row ``j`` is the
    first-order increase of the validation log-likelihood from a further step on ``j``:
    ``lr <e_j f_j^T, grad_W L_val(W_S)> = lr e_j^T G_val f_j`` with ``G_val = mean_v e_v(W_S) f_v^T``.
    Same interface as :class:`~erasus_ray.selectors.submodular.SetFunction` (not submodular, so no lazy greedy).
    """

    def __init__(self, errors: torch.Tensor, features: torch.Tensor, val: _ValidationSet, lr: float) -> None:
        self.e = errors.double()
        self.f = features.double()
        self.val = val
        self.lr = None if lr is None else float(lr)
        self.n = len(errors)
        self.value = 0.0
        self.delta = torch.zeros(val.m, self.e.shape[1], dtype=torch.float64, device=self.e.device)
        self._refresh()
        self.initial_loss = self.loss

    def _refresh(self) -> None:
        ev, self.loss = self.val.errors_and_loss(self.delta)
        self.g_val = ev.T @ self.val.features / self.val.m  # [C, D] gradient of the validation loss w.r.t. W

    def gains(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        e, f = self.e, self.f
        if idx is not None:
            idx = torch.as_tensor(idx).to(e.device)
            e, f = e[idx], f[idx]
        return self.lr * ((e @ self.g_val) * f).sum(1)

    def gain(self, j: int) -> float:
        return float(self.lr * (self.e[j] @ self.g_val @ self.f[j]))

    def add(self, j: int) -> float:
        gain = self.gain(j)
        self.delta -= self.lr * (self.val.features @ self.f[j])[:, None] * self.e[j][None, :]
        self._refresh()
        self.value += gain
        return gain


@SELECTORS.register("glister")
class GlisterSelector(Selector):
    """GLISTER: greedily add the forget sample whose gradient step most increases the (first-order) validation
    log-likelihood, with the validation gradient re-evaluated after a step on the samples chosen so far
    (``lr``: the step size of that simulated step; default ``0.1 / mean ||[f, 1]||^2`` over the forget features (``[f]`` without an output bias), so the
    step stays in the Taylor approximation's range whatever the feature scale). Gradients are taken w.r.t. the
    output layer - its weight and, when it has one, its bias, as in the paper's last-layer approximation (and its
    CORDS code, which always includes the bias gradient) - in closed form: ``(softmax - onehot) (x) [features, 1]``.

    Validation data: ``select(..., validation=...)``, else the constructor's ``validation``, else the retain set
    passed as ``select(..., retain=...)`` (the unlearner does this); neither raises ``InvalidConfigError``. At most
    ``max_validation`` validation samples are used (a ``seed``-ed subsample of the id-sorted set).
    ``optimizer="naive"`` (default) or ``"stochastic"`` (``epsilon``, ``seed``); not lazy (not submodular).

    Note for unlearning: a high gain means a descent step on that forget sample *helps* the validation set - the
    forget samples most entangled with the retained knowledge.

    ``Coreset.scores``: each chosen id's gain when it was picked, others' gain given the final set.
    ``info``: ``objective`` (summed Taylor gains), ``validation_loss_before`` / ``_after`` (exact in the last-layer
    model after the simulated step), ``validation_size``.

    Cost: forward passes over forget and validation; per pick a softmax over the validation units and
    ``O(n C D)`` for the gains.

    Example:
        >>> coreset = GlisterSelector().select(model, forget_loader, fraction=0.1, retain=retain_loader)
        >>> coreset.info["validation_loss_after"]
    """

    #: last-layer gradient factors (softmax error x features) against a validation set; a head's bias where declared.
    requires = frozenset({Capability.LOGITS, Capability.FEATURES})

    #: Like ``Strategy.needs_retain``: ``select`` needs ``retain=`` (or ``validation=``) context.
    needs_retain: ClassVar[bool] = True

    def __init__(
        self,
        batch_size: int = 128,
        validation: Any = None,
        lr: float | None = None,
        optimizer: str = "naive",
        epsilon: float = 0.01,
        max_validation: int | None = 1000,
    ) -> None:
        super().__init__(batch_size=batch_size)
        if optimizer not in ("naive", "stochastic"):
            raise InvalidConfigError(f"glister optimizer must be 'naive' or 'stochastic' (it is not submodular), got {optimizer!r}")
        if lr is not None and not float(lr) > 0:
            raise InvalidConfigError(f"lr must be > 0 (or None for automatic), got {lr!r}")
        if max_validation is not None and int(max_validation) < 1:
            raise InvalidConfigError(f"max_validation must be a positive integer or None, got {max_validation!r}")
        self.validation = validation
        self.lr = None if lr is None else float(lr)
        self.optimizer = optimizer
        self.epsilon = float(epsilon)
        self.max_validation = None if max_validation is None else int(max_validation)

    def validation_set(self, seed: int, context: dict[str, Any]) -> IdDataset:
        source = context.get("validation")
        if source is None:
            source = self.validation
        if source is None:
            source = context.get("retain")
        if source is None:
            raise InvalidConfigError(
                "glister needs validation data: pass select(..., validation=...) or GlisterSelector(validation=...), "
                "or the retain set as select(..., retain=...)"
            )
        val = as_id_dataset(source).sorted()
        if len(val) == 0:
            raise InvalidConfigError("glister: the validation set is empty")
        if self.max_validation is not None and len(val) > self.max_validation:
            keep = np.sort(np.random.default_rng(seed).choice(len(val), self.max_validation, replace=False))
            val = val.subset(val.ids[keep])
        return val

    def _select(self, model: nn.Module, forget: IdDataset, task: Task, budget: int, seed: int, **context: Any) -> Coreset:
        val_data = self.validation_set(seed, context)
        errors, feats = gradient_factors(model, forget, task, self.batch_size)
        bias = head_has_bias(model, task)
        feats = _with_bias(feats.double(), bias)
        val = _ValidationSet(model, val_data, task, self.batch_size, bias=bias)
        # Default step: 0.1 / mean ||f||^2 (f with the bias's 1), so one step moves a sample's own logits by at most ~0.1 ||e|| (the
        # Taylor approximation stays local whatever the feature scale; 0.01 overshoots on digits: 27-norm features).
        lr = self.lr if self.lr is not None else 0.1 / max(float(feats.double().pow(2).sum(1).mean()), 1e-12)
        fn = GlisterObjective(errors, feats, val, lr)
        rows, gains, evals = maximize(fn, budget, self.optimizer, epsilon=self.epsilon, seed=seed)  # type: ignore[arg-type]
        return Coreset(
            ids=to_numpy_ids(forget, rows),
            weights=np.full(budget, len(forget) / budget),
            scores=score_map(forget, greedy_scores(fn, rows, gains)),  # type: ignore[arg-type]
            info={
                "objective": fn.value,
                "gains": gains,
                "validation_loss_before": fn.initial_loss,
                "validation_loss_after": fn.loss,
                "validation_size": val.m,
                "optimizer": self.optimizer,
                "lr": lr,
                "output_bias": bias,
            },
        )
