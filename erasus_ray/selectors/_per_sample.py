"""Streamed per-sample gradients (``torch.func``: ``functional_call`` + ``vmap(grad)``), optionally JL-projected.

Shared by the gradient-based selectors (influence, TracIn). Everything goes through the task adapter
(``task.functional_inputs`` / ``task.functional_context`` / ``task.dense_sample_loss``), so the same code serves
classifiers and causal LMs. When every parameter in scope belongs to a Linear / Conv1D / Conv2d / LayerNorm layer
the gradients come from layer factors in one ordinary backward per batch (:mod:`erasus_ray.selectors._factored`,
about a training step) instead of ``torch.func``'s per-sample passes; both give the same numbers.

Every gradient-based selector first runs :func:`~erasus_ray.selectors._checks.require_gradients` (re-exported
here), and ``torch.func`` failures surface through :func:`~erasus_ray.selectors._checks.torch_func_errors`.
:func:`fisher_gradients` gives per-sample gradients with labels sampled from the model (or all labels, weighted),
the rows of a Gauss-Newton / true-Fisher estimate.

Memory: gradients are formed one loader batch at a time (``batch_size x |params|``, or ``chunk_size x |params|``
inside ``vmap`` when ``chunk_size`` is set) and, with ``proj_dim``, projected before the next batch is formed, so the
full ``n x |params|`` gradient matrix of the forget set is never materialised; the result is ``n x proj_dim``.
The Gaussian projection is generated in seeded row blocks (one stream per parameter and block), so it is the same
for any batch order and can be regenerated instead of cached when ``|params| x proj_dim`` is large.

Reference: Johnson & Lindenstrauss (1984); projected per-sample gradients as in TRAK (Park et al., ICML 2023)
and LoGra (Choe et al., 2024).

Example:
    >>> from erasus_ray.selectors._per_sample import per_sample_gradients
    >>> G = per_sample_gradients(model, task, forget_ids_dataset, scope="last", proj_dim=256, seed=0)
    >>> G.shape  # (len(forget), 256), rows aligned with the IdDataset rows
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vjp, vmap
from torch.utils._pytree import tree_map

from erasus_ray.data import IdDataset, make_loader
from erasus_ray.errors import InvalidConfigError
from erasus_ray.selectors._checks import require_gradients, torch_func_errors
from erasus_ray.selectors._factored import factored_backward, factored_supported
from erasus_ray.selectors.gradient_norm import trainable_params
from erasus_ray.tasks import Task
from erasus_ray.tasks.base import TaskOutput
from erasus_ray.utils import model_device

__all__ = [
    "FISHER_LABELS",
    "FunctionalLoss",
    "GaussianProjector",
    "batch_grads",
    "fisher_gradients",
    "fisher_losses",
    "flatten",
    "iter_per_sample_grads",
    "mean_grad",
    "per_sample_gradients",
    "require_gradients",
    "torch_func_errors",
    "unflatten",
]

#: Labels of a Fisher / Gauss-Newton estimate: every class weighted by the model's probability (exact, one unit per
#: sample), labels drawn from the model (Monte Carlo), or the data labels (the empirical Fisher, a biased proxy).
FISHER_LABELS = ("expected", "mc", "empirical")


def flatten(grads: dict[str, torch.Tensor], batch_dims: int = 1) -> torch.Tensor:
    """Concatenate a dict of ``[*batch, *shape]`` tensors into ``[*batch, D]`` (dict order = parameter order)."""
    return torch.cat([g.reshape(*g.shape[:batch_dims], -1) for g in grads.values()], dim=-1)


def unflatten(vec: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten` for the trailing dimension: ``[..., D]`` -> dict of ``[..., *shape]`` views."""
    out, offset = {}, 0
    lead = vec.shape[:-1]
    for name, p in like.items():
        n = p.numel()
        out[name] = vec[..., offset : offset + n].reshape(*lead, *p.shape)
        offset += n
    if offset != vec.shape[-1]:
        raise ValueError(f"vector of size {vec.shape[-1]} does not match parameters of total size {offset}")
    return out


class FunctionalLoss:
    """The task's per-sample loss as a pure function of the parameters in ``params`` (others held fixed).

    ``batch(p, data)`` is ``[B]`` on a whole batch; ``one(p, sample)`` is a scalar on one (un-batched) sample and
    is what ``vmap(grad(...))`` maps over. Call both inside ``task.functional_context(model)``.
    """

    def __init__(self, model: nn.Module, task: Task, params: dict[str, torch.Tensor]) -> None:
        self.model = model
        self.task = task
        self.params = params
        self.fixed = {n: p.detach() for n, p in model.named_parameters() if n not in params}
        self.buffers = dict(model.named_buffers())

    def batch(self, p: dict[str, torch.Tensor], data: Any) -> torch.Tensor:
        args, kwargs = self.task.functional_inputs(data)
        raw = functional_call(self.model, ({**self.fixed, **p}, self.buffers), args, kwargs)
        return self.task.dense_sample_loss(raw, data)

    def one(self, p: dict[str, torch.Tensor], sample: Any) -> torch.Tensor:
        one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, sample)
        return self.batch(p, one).sum()

    def flat_sum(self, flat: torch.Tensor, data: Any) -> torch.Tensor:
        """Summed loss of a batch as a function of the flattened parameter vector (for Hessians)."""
        return self.batch(unflatten(flat, self.params), data).sum()


def batch_grads(
    model: nn.Module, task: Task, data: Any, params: dict[str, torch.Tensor], chunk_size: int | None = None,
    loss: FunctionalLoss | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample loss gradients of one batch: dict ``name -> [B, *param.shape]`` (one vectorised backward)."""
    loss = loss or FunctionalLoss(model, task, params)
    with task.functional_context(model), torch_func_errors("per-sample gradients"):
        return vmap(grad(loss.one), in_dims=(None, 0), chunk_size=chunk_size)(params, data)


def gradient_method(model: nn.Module, params: dict[str, torch.Tensor], method: str = "auto", task: Task | None = None) -> str:
    """``"factored"`` when every parameter is an unshared Linear/Conv1D/Conv2d/LayerNorm weight or bias (and
    ``method`` allows it), else ``"func"``."""
    if method not in ("auto", "factored", "func"):
        raise InvalidConfigError(f"gradient method must be 'auto', 'factored' or 'func', got {method!r}")
    if method == "func":
        return "func"
    if factored_supported(model, set(params), task=task):
        return "factored"
    if method == "factored":
        raise InvalidConfigError("method='factored' needs every parameter in scope to be an unshared Linear/Conv1D/Conv2d/LayerNorm parameter")
    return "func"


def mean_grad(
    model: nn.Module, task: Task, dataset: IdDataset, params: dict[str, torch.Tensor], batch_size: int = 128
) -> torch.Tensor:
    """Flat gradient ``[D]`` of the *mean* per-sample loss over ``dataset`` (ordinary batched backward passes)."""
    loss = FunctionalLoss(model, task, params)
    device = model_device(model)
    total = None
    with task.functional_context(model):
        for b in make_loader(dataset, task.collate, batch_size=batch_size, shuffle=False):
            g = flatten(grad(lambda p, d: loss.batch(p, d).sum())(params, b.to(device).data), batch_dims=0)
            total = g if total is None else total + g
    return total / len(dataset)


class GaussianProjector:
    """A seeded Gaussian JL map ``R^D -> R^k`` with entries ``N(0, 1/k)``, so ``E ||P^T g||^2 = ||g||^2``.

    The matrix is built from row blocks, each drawn from its own generator seeded by ``(seed, param index, block)``:
    the same seed always gives the same map. Blocks are cached when ``D * k <= cache_limit`` floats, otherwise
    regenerated for each projected batch (slower, but memory stays ``block_rows x k``).
    """

    def __init__(
        self, sizes: Sequence[int], proj_dim: int, seed: int = 0, *, dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu", block_rows: int = 65536, cache_limit: int = 1 << 26,
    ) -> None:
        if isinstance(proj_dim, bool) or not isinstance(proj_dim, (int, np.integer)) or proj_dim < 1:
            raise InvalidConfigError(f"proj_dim must be a positive integer, got {proj_dim!r}")
        self.sizes = [int(s) for s in sizes]
        self.dim = sum(self.sizes)
        self.proj_dim = int(proj_dim)
        self.seed = int(seed)
        self.dtype = dtype
        self.device = torch.device(device)
        self.block_rows = int(block_rows)
        self.cache = self.dim * self.proj_dim <= cache_limit
        self._blocks: dict[tuple[int, int], torch.Tensor] = {}

    def _block(self, param: int, block: int, rows: int) -> torch.Tensor:
        key = (param, block)
        if key in self._blocks:
            return self._blocks[key]
        state = np.random.SeedSequence([self.seed, param, block]).generate_state(1, dtype=np.uint64)[0]
        gen = torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))
        mat = torch.randn(rows, self.proj_dim, generator=gen, dtype=torch.float32) / np.sqrt(self.proj_dim)
        mat = mat.to(device=self.device, dtype=self.dtype)
        if self.cache:
            self._blocks[key] = mat
        return mat

    def project(self, flat: torch.Tensor) -> torch.Tensor:
        """``[B, D] -> [B, k]``."""
        if flat.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of size {self.dim}, got {flat.shape[-1]}")
        out = torch.zeros(*flat.shape[:-1], self.proj_dim, dtype=self.dtype, device=flat.device)
        offset = 0
        for i, size in enumerate(self.sizes):
            for j, start in enumerate(range(0, size, self.block_rows)):
                rows = min(self.block_rows, size - start)
                part = flat[..., offset + start : offset + start + rows].to(self.dtype)
                out = out + part @ self._block(i, j, rows).to(flat.device)
            offset += size
        return out


def iter_per_sample_grads(
    model: nn.Module, task: Task, dataset: IdDataset, params: dict[str, torch.Tensor], *,
    batch_size: int = 64, chunk_size: int | None = None, projector: GaussianProjector | None = None,
    method: str = "auto",
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first_row, [B, d])`` per loader batch over ``dataset`` in row order (``d = D`` or ``proj_dim``).

    ``method``: ``"auto"`` uses layer factors when :func:`gradient_method` allows (falling back to ``torch.func``
    if a layer runs twice per forward), ``"func"`` always ``torch.func``.
    """
    device = model_device(model)
    loss = FunctionalLoss(model, task, params)
    how = gradient_method(model, params, method, task)
    names = list(params)
    row = 0
    for b in make_loader(dataset, task.collate, batch_size=batch_size, shuffle=False):
        data = b.to(device).data
        grads = None
        if how == "factored":
            try:
                grads = factored_backward(model, task, data, names)[1][0]
            except ValueError:  # a layer ran twice (shared / recurrent use): cross terms need torch.func
                how = "func"
        if grads is None:
            grads = batch_grads(model, task, data, params, chunk_size, loss=loss)
        flat = flatten(grads).detach()
        if projector is not None:
            flat = projector.project(flat)
        yield row, flat
        row += flat.shape[0]


def _seeded_generator(device: torch.device, *key: int) -> torch.Generator:
    state = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0]) & ((1 << 63) - 1)
    return torch.Generator(device=device).manual_seed(state)


def _one_unit_per_sample(out: TaskOutput) -> bool:
    return out.logits.shape[0] == out.batch_size and bool(
        torch.equal(out.owner, torch.arange(out.batch_size, device=out.owner.device))
    )


def fisher_gradients(
    model: nn.Module, task: Task, data: Any, params: dict[str, torch.Tensor], *, labels: str, draws: int = 1,
    seed: int = 0, batch_index: int = 0, chunk_size: int | None = None, method: str = "auto",
) -> tuple[torch.Tensor, float]:
    """Rows ``[B, R, D]`` and a weight ``w`` such that ``w * sum_{b, r} g_br g_br^T`` estimates the batch's summed
    Gauss-Newton matrix ``sum_b sum_u w_u J_u^T (diag p_u - p_u p_u^T) J_u`` (``J_u``: Jacobian of unit ``u``'s logits
    w.r.t. ``params``; ``w_u``: the unit's weight in the sample loss, ``1/T`` for an LM's mean over ``T`` tokens).
    For softmax cross-entropy this matrix is also the true Fisher, and it equals the Hessian wherever the logits
    are linear in ``params`` (a Linear head, the final LayerNorm under an untouched LM head).

    ``labels``:

    * ``"expected"``: ``R = C`` rows ``sqrt(p_c) (p - e_c)`` pulled back through ``J`` - every class weighted by
      its probability: exact, one unit per sample only (classifiers);
    * ``"mc"``: ``R = draws`` rows ``sum_u sqrt(w_u) J_u^T (p_u - e_{y_u})`` with ``y_u ~ p_u`` (seeded by ``seed``
      and ``batch_index``): unbiased, since the labels of different units are independent and zero-mean;
    * ``"empirical"``: ``R = 1``, the data-label gradients (the empirical Fisher; biased, not a Gauss-Newton matrix).

    Cost: one forward and ``R`` backward passes of the batch (layer factors when supported, else ``torch.func``).
    """
    if labels not in FISHER_LABELS:
        raise InvalidConfigError(f"fisher labels must be one of {FISHER_LABELS}, got {labels!r}")
    if labels == "empirical":
        loss = FunctionalLoss(model, task, params)
        if gradient_method(model, params, method, task) == "factored":
            try:
                return flatten(factored_backward(model, task, data, list(params))[1][0]).detach()[:, None], 1.0
            except ValueError:
                pass
        return flatten(batch_grads(model, task, data, params, chunk_size, loss=loss)).detach()[:, None], 1.0
    draws = int(draws)
    if draws < 1:
        raise InvalidConfigError(f"fisher_samples must be >= 1, got {draws!r}")
    if gradient_method(model, params, method, task) == "factored":
        try:
            return _fisher_factored(model, task, data, params, labels, draws, seed, batch_index)
        except ValueError as err:
            if "ran more than once" not in str(err):
                raise
    return _fisher_func(model, task, data, params, labels, draws, seed, batch_index, chunk_size)


def _expected_only_classifiers() -> InvalidConfigError:
    return InvalidConfigError(
        "fisher='expected' enumerates the classes of one prediction unit per sample (classifiers); this task has "
        "several units per sample (an LM's tokens): use fisher='mc'"
    )


def fisher_losses(out: TaskOutput, labels: str, draws: int, seed: int, batch_index: int) -> tuple[list[torch.Tensor], float]:
    """Scalar losses (sums over the batch) whose gradients are the rows of :func:`fisher_gradients`, and their
    weight. Their gradients w.r.t. the unit logits are ``sqrt(w_u p_uc) (p_u - e_c)`` for every class (``"expected"``),
    ``sqrt(w_u) (p_u - e_{y_u})`` with ``y_u ~ p_u`` (``"mc"``), or the data loss (``"empirical"``)."""
    if labels == "empirical":
        return [out.sample_loss().sum()], 1.0
    logits = out.logits if out.logits.dtype in (torch.float32, torch.float64) else out.logits.float()
    logp = logits.log_softmax(-1)
    p = logp.detach().exp()
    counts = torch.bincount(out.owner, minlength=out.batch_size).clamp_min(1).to(p.dtype)
    scale = counts[out.owner].rsqrt()  # sqrt(w_u) with w_u = 1 / (units of the sample): the mean over units
    if labels == "expected":
        if not _one_unit_per_sample(out):
            raise _expected_only_classifiers()
        # d/dz of -sqrt(p_c) log p_c(z) is sqrt(p_c) (p - e_c)
        return [-(scale * p[:, c].sqrt() * logp[:, c]).sum() for c in range(p.shape[1])], 1.0
    gen = _seeded_generator(p.device, seed, 7, batch_index)
    ys = torch.multinomial(p.float(), draws, replacement=True, generator=gen)  # [units, draws]
    return [-(scale * logp.gather(1, ys[:, s : s + 1]).squeeze(1)).sum() for s in range(draws)], 1.0 / draws


def _fisher_factored(model, task, data, params, labels, draws, seed, batch_index):
    weight = []

    def losses(out: TaskOutput) -> list[torch.Tensor]:
        items, w = fisher_losses(out, labels, draws, seed, batch_index)
        weight.append(w)
        return items

    _, per = factored_backward(model, task, data, list(params), losses)
    rows = torch.stack([flatten(g).detach() for g in per], dim=1)  # [B, R, D]
    return rows, weight[0]


def _fisher_func(model, task, data, params, labels, draws, seed, batch_index, chunk_size):
    loss = FunctionalLoss(model, task, params)
    with task.functional_context(model), torch_func_errors("Fisher / Gauss-Newton gradients"):
        with torch.no_grad():
            args, kwargs = task.functional_inputs(data)
            z, _, _ = task.dense_units(functional_call(model, ({**loss.fixed, **params}, loss.buffers), args, kwargs), data)
        b, u, c = z.shape
        if labels == "expected" and u != 1:
            raise _expected_only_classifiers()
        if labels == "mc":
            gen = _seeded_generator(z.device, seed, 7, batch_index)
            ys = torch.multinomial(z.double().softmax(-1).reshape(b * u, c).float(), draws, replacement=True, generator=gen)
            ys = ys.reshape(b, u, draws).permute(0, 2, 1)  # [B, draws, U]
        else:
            ys = torch.zeros(b, 1, 1, dtype=torch.long, device=z.device)  # unused

        def one(p: dict[str, torch.Tensor], sample: Any, y: torch.Tensor) -> dict[str, torch.Tensor]:
            single = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, sample)

            def unit_logits(q: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
                a, k = task.functional_inputs(single)
                logits, _, weights = task.dense_units(functional_call(model, ({**loss.fixed, **q}, loss.buffers), a, k), single)
                return logits[0], weights[0]

            logits, pull, weights = vjp(unit_logits, p, has_aux=True)
            prob = logits.detach().softmax(-1)  # [U, C]
            classes = torch.arange(c, device=prob.device)
            if labels == "expected":
                eye = (classes[:, None] == classes[None, :]).to(prob.dtype)  # [C, C]
                cot = (weights.detach()[0] * prob[0]).sqrt()[:, None, None] * (prob[None] - eye[:, None, :])  # [C, 1, C]
            else:
                onehot = (y[..., None] == classes).to(prob.dtype)  # [draws, U, C]
                cot = weights.detach().sqrt()[None, :, None] * (prob[None] - onehot)
            return vmap(pull)(cot)[0]

        grads = vmap(one, in_dims=(None, 0, 0), chunk_size=chunk_size)(params, data, ys)
    rows = torch.cat([g.reshape(g.shape[0], g.shape[1], -1) for g in grads.values()], dim=-1).detach()
    return rows, (1.0 if labels == "expected" else 1.0 / draws)


def per_sample_gradients(
    model: nn.Module, task: Task, dataset: IdDataset, *, scope: str | Sequence[str] = "last",
    proj_dim: int | None = None, seed: int = 0, batch_size: int = 64, chunk_size: int | None = None,
    params: dict[str, torch.Tensor] | None = None, method: str = "auto",
) -> torch.Tensor:
    """``[n, d]`` per-sample loss gradients, rows aligned with ``dataset``'s rows.

    ``scope``: ``"last"`` (output layer, default), ``"all"`` or module-name prefixes (see
    :func:`~erasus_ray.selectors.gradient_norm.trainable_params`); ``params`` overrides it. With ``proj_dim`` each
    batch is projected by a seeded Gaussian JL map (``seed``) before the next one is formed: peak memory depends on
    ``batch_size`` / ``chunk_size``, not on ``len(dataset)``.

    Cost: one vectorised forward+backward per sample (``vmap(grad)``), plus ``D x proj_dim`` per sample to project.
    """
    params = params if params is not None else trainable_params(model, scope)
    projector = None
    if proj_dim is not None:
        p0 = next(iter(params.values()))
        projector = GaussianProjector([p.numel() for p in params.values()], proj_dim, seed, dtype=p0.dtype, device=p0.device)
    parts = [g.cpu() for _, g in iter_per_sample_grads(
        model, task, dataset, params, batch_size=batch_size, chunk_size=chunk_size, projector=projector, method=method
    )]
    if not parts:
        d = projector.proj_dim if projector else sum(p.numel() for p in params.values())
        return torch.zeros(0, d)
    return torch.cat(parts)
