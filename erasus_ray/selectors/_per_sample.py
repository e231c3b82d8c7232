"""Streamed per-sample gradients (``torch.func``: ``functional_call`` + ``vmap(grad)``), optionally JL-projected.

Shared by the gradient-based selectors (influence, TracIn). Everything goes through the task adapter
(``task.functional_inputs`` / ``task.functional_context`` / ``task.dense_sample_loss``), so the same code serves
classifiers and causal LMs.

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

from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from erasus_ray.data import IdDataset, make_loader
from erasus_ray.errors import InvalidConfigError
from erasus_ray.selectors.gradient_norm import trainable_params
from erasus_ray.tasks import Task
from erasus_ray.utils import model_device

__all__ = [
    "FunctionalLoss",
    "GaussianProjector",
    "batch_grads",
    "flatten",
    "iter_per_sample_grads",
    "mean_grad",
    "per_sample_gradients",
    "unflatten",
]


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
    with task.functional_context(model):
        return vmap(grad(loss.one), in_dims=(None, 0), chunk_size=chunk_size)(params, data)


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
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first_row, [B, d])`` per loader batch over ``dataset`` in row order (``d = D`` or ``proj_dim``)."""
    device = model_device(model)
    loss = FunctionalLoss(model, task, params)
    row = 0
    for b in make_loader(dataset, task.collate, batch_size=batch_size, shuffle=False):
        flat = flatten(batch_grads(model, task, b.to(device).data, params, chunk_size, loss=loss)).detach()
        if projector is not None:
            flat = projector.project(flat)
        yield row, flat
        row += flat.shape[0]


def per_sample_gradients(
    model: nn.Module, task: Task, dataset: IdDataset, *, scope: str | Sequence[str] = "last",
    proj_dim: int | None = None, seed: int = 0, batch_size: int = 64, chunk_size: int | None = None,
    params: dict[str, torch.Tensor] | None = None,
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
        model, task, dataset, params, batch_size=batch_size, chunk_size=chunk_size, projector=projector
    )]
    if not parts:
        d = projector.proj_dim if projector else sum(p.numel() for p in params.values())
        return torch.zeros(0, d)
    return torch.cat(parts)
