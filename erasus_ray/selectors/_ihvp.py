"""Curvature and inverse-Hessian-vector products for influence functions (:mod:`erasus_ray.selectors.influence`).

Every back-end applies ``(H + damping I)^-1`` to rows of a ``[R, D]`` matrix of flat gradients, ``H`` the Hessian
(or a Gauss-Newton approximation of it) of the mean per-sample loss over a sample of training data, w.r.t. the
scoped parameters:

* :class:`DenseIHVP` - a ``D x D`` matrix and its Cholesky factor (float64), the matrix from

  - :func:`linear_head_hessian`: the *exact* Hessian of a Linear layer whose output is the logits, in closed form
    from one forward pass: ``(1/n) sum_i (diag p_i - p_i p_i^T) (x) a_i a_i^T`` (``a_i`` the layer input with a 1
    appended for the bias); cost ``n C^2 (in+1)^2 / 2`` flops instead of ``D`` double-backward passes;
  - :func:`ggn_hessian`: the Gauss-Newton matrix (= true Fisher for softmax cross-entropy) from per-sample
    gradients with labels from the model, ``G^T G / n`` (Martens 2020, "New insights and perspectives on the
    natural gradient method"): one forward and a few backward passes, PSD, and equal to the Hessian wherever the
    logits are linear in the scoped parameters; the influence target that Bae et al. (NeurIPS 2022, "If Influence
    Functions are the Answer, Then What is the Question?") show deep-network influence estimates;
  - :func:`autograd_hessian`: the dense Hessian by ``jacrev(grad)`` (``D`` double-backward passes; any model);

* :class:`CGIHVP` (conjugate gradient) and :class:`LiSSAIHVP` (Agarwal, Bullins & Hazan, JMLR 2017) on exact
  Hessian-vector products;
* :class:`KFACIHVP` - eigenvalue-corrected K-FAC (Martens & Grosse 2015; George et al. 2018; Grosse et al. 2023)
  for Linear layers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import grad, jacrev, vjp, vmap

from erasus_ray.data import IdDataset, as_id_dataset, make_loader
from erasus_ray.errors import InvalidConfigError
from erasus_ray.selectors._checks import dead_gradients_error
from erasus_ray.selectors._factored import LayerCapture
from erasus_ray.selectors._reference import union_with_ids
from erasus_ray.selectors._per_sample import (
    FISHER_LABELS,
    FunctionalLoss,
    GaussianProjector,
    fisher_gradients,
    fisher_losses,
    flatten,
    torch_func_errors,
    unflatten,
)
from erasus_ray.tasks import Task
from erasus_ray.tasks.base import TaskOutput

# --------------------------------------------------------------------------------------------------------------
# Hessian data
# --------------------------------------------------------------------------------------------------------------


def hessian_sample_size(pool: int, forget: int, dim: int, classes: int, per_rank: int = 2) -> int:
    """The ``hessian_samples="auto"`` rule: ``min(pool, max(forget, ceil(per_rank D / (C - 1))))``.

    One sample's curvature term ``(diag p - p p^T) (x) a a^T`` (or its Jacobian pull-back) has rank ``C - 1`` for
    ``C`` classes, so ``D / (C - 1)`` samples are the fewest that can make a ``D``-dimensional estimate full rank.
    The influence selector asks for that minimum (``per_rank=1``) for self-influence and twice it for the set
    targets, because measured against the Hessian of the whole retain set (digits MLP head, D = 1290, 3 seeds)
    self-influence scores were equally faithful at D / (C - 1) and 2 D / (C - 1) samples (Spearman 0.999 /
    0.998 on class / random10; also MNIST-5k, D = 650: 0.999 at 73, 145 and 290 samples), whereas ``H^-1 g_S``
    for a set target gained from the larger sample (random10: 0.74 -> 0.77 forget, 0.70 -> 0.76 retain). At least
    as many samples as the forget set keeps the Hessian pass comparable in cost to one pass over the forget set
    (the scoring pass itself), and a large forget set gets a proportionally better estimate. Never more than the
    pool holds.
    """
    need = math.ceil(per_rank * dim / max(1, classes - 1))
    return int(min(pool, max(forget, need, 1)))


def hessian_pool(
    forget: IdDataset, retain: Any, source: str, samples: int | str | None, seed: int, *, dim: int = 0, classes: int = 2,
    per_rank: int = 2,
) -> tuple[IdDataset, dict[str, Any]]:
    """The (seeded) sample of data the Hessian is estimated on, and a description for ``coreset.info``.

    ``source="retain"`` uses ``retain``; ``"retain+forget"`` their union. Without retain data the forget set is
    used and the fallback is recorded. ``samples``: an int, None (the whole pool) or ``"auto"``
    (:func:`hessian_sample_size` with the scoped dimension ``dim``, ``classes`` and ``per_rank``).
    """
    if source not in ("retain", "retain+forget"):
        raise InvalidConfigError(f"hessian_data must be 'retain' or 'retain+forget', got {source!r}")
    info: dict[str, Any] = {}
    retain_ds = None if retain is None else as_id_dataset(retain).sorted()
    if retain_ds is None or len(retain_ds) == 0:
        pool = forget
        info["hessian_data"] = "forget"
        info["fallback"] = "no retain= data given: Hessian estimated on the forget set"
    elif source == "retain":
        pool, info["hessian_data"] = retain_ds, "retain"
    else:
        pool, info["hessian_data"] = union_with_ids(retain_ds, forget), "retain+forget"
    if samples == "auto":
        samples = hessian_sample_size(len(pool), len(forget), dim, classes, per_rank)
        info["hessian_samples_rule"] = f"min(pool, max(|forget|, ceil({per_rank} D / (C - 1))))"
    if samples is not None:
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
            raise InvalidConfigError(f"hessian_samples must be a positive integer, 'auto' or None, got {samples!r}")
        if samples < len(pool):
            rows = np.sort(np.random.default_rng(seed).choice(len(pool), size=int(samples), replace=False))
            pool = IdDataset._view(pool.base, pool.positions[rows], pool.ids[rows])
    info["hessian_samples"] = len(pool)
    return pool, info


# --------------------------------------------------------------------------------------------------------------
# IHVP back-ends
# --------------------------------------------------------------------------------------------------------------


class _IHVP:
    #: Whether the operator pickles small and self-contained (a matrix / factors), so one built on the driver can be
    #: shipped to scoring actors; the others (autograd graphs) are rebuilt there from the same Hessian sample.
    shippable = False

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}

    def solve(self, v: torch.Tensor) -> torch.Tensor:  # [R, D] -> [R, D]
        raise NotImplementedError

    def self_influence(self, v: torch.Tensor) -> torch.Tensor:  # [R, D] -> [R]: v_r^T (H + dI)^-1 v_r
        return (v * self.solve(v)).sum(-1)


class DenseIHVP(_IHVP):
    """``(H + damping I)^-1`` from a dense ``D x D`` curvature matrix: one Cholesky factorisation in float64
    (``D^3 / 3`` flops), then ``D^2`` per sample (self-influence by whitening ``L^-1 g``)."""

    shippable = True

    def __init__(self, hess: torch.Tensor, damping: float) -> None:
        super().__init__()
        d = hess.shape[0]
        hess = hess.double()
        hess = (hess + hess.T) / 2 + damping * torch.eye(d, dtype=hess.dtype, device=hess.device)
        self.chol, status = torch.linalg.cholesky_ex(hess)
        if int(status) != 0:
            low = float(torch.linalg.eigvalsh(hess).min()) - damping
            raise InvalidConfigError(
                f"Hessian + damping is not positive definite (smallest Hessian eigenvalue {low:.3g}, damping {damping}): "
                f"raise damping above {max(-low, 0.0):.3g}, or use ihvp='ggn' (a positive semi-definite Gauss-Newton matrix)"
            )

    def _whiten(self, v: torch.Tensor) -> torch.Tensor:  # L^-1 v^T: [D, R]
        return torch.linalg.solve_triangular(self.chol, v.double().to(self.chol.device).T, upper=False)

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(v.double().to(self.chol.device).T, self.chol).T

    def self_influence(self, v: torch.Tensor) -> torch.Tensor:
        return self._whiten(v).pow(2).sum(0)


def check_dense_size(d: int, max_params: int, what: str) -> None:
    if d > max_params:
        raise InvalidConfigError(
            f"ihvp={what!r} builds a {d}x{d} matrix, over max_exact_params={max_params}: use ihvp='cg', 'lissa' or "
            f"'kfac', a smaller scope, proj_dim=, or raise max_exact_params"
        )


def head_candidate(model: nn.Module, params: dict[str, torch.Tensor]) -> tuple[str, nn.Linear] | None:
    """The ``(name, module)`` of the one untied ``nn.Linear`` that owns exactly the scoped parameters (its weight,
    and maybe its bias), or None: the static half of :func:`linear_head` (no forward pass)."""
    named = dict(model.named_parameters())
    owners = {n.rsplit(".", 1)[0] if "." in n else "" for n in params}
    if len(owners) != 1 or not set(params) <= set(named):
        return None
    (name,) = owners
    module = model.get_submodule(name)
    prefix = f"{name}." if name else ""
    if not isinstance(module, nn.Linear) or f"{prefix}weight" not in params:
        return None
    if sum(1 for m in model.modules() for p in m.parameters(recurse=False) if p is module.weight) != 1:
        return None  # tied weight: the Hessian has terms from every use
    return name, module


def linear_head(
    model: nn.Module, task: Task, params: dict[str, torch.Tensor], data: Any,
    checked: tuple[LayerCapture, TaskOutput] | None = None,
) -> tuple[str, nn.Linear] | None:
    """The ``(name, module)`` of the ``nn.Linear`` whose weight (and bias) are exactly the scoped parameters and whose
    output *is* the task's logits with one unit per sample (a classifier head), checked on one batch ``data``;
    None otherwise (then the closed-form Hessian does not apply). ``checked``: the ``(capture, output)`` of a
    forward of ``data`` already run under ``LayerCapture({name: module})`` of :func:`head_candidate`'s head (no
    second forward then)."""
    candidate = head_candidate(model, params)
    if candidate is None:
        return None
    name, module = candidate
    if checked is None:
        capture = LayerCapture({name: module})
        with torch.no_grad(), capture:
            out = task.forward(model, data)
    else:
        capture, out = checked
    return (name, module) if head_output_is_logits(capture, name, out) else None


def head_output_is_logits(capture: LayerCapture, name: str, out: TaskOutput) -> bool:
    """Whether the layer ``name`` ran once in the captured forward and its output - the tensor the network went on
    with - *is* the task's logits, one prediction unit per sample (so the closed-form head Hessian applies)."""
    head_out = capture.handed.get(name)  # what the network computed on with (a copy when gradients were on)
    if capture.calls.get(name) != 1 or head_out is None or out.logits.shape != head_out.shape:
        return False
    if out.logits.data_ptr() != head_out.data_ptr() or out.logits.shape[0] != out.batch_size:
        return False
    return bool(torch.equal(out.owner, torch.arange(out.batch_size, device=out.owner.device)))


def linear_head_hessian(
    model: nn.Module, task: Task, params: dict[str, torch.Tensor], data: IdDataset, head: tuple[str, nn.Linear], *,
    batch_size: int, device: torch.device, verify: bool = False,
) -> torch.Tensor:
    """The exact Hessian ``[D, D]`` (float64, in the flat order of ``params``) of the mean cross-entropy over
    ``data`` w.r.t. a Linear head ``z = W a + b`` producing the logits: ``(1/n) sum_i S_i (x) a~_i a~_i^T`` with
    ``S_i = diag p_i - p_i p_i^T`` and ``a~_i = [a_i, 1]`` (the 1 only when the bias is in scope). Exact because the
    logits are linear in ``(W, b)``: the Hessian is its Gauss-Newton part. Cost: one forward pass and
    ``n C^2 k^2`` flops (``k`` = in + 1), no backward. ``verify``: see :func:`head_stats`."""
    name, module = head
    c = module.out_features
    idx, k = head_layout(params, name, c, module.in_features)  # homogeneous (class, input) index -> flat position
    # S (x) a a^T = diag(p) (x) a a^T - (p (x) a)(p (x) a)^T: C diagonal blocks and one Gram matrix, formed in the
    # layer's dtype (float32 halves the cost) a batch at a time and accumulated in float64
    dtype = torch.float64 if module.weight.dtype == torch.float64 else torch.float32
    a, p = head_stats(model, task, data, head, k > module.in_features, batch_size=batch_size, device=device, dtype=dtype,
                      verify=verify)
    n = a.shape[0]
    hess = torch.zeros(c * k, c * k, dtype=torch.float64, device=a.device)
    for i in range(0, n, batch_size):
        v = (p[i : i + batch_size, :, None] * a[i : i + batch_size, None, :]).reshape(-1, c * k)
        hess -= (v.T @ v).double()
    blocks = torch.einsum("nc,ni,nj->cij", p, a, a).double()
    for ci in range(c):
        hess[ci * k : (ci + 1) * k, ci * k : (ci + 1) * k] += blocks[ci]
    hess /= n
    order = torch.argsort(idx.to(hess.device))  # flat position -> homogeneous index
    return hess[order][:, order]


class NotAHeadError(Exception):
    """Raised by :func:`head_stats` with ``verify=True`` when the candidate layer's output is not the task's logits
    (one unit per sample): the caller falls back to its probe-based plan."""


def head_stats(
    model: nn.Module, task: Task, data: IdDataset, head: tuple[str, nn.Linear], with_bias: bool, *, batch_size: int,
    device: torch.device, dtype: torch.dtype = torch.float64, logit_grads: bool = False, verify: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a~ [n, k], p [n, C])`` in ``dtype``: the head's inputs (with a 1 appended for the bias) and the softmax of
    its logits over ``data``, from one forward pass (no backward). With ``logit_grads=True`` the second tensor is
    instead ``d [n, C]``, the gradient of each sample's loss w.r.t. its logits (one backward to the logits only), so
    that sample ``i``'s gradient of the head's weight and bias is the outer product ``d_i a~_i^T``.

    ``verify=True`` checks, on every batch, what :func:`linear_head` checks on a probe - the layer ran once and its
    output *is* the logits, one unit per sample (else :class:`NotAHeadError`) - and what
    :func:`~erasus_ray.selectors._checks.require_gradients` checks: the loss has a nonzero gradient w.r.t. the
    head's weight (``sum_i d_i a_i^T``) and bias (``sum_i d_i``) over ``data`` (else
    :class:`~erasus_ray.errors.NonDifferentiableModelError`). It lets a caller plan on a head without a probe pass."""
    name, module = head
    acts, second = [], []
    capture = LayerCapture({name: module})
    grad_w = grad_b = False
    for b in make_loader(data, task.collate, batch_size=batch_size, shuffle=False):
        capture.calls.clear()
        with torch.no_grad(), capture:
            out = task.forward(model, b.to(device).data)
        if verify and not head_output_is_logits(capture, name, out):
            raise NotAHeadError(name)
        a = capture.inputs[name].reshape(out.batch_size, module.in_features).detach().to(dtype)
        d = None
        # the gradient check needs logit gradients only until one batch has shown nonzero head gradients
        if logit_grads or (verify and not (grad_w and (grad_b or not with_bias))):
            # the loss is a function of the logits alone: differentiate it at detached logits (no graph through the
            # network); the per-sample losses are independent, so the gradient of their sum is per sample
            z = out.logits.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = out.replace(logits=z).sample_loss().sum()
            try:
                d = torch.autograd.grad(loss, z)[0].to(dtype)
            except RuntimeError:  # the loss does not depend differentiably on the logits
                if not verify:
                    raise
                d = torch.zeros(out.batch_size, out.logits.shape[-1], dtype=dtype, device=a.device)
            if verify:
                grad_w = grad_w or bool(torch.any(d.T @ a != 0))
                grad_b = grad_b or bool(torch.any(d.sum(0) != 0))
        if with_bias:
            a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        acts.append(a)
        second.append(d if logit_grads else out.logits.detach().to(dtype).softmax(-1))
    if verify:
        prefix = f"{name}." if name else ""
        wanted = [f"{prefix}weight"] + ([f"{prefix}bias"] if with_bias else [])
        dead = [n for n, ok in zip(wanted, (grad_w, grad_b)) if not ok]
        if dead:
            raise dead_gradients_error(model, dead, len(wanted), "influence")
    return torch.cat(acts), torch.cat(second)


def head_layout(params: dict[str, torch.Tensor], head_name: str, classes: int, in_features: int) -> tuple[torch.Tensor, int]:
    """``(idx, k)``: ``flat[..., idx]`` lays the scoped head parameters out as ``[..., C, k]`` (class-major, the
    bias - when in scope - as input column ``in_features``), ``k = in_features (+ 1)``."""
    prefix = f"{head_name}." if head_name else ""
    with_bias = f"{prefix}bias" in params
    k = in_features + int(with_bias)
    offsets, off = {}, 0
    for pname, p in params.items():
        offsets[pname] = off
        off += p.numel()
    layout = torch.empty(classes, k, dtype=torch.long)
    layout[:, :in_features] = offsets[f"{prefix}weight"] + torch.arange(classes * in_features).view(classes, in_features)
    if with_bias:
        layout[:, in_features] = offsets[f"{prefix}bias"] + torch.arange(classes)
    return layout.reshape(-1), k


def tril_inverse(chol: torch.Tensor, leaf: int = 16) -> torch.Tensor:
    """``L^-1`` of a batch of lower-triangular matrices ``[..., k, k]`` by 2 x 2 block recursion,
    ``[[L11, 0], [L21, L22]]^-1 = [[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]]``, so most of the work is batched
    matrix products; blocks of at most ``leaf`` rows use a triangular solve. Same result as
    ``solve_triangular(L, I)`` to rounding, ~2x faster on CPU for the ``10 x 129 x 129`` digits head blocks."""
    k = chol.shape[-1]
    if k <= leaf:
        eye = torch.eye(k, dtype=chol.dtype, device=chol.device).expand_as(chol)
        return torch.linalg.solve_triangular(chol, eye, upper=False)
    h = k // 2
    top, bottom = tril_inverse(chol[..., :h, :h], leaf), tril_inverse(chol[..., h:, h:], leaf)
    out = chol.new_zeros(chol.shape)
    out[..., :h, :h], out[..., h:, h:] = top, bottom
    out[..., h:, :h] = -(bottom @ chol[..., h:, :h] @ top)
    return out


class BlockCholesky:
    """Cholesky factors ``L_c`` of ``C`` symmetric positive definite ``k x k`` matrices (factored in float64) and the
    triangular solves with them, in ``dtype``: ``L_c^-1 x^T`` for one set of rows ``x`` shared by every block
    (:meth:`solve_rows`), ``L_c^-1 v_c`` and ``L_c^-T v_c`` for a right-hand side per block (:meth:`solve_each`).

    On CPU the factors and solves are LAPACK ``potrf`` and BLAS ``trsm`` called per block through SciPy: measured
    on the digits head blocks (``10 x 129 x 129``, 146 right-hand sides, one thread) 3.3 ms for factor + two
    solves against 4.2 ms for ``torch.linalg.cholesky`` (which also zeroes the unused triangle: 0.4 ms) + an
    explicit ``L^-1`` (:func:`tril_inverse`, 0.9 ms) + GEMMs, and ``torch.linalg.solve_triangular`` took 1.9 ms per
    batched solve. Elsewhere (``backend="torch"``, and on accelerators) the explicit inverse and batched products,
    which suit GPUs. Raises :class:`~erasus_ray.errors.InvalidConfigError` (with ``not_pd``) when a matrix is not
    positive definite."""

    def __init__(self, mats: torch.Tensor, dtype: torch.dtype, not_pd: str, backend: str = "auto") -> None:
        if backend not in ("auto", "scipy", "torch"):
            raise InvalidConfigError(f"backend must be 'auto', 'scipy' or 'torch', got {backend!r}")
        mats = mats.double()
        self.dtype, self.device, self.count, self.k = dtype, mats.device, mats.shape[0], mats.shape[-1]
        self.backend = ("scipy" if mats.device.type == "cpu" else "torch") if backend == "auto" else backend
        if self.backend == "scipy":
            from scipy.linalg import lapack

            npd = np.float64 if dtype == torch.float64 else np.float32
            work = mats.detach().cpu().numpy().copy()
            self._factors = []
            for m in work:
                # m is symmetric, so its transpose (a Fortran-ordered view) is the same matrix: no copy for LAPACK;
                # clean=0 leaves the upper triangle as it was (trsm reads only the lower one)
                low, info = lapack.dpotrf(m.T, lower=1, clean=0, overwrite_a=1)
                if info != 0:
                    raise InvalidConfigError(not_pd)
                self._factors.append(np.asfortranarray(low, dtype=npd))
        else:
            chol, status = torch.linalg.cholesky_ex(mats)
            if int(status.max()) != 0:
                raise InvalidConfigError(not_pd)
            # L_c^-1 stacked as one [C k, k] matrix (C k^3 / 6): applying every block to the same rows is one GEMM
            self._inv = tril_inverse(chol.to(dtype))

    @property
    def _trsm(self) -> Any:  # looked up, not stored: BLAS function objects do not pickle (solvers ship to actors)
        from scipy.linalg import blas

        return blas.dtrsm if self.dtype == torch.float64 else blas.strsm

    def solve_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``[C, k, m]``: ``L_c^-1 x^T`` for rows ``x [m, k]`` (the same rows for every block)."""
        x = x.to(self.device, self.dtype)
        if self.backend == "torch":
            return (self._inv.reshape(-1, self.k) @ x.T).view(self.count, self.k, x.shape[0])
        rows = np.asfortranarray(x.detach().cpu().numpy())  # [m, k]
        out = np.empty((self.count, self.k, x.shape[0]), dtype=rows.dtype)
        for c, low in enumerate(self._factors):
            out[c] = self._trsm(1.0, low, rows, side=1, lower=1, trans_a=1).T  # X L^T = x  <=>  X^T = L^-1 x^T
        return torch.from_numpy(out)

    def solve_each(self, v: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``[C, k, R]``: ``L_c^-1 v_c`` (``L_c^-T v_c`` with ``transpose``) for ``v [C, k, R]``."""
        v = v.to(self.device, self.dtype)
        if self.backend == "torch":
            inv = self._inv.transpose(1, 2) if transpose else self._inv
            return inv @ v
        vs = v.detach().cpu().numpy()
        out = np.empty(vs.shape, dtype=vs.dtype)
        for c, low in enumerate(self._factors):
            out[c] = self._trsm(1.0, low, np.asfortranarray(vs[c]), lower=1, trans_a=int(transpose))
        return torch.from_numpy(out)


class HeadWoodburyIHVP(_IHVP):
    """The *exact* ``(H + damping I)^-1`` of a Linear classifier head's closed-form Hessian without forming the
    ``D x D`` matrix (``D = C k``, ``k`` = inputs + bias), for ``n`` Hessian samples with ``n < D``.

    ``H = (1/n) sum_i (diag p_i - p_i p_i^T) (x) a_i a_i^T = B0 - U U^T`` with the block-diagonal
    ``B0 = blockdiag_c((1/n) sum_i p_ic a_i a_i^T)`` and the rank-``n`` correction ``U = [p_i (x) a_i] / sqrt(n)``.
    With ``B = B0 + damping I`` the Sherman-Morrison-Woodbury identity gives

        (B - U U^T)^-1 = B^-1 + B^-1 U K^-1 U^T B^-1,    K = I_n - U^T B^-1 U,

    so only ``C`` Cholesky factors of ``k x k`` blocks and one of the ``n x n`` capacitance ``K`` are needed
    (``K`` is positive definite exactly when ``H + damping I`` is). Cost: ``C k^3 / 3 + C k^2 n / 2 + n^2 D + n^3 / 3``
    to build, ``R (C k^2 + n D)`` for ``R`` self-influence scores of dense vectors - against ``n D^2 + D^3 / 3``
    and ``R D^2`` for the dense matrix - and memory ``n D`` instead of ``D^2``. A sample's own head gradient is
    the outer product ``d_z a~_z^T`` (``d_z`` = its loss gradient w.r.t. the logits), so
    :meth:`self_influence_factors` scores ``R`` samples from ``(a~, d)`` in ``R (C k^2 / 2 + n D)`` without forming
    their ``D``-dimensional gradients.

    Precision: the Cholesky factorisations (of the blocks and of ``K``) are float64; the triangular solves and the
    large products (blocks, ``L^-1 A^T``, the ``n x n`` Gram, the scoring products) run in the head's dtype -
    float64 for a float64 head (scores equal :class:`DenseIHVP`'s to 1e-9; 1e-13 on the digits MLP), float32 for a
    float32 head (half the time). Against the same weights in float64 through the dense form (digits MLP, 146
    forget samples), the float32 model + solver scores have median relative error 5e-5, Spearman 0.999996, and
    their largest absolute error is 5e-6 of the largest score; the worst relative error, 3.5%, is on the smallest
    score (4e-7, ten orders of magnitude below the largest), where the float32 forward's own rounding dominates.
    The factors and solves come from :class:`BlockCholesky`.
    """

    shippable = True

    def __init__(
        self, model: nn.Module, task: Task, params: dict[str, torch.Tensor], data: IdDataset, head: tuple[str, nn.Linear],
        damping: float, *, batch_size: int, device: torch.device, verify: bool = False,
    ) -> None:
        super().__init__()
        name, module = head
        self.head_name = name  # a name, not the module: the solver is pickled to scoring actors with their own model
        self.classes = module.out_features
        self.idx, k = head_layout(params, name, self.classes, module.in_features)
        self.with_bias = k > module.in_features
        self.dtype = torch.float64 if module.weight.dtype == torch.float64 else torch.float32
        a, p = head_stats(model, task, data, head, self.with_bias, batch_size=batch_size, device=device, dtype=self.dtype,
                          verify=verify)
        n, c = a.shape[0], self.classes
        blocks = torch.bmm(a.T[None] * (p.T[:, None, :] / n), a.expand(c, n, k)).double()  # [C, k, k]
        blocks.diagonal(dim1=1, dim2=2).add_(damping)  # in place: no second [C, k, k] temporary
        self.blocks = BlockCholesky(
            blocks, self.dtype, f"the Hessian's diagonal blocks + damping {damping} are not positive definite: raise damping"
        )
        # Y_c = L_c^-1 a~^T diag(p_c) / sqrt(n): [C, k, n]; then U^T B^-1 U = sum_c Y_c^T Y_c
        self.y = self.blocks.solve_rows(a).mul_(p.T[:, None, :] / math.sqrt(n))
        flat = self.y.view(c * k, n)
        gram = (flat.T @ flat).double()
        cap = torch.eye(n, dtype=torch.float64, device=a.device) - (gram + gram.T) / 2
        self.cap = BlockCholesky(
            cap[None], torch.float64,
            f"Hessian + damping is not positive definite (damping {damping}): raise damping, or use ihvp='ggn'",
        )
        self.info = {"exact_solver": "woodbury", "hessian_samples": int(n), "solver_dtype": str(self.dtype).replace("torch.", "")}

    def _blocks(self, v: torch.Tensor) -> torch.Tensor:  # [R, D] flat -> [C, k, R]
        v = v.to(self.y.device, self.dtype)[:, self.idx.to(self.y.device)]
        return v.reshape(v.shape[0], self.classes, -1).permute(1, 2, 0)

    def _correction(self, u: torch.Tensor) -> torch.Tensor:
        """``T = L_K^-1 u`` in float64 for ``u = U^T B^-1 v`` ``[n, R]``."""
        return self.cap.solve_each(u.double()[None])[0]

    def _whiten(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Z, T)``: ``Z_c = L_c^-1 v_c`` ``[C, k, R]`` and ``T = L_K^-1 U^T B^-1 v`` ``[n, R]``, so that
        ``v^T (H + damping I)^-1 v = ||Z||^2 + ||T||^2`` per row."""
        z = self.blocks.solve_each(self._blocks(v))
        return z, self._correction(torch.einsum("ckn,ckr->nr", self.y, z))

    def self_influence(self, v: torch.Tensor) -> torch.Tensor:
        z, t = self._whiten(v)
        return z.double().pow(2).sum((0, 1)) + t.pow(2).sum(0)

    def self_influence_factors(self, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``g_z^T (H + damping I)^-1 g_z`` for head gradients ``g_z = d_z a~_z^T``, from ``a~ [R, k]`` and the
        logit gradients ``d [R, C]`` (:func:`head_stats` with ``logit_grads=True``): ``Z_c = d_zc L_c^-1 a~_z``,
        so ``||Z||^2 = sum_c d_zc^2 ||L_c^-1 a~_z||^2`` and ``U^T B^-1 g_z = sum_c d_zc Y_c^T L_c^-1 a~_z``."""
        a = a.to(self.y.device, self.dtype)
        d = d.to(self.y.device, self.dtype)
        w = self.blocks.solve_rows(a)  # L_c^-1 a~^T: [C, k, R]
        own = (d.T.double().pow(2) * w.pow(2).sum(1).double()).sum(0)
        z = (w * d.T[:, None, :]).view(-1, a.shape[0])  # Z_c = d_zc L_c^-1 a~_z, flat [C k, R]
        u = self.y.view(-1, self.y.shape[-1]).T @ z  # U^T B^-1 g_z = sum_c Y_c^T Z_c: [n, R]
        return own + self._correction(u).pow(2).sum(0)

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        z, t = self._whiten(v)
        t = self.cap.solve_each(t[None], transpose=True)[0].to(self.dtype)  # K^-1 U^T B^-1 v
        z = z + torch.einsum("ckn,nr->ckr", self.y, t)  # L_c^-1 (v + U K^-1 U^T B^-1 v)_c
        x = self.blocks.solve_each(z, transpose=True)  # [C, k, R]
        out = torch.empty(v.shape[0], self.idx.numel(), dtype=torch.float64, device=x.device)
        out[:, self.idx.to(x.device)] = x.permute(2, 0, 1).reshape(v.shape[0], -1).double()
        return out


def head_solver_costs(n: int, classes: int, k: int, rows: int) -> dict[str, float]:
    """Multiply-adds of the dense and the Woodbury form of the closed-form head Hessian's inverse (build + ``rows``
    self-influence scores), for the ``exact_solver="auto"`` choice."""
    d = classes * k
    return {
        "dense": n * d * d + d**3 / 3 + rows * d * d,
        "woodbury": classes * k**3 / 3 + classes * k * k * n + n * n * d + n**3 / 3 + rows * (classes * k * k + n * d),
    }


def autograd_hessian(
    loss: FunctionalLoss, task: Task, data: IdDataset, *, batch_size: int, device: torch.device, chunk_size: int | None
) -> torch.Tensor:
    """The dense Hessian ``[D, D]`` (float64) of the mean loss over ``data`` by ``jacrev(grad)``: ``D``
    double-backward passes over every Hessian batch (vmapped in chunks). Any twice-differentiable model."""
    flat = flatten(loss.params, batch_dims=0)
    d = flat.numel()
    hess = torch.zeros(d, d, dtype=torch.float64, device=flat.device)
    with task.functional_context(loss.model), torch_func_errors("influence (Hessian)"):
        for b in make_loader(data, task.collate, batch_size=batch_size, shuffle=False):
            batch = b.to(device).data
            h = jacrev(grad(lambda f: loss.flat_sum(f, batch)), chunk_size=chunk_size or 256)(flat)
            hess += h.detach().double()
    return hess / len(data)


def ggn_hessian(
    model: nn.Module, task: Task, params: dict[str, torch.Tensor], data: IdDataset, *, batch_size: int,
    device: torch.device, labels: str, draws: int, seed: int, chunk_size: int | None,
    projector: GaussianProjector | None = None,
) -> torch.Tensor:
    """The Gauss-Newton / true-Fisher matrix ``[D, D]`` (``[k, k]`` with a JL ``projector``: ``P^T G P``) of the
    mean loss over ``data``, from :func:`~erasus_ray.selectors._per_sample.fisher_gradients` (``labels``:
    ``"expected"`` - exact; ``"mc"`` - ``draws`` model-sampled labels per unit, unbiased; ``"empirical"``).
    Cost: one forward and ``C`` / ``draws`` / 1 backward passes per batch, plus ``R D^2`` flops per sample."""
    total: torch.Tensor | None = None
    n = 0
    for bi, b in enumerate(make_loader(data, task.collate, batch_size=batch_size, shuffle=False)):
        rows, weight = fisher_gradients(model, task, b.to(device).data, params, labels=labels, draws=draws, seed=seed,
                                        batch_index=bi, chunk_size=chunk_size)
        flat = rows.reshape(-1, rows.shape[-1])
        if projector is not None:
            flat = projector.project(flat)
        flat = flat.double()
        part = weight * (flat.T @ flat)
        total = part if total is None else total + part
        n += rows.shape[0]
    assert total is not None
    return total / n


class _HVP:
    """Hessian-vector products of the mean loss over ``data`` (reverse-over-reverse, vmapped over the vectors).

    The per-batch autograd graphs are built once and reused for every product (memory: one graph per Hessian
    batch, like holding that many training activations).
    """

    def __init__(self, loss: FunctionalLoss, task: Task, data: IdDataset, batch_size: int, device: torch.device) -> None:
        self.flat = flatten(loss.params, batch_dims=0)
        self.n = len(data)
        self.fns = []
        with task.functional_context(loss.model), torch_func_errors("influence (Hessian-vector products)"):
            for b in make_loader(data, task.collate, batch_size=batch_size, shuffle=False):
                batch = b.to(device).data
                _, fn = vjp(grad(lambda f, d=batch: loss.flat_sum(f, d)), self.flat)
                self.fns.append(fn)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        v = v.to(self.flat.dtype)
        return sum(vmap(fn)(v)[0] for fn in self.fns) / self.n


class CGIHVP(_IHVP):
    """Batched (preconditioned) conjugate gradient on ``(H + damping I) x = v`` (one CG per row, vectorised across
    rows).

    With ``preconditioner`` (another IHVP operator ``M ~= (H + damping I)^-1``, e.g. :class:`KFACIHVP`) this is
    preconditioned CG started from ``x_0 = M v``: it converges to the exact solution in fewer iterations the better
    ``M`` is (Hestenes & Stiefel 1952; K-FAC as a CG preconditioner: Martens & Grosse 2015, sec. 8).
    """

    def __init__(self, loss: FunctionalLoss, task: Task, data: IdDataset, *, batch_size: int, damping: float,
                 device: torch.device, iters: int, tol: float, preconditioner: _IHVP | None = None) -> None:
        super().__init__()
        self.hvp = _HVP(loss, task, data, batch_size, device)
        self.damping, self.iters, self.tol = float(damping), int(iters), float(tol)
        self.preconditioner = preconditioner
        self.info = {"cg_iters": 0, "cg_max_rel_residual": 0.0}

    def _precondition(self, r: torch.Tensor) -> torch.Tensor:
        return r.clone() if self.preconditioner is None else self.preconditioner.solve(r).to(r.dtype)

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        b = v.to(self.hvp.flat.dtype)
        bnorm = b.norm(dim=-1).clamp_min(torch.finfo(b.dtype).tiny)
        if self.preconditioner is None:
            x, r = torch.zeros_like(b), b.clone()
        else:
            x = self._precondition(b)
            r = b - (self.hvp(x) + self.damping * x)
        z = self._precondition(r)
        p = z.clone()
        rz = (r * z).sum(-1)
        rnorm = r.norm(dim=-1)
        it = 0
        for it in range(1, self.iters + 1):
            active = rnorm > self.tol * bnorm
            if not bool(active.any()):
                it -= 1
                break
            ap = self.hvp(p) + self.damping * p
            pap = (p * ap).sum(-1)
            if bool((pap[active] <= 0).any()):
                raise InvalidConfigError(
                    "conjugate gradient met negative curvature: Hessian + damping is not positive definite; raise damping"
                )
            alpha = torch.where(active, rz / pap.where(active, torch.ones_like(pap)), torch.zeros_like(rz))
            x = x + alpha[:, None] * p
            r = r - alpha[:, None] * ap
            z = self._precondition(r)
            rz_new = (r * z).sum(-1)
            beta = torch.where(active, rz_new / rz.where(active, torch.ones_like(rz)), torch.zeros_like(rz))
            p = torch.where(active[:, None], z + beta[:, None] * p, p)
            rz = torch.where(active, rz_new, rz)
            rnorm = torch.where(active, r.norm(dim=-1), rnorm)
        self.info["cg_iters"] = max(self.info["cg_iters"], it)
        self.info["cg_max_rel_residual"] = max(self.info["cg_max_rel_residual"], float((rnorm / bnorm).max()))
        return x


#: ``lissa_depth="auto"`` runs ``ln(1 / LISSA_AUTO_TOL) scale / damping`` steps: the error along an eigenvector of
#: eigenvalue ``l`` shrinks like ``(1 - (l + damping) / scale)^depth <= exp(-depth damping / scale)``, so after that
#: depth every direction holds at least ``1 - LISSA_AUTO_TOL`` of its exact contribution to a score.
LISSA_AUTO_TOL = 0.01
#: ... but at least / at most this many steps (damping 0 or a tiny one would ask for an unbounded depth).
LISSA_AUTO_DEPTH = (100, 20_000)


def lissa_auto_depth(scale: float, damping: float) -> int:
    """LiSSA's default depth for ``scale`` and ``damping`` (see :data:`LISSA_AUTO_TOL`), clamped to
    :data:`LISSA_AUTO_DEPTH`. Cost: that many minibatch Hessian-vector products per solve (fewer when the
    residual test stops it)."""
    low, high = LISSA_AUTO_DEPTH
    if damping <= 0:
        return high
    return int(min(high, max(low, math.ceil(math.log(1 / LISSA_AUTO_TOL) * scale / damping))))


class LiSSAIHVP(_IHVP):
    """LiSSA (Agarwal et al. 2017): the stochastic Neumann recursion

        h_0 = v,  h_j = v + h_{j-1} - (H_j h_{j-1} + damping h_{j-1}) / scale,   (H + damping I)^-1 v ~= h_depth / scale

    where ``H_j`` is the Hessian on a minibatch of ``lissa_batch_size`` Hessian samples drawn at random (seeded) at
    each step from a seeded partition of the Hessian sample (the full sample when ``lissa_batch_size`` is None or
    larger; then the recursion is deterministic; a remainder smaller than a minibatch is dropped), averaged over
    ``repeat`` runs. The partition's autograd graphs are built once, so memory is that of the whole Hessian
    sample's graphs (as for cg). It converges when every minibatch Hessian + damping has eigenvalues in
    ``(0, 2 scale)``; the error shrinks like ``(1 - (l_min + damping)/scale)^depth``.
    ``scale=None`` sets ``1.1 (l_max + damping)`` from 20 power iterations on the full Hessian sample. Damping
    enters as ``+damping I`` (the same meaning as in the other back-ends, not Koh & Liang's ``(1 - damping)``
    shrink factor).

    ``depth="auto"`` (:func:`lissa_auto_depth`): enough steps for the slowest direction the damping guarantees,
    ``ln(1 / LISSA_AUTO_TOL) scale / damping`` (a fixed depth under-converges at small damping: 500 steps gave a
    median 0.85 of the exact scores on the digits MLP). Whatever the depth, the recursion stops once every row's
    step ``h_j - h_{j-1}`` - the residual ``v - (H_j + damping) x`` of the current estimate on the step's minibatch
    - is at most ``tol`` times ``||v||`` (as conjugate gradient stops; with minibatches that residual is noisy and
    rarely falls that low, so the depth bounds the work). ``info["lissa_steps"]``: the most steps a solve took.
    """

    def __init__(self, loss: FunctionalLoss, task: Task, data: IdDataset, *, batch_size: int, damping: float,
                 device: torch.device, depth: int | str, repeat: int, scale: float | None, lissa_batch_size: int | None,
                 seed: int, tol: float = 0.0) -> None:
        super().__init__()
        self.damping, self.repeat, self.seed, self.tol = float(damping), int(repeat), int(seed), float(tol)
        if depth != "auto" and (isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1):
            raise InvalidConfigError(f"lissa_depth must be 'auto' or an integer >= 1, got {depth!r}")
        if self.repeat < 1:
            raise InvalidConfigError(f"lissa_repeat must be >= 1, got {repeat!r}")
        self.flat = flatten(loss.params, batch_dims=0)
        n = len(data)
        size = n if lissa_batch_size is None or lissa_batch_size >= n else int(lissa_batch_size)
        # A seeded partition of the Hessian sample into minibatches whose graphs are built once; each recursion
        # step draws one of them at random (seeded).
        perm = np.random.default_rng([self.seed, 1]).permutation(n)
        self.minibatches = []
        for start in range(0, n - size + 1, size):
            rows = np.sort(perm[start : start + size])
            sub = IdDataset._view(data.base, data.positions[rows], data.ids[rows])
            self.minibatches.append(_HVP(loss, task, sub, batch_size, device))
        if scale is None:
            full = self.minibatches[0] if len(self.minibatches) == 1 else None
            gen = torch.Generator().manual_seed(self.seed)
            v = torch.randn(1, self.flat.numel(), generator=gen, dtype=torch.float64).to(self.flat)
            lam = 0.0
            for _ in range(20):
                v = v / v.norm()
                hv = full(v) if full else sum(h(v) * h.n for h in self.minibatches) / sum(h.n for h in self.minibatches)
                lam = float((v * hv).sum())
                v = hv
            scale = 1.1 * (abs(lam) + self.damping)
        if not scale > 0:
            raise InvalidConfigError(f"lissa_scale must be positive, got {scale!r}")
        self.scale = float(scale)
        self.depth = lissa_auto_depth(self.scale, self.damping) if depth == "auto" else int(depth)
        self.info = {"lissa_scale": self.scale, "lissa_depth": self.depth, "lissa_repeat": self.repeat,
                     "lissa_batch_size": size, "lissa_steps": 0}

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        v = v.to(self.flat.dtype)
        total = torch.zeros_like(v)
        for r in range(self.repeat):
            picks = np.random.default_rng([self.seed, 2, r]).integers(len(self.minibatches), size=self.depth)
            h, vnorm, steps = v.clone(), v.norm(dim=-1), 0
            for j in picks:
                step = v - (self.minibatches[j](h) + self.damping * h) / self.scale
                h, steps = h + step, steps + 1
                if bool((step.norm(dim=-1) <= self.tol * vnorm).all()):
                    break
            self.info["lissa_steps"] = max(self.info["lissa_steps"], steps)
            if not bool(torch.isfinite(h).all()):
                raise InvalidConfigError("LiSSA diverged: raise lissa_scale (or damping)")
            total = total + h / self.scale
        return total / self.repeat


class KFACIHVP(_IHVP):
    """Eigenvalue-corrected K-FAC (EK-FAC) for ``nn.Linear`` layers.

    Approximation: the Hessian is replaced by the Fisher / Gauss-Newton matrix of the loss (equal to the Hessian
    for a linear model under cross-entropy, PSD otherwise), made block-diagonal across layers. For a layer with
    input ``a`` (with a 1 appended for the bias: the bias is the weight of a homogeneous coordinate) and
    output-gradient ``g``, the per-sample gradient is ``sum_t g_t a_t^T``; K-FAC approximates the block as
    ``A (x) G`` with ``A = E[a a^T]`` (over tokens) and ``G = E_samples[sum_t g_t g_t^T]``, both collected with
    hooks in ordinary backward passes. With ``correction=True`` (EK-FAC) only their eigenbases ``Q_A, Q_G`` are
    kept and the eigenvalues are replaced by the exact second moments of the per-sample gradients in that basis,
    ``E[(Q_G^T dW Q_A)^2]`` - the diagonal of the Gauss-Newton matrix in the Kronecker eigenbasis, the
    Frobenius-optimal diagonal for that basis (George et al. 2018). What remains approximate is the basis: the
    off-diagonal part of the block in it is dropped.

    Labels for ``g`` (``fisher``, see :func:`~erasus_ray.selectors._per_sample.fisher_losses`): ``"expected"``
    (every class weighted by its probability: the exact true Fisher; classifiers), ``"mc"`` (``fisher_samples``
    draws from the model, seeded; unbiased) or ``"empirical"`` (data labels). The per-unit gradients are scaled by
    ``sqrt(w_u)`` so that an LM's mean over ``T`` tokens gets its Fisher ``sum_u w_u F_u`` (not ``sum_u w_u^2 F_u``).

    Cost: two forward passes and ``R`` backward passes (``R`` = classes, draws or 1) over the Hessian sample and
    one eigendecomposition of ``A`` and ``G`` per layer; memory ``in^2 + out^2 + in*out`` per layer. The
    operator keeps only the factors, so it ships to scoring actors.
    """

    shippable = True

    def __init__(self, model: nn.Module, task: Task, params: dict[str, torch.Tensor], data: IdDataset, *,
                 batch_size: int, damping: float, device: torch.device, fisher: str, fisher_samples: int,
                 correction: bool, seed: int) -> None:
        super().__init__()
        if fisher not in FISHER_LABELS:
            raise InvalidConfigError(f"fisher must be one of {FISHER_LABELS}, got {fisher!r}")
        if fisher_samples < 1:
            raise InvalidConfigError(f"fisher_samples must be >= 1, got {fisher_samples!r}")
        self.shapes = {n: torch.empty(p.shape, device="meta") for n, p in params.items()}
        self.damping = float(damping)
        self.layers = kfac_layers(model, params)
        self.fisher, self.fisher_samples, self.seed = fisher, int(fisher_samples), int(seed)
        passes = lambda: self._passes(model, task, data, batch_size, device)  # noqa: E731
        n = len(data)
        A = {m: 0.0 for m in self.layers}
        G = {m: 0.0 for m in self.layers}
        tokens = {m: 0 for m in self.layers}
        for acts, gouts, weight in passes():
            for m in self.layers:
                a, g = acts[m], gouts[m]  # [B, T, in+1], [R, B, T, out]
                A[m] = A[m] + torch.einsum("bti,btj->ij", a, a)
                tokens[m] += a.shape[0] * a.shape[1]
                G[m] = G[m] + weight * torch.einsum("rbto,rbtp->op", g, g)
        self.qa, self.qg, self.lam = {}, {}, {}
        for m in self.layers:
            ea, self.qa[m] = torch.linalg.eigh((A[m] / tokens[m]).double())
            eg, self.qg[m] = torch.linalg.eigh((G[m] / n).double())
            self.lam[m] = torch.outer(eg.clamp_min(0), ea.clamp_min(0))
        if correction:
            lam = {m: 0.0 for m in self.layers}
            for acts, gouts, weight in passes():
                for m in self.layers:
                    a = acts[m].double() @ self.qa[m]
                    g = gouts[m].double() @ self.qg[m]
                    lam[m] = lam[m] + weight * eigenbasis_second_moment(g, a)
            self.lam = {m: lam[m] / n for m in self.layers}
        self.info = {"kfac_layers": list(self.layers), "fisher": fisher, "kfac_correction": bool(correction)}

    def _passes(self, model: nn.Module, task: Task, data: IdDataset, batch_size: int, device: torch.device):
        """Per Hessian batch: layer inputs ``[B, T, in(+1)]``, output-gradients ``[R, B, T, out]`` and their weight."""
        modules = {m: model.get_submodule(m) for m in self.layers}
        for bi, b in enumerate(make_loader(data, task.collate, batch_size=batch_size, shuffle=False)):
            capture = LayerCapture(modules)
            with torch.enable_grad(), capture:
                out = task.forward(model, b.to(device).data)
            bsz = out.batch_size
            acts = {}
            for m in modules:
                a = capture.inputs[m].reshape(bsz, -1, capture.inputs[m].shape[-1])
                if self.layers[m]["bias"] is not None:
                    a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
                acts[m] = a
            losses, weight = fisher_losses(out, self.fisher, self.fisher_samples, self.seed, bi)
            outputs = [capture.outputs[m] for m in modules]
            gs: dict[str, list] = {m: [] for m in modules}
            for i, loss in enumerate(losses):
                grads = torch.autograd.grad(loss, outputs, retain_graph=i + 1 < len(losses), allow_unused=True)
                for m, o, g in zip(modules, outputs, grads):
                    g = torch.zeros_like(o) if g is None else g.detach()
                    gs[m].append(g.reshape(bsz, -1, g.shape[-1]))
            yield acts, {m: torch.stack(gs[m]) for m in modules}, weight

    def _matrices(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        d = unflatten(v.double(), self.shapes)
        mats = {}
        for m, spec in self.layers.items():
            w = d[spec["weight"]]
            mats[m] = torch.cat([w, d[spec["bias"]].unsqueeze(-1)], dim=-1) if spec["bias"] else w
        return mats

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        out = {}
        for m, mat in self._matrices(v).items():
            rot = self.qg[m].T @ mat @ self.qa[m] / (self.lam[m] + self.damping)
            back = self.qg[m] @ rot @ self.qa[m].T
            spec = self.layers[m]
            if spec["bias"]:
                out[spec["weight"]], out[spec["bias"]] = back[..., :-1], back[..., -1]
            else:
                out[spec["weight"]] = back
        return flatten({n: out[n] for n in self.shapes}, batch_dims=1)

    def self_influence(self, v: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for m, mat in self._matrices(v).items():
            rot = self.qg[m].T @ mat @ self.qa[m]
            total = total + (rot.pow(2) / (self.lam[m] + self.damping)).sum((-2, -1))
        return total


def eigenbasis_second_moment(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``sum_{r,b} (sum_t g_rbt a_bt^T)^2`` (elementwise square): the summed squared per-sample gradients of a Linear
    layer, from its output-gradients ``g`` ``[R, B, T, out]`` and inputs ``a`` ``[B, T, in]`` (already rotated into
    the Kronecker eigenbasis). EK-FAC's corrected eigenvalues are this over the samples (George et al. 2018).

    With one token per sample (``T = 1``: every MLP / classifier-head layer) a per-sample gradient is the outer
    product ``g_rb a_b^T``, whose square is ``g_rb^2 (a_b^2)^T``, so the sum is one GEMM of the class-summed squared
    output-gradients and the squared inputs: ``B (out + in) + B out in`` flops instead of forming ``R B out in``
    gradient entries (about 370x faster for C = 10 on a digits MLP layer). Otherwise (tokens, conv patches) the
    per-sample gradients are formed, a few samples at a time: :func:`_eigenbasis_second_moment_per_sample`."""
    if a.shape[1] == 1:
        return g[:, :, 0].pow(2).sum(0).T @ a[:, 0].pow(2)
    return _eigenbasis_second_moment_per_sample(g, a)


def _eigenbasis_second_moment_per_sample(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """:func:`eigenbasis_second_moment` by forming each per-sample gradient (any ``T``; the reference form).
    Memory: at most ~2^24 gradient entries at a time."""
    total = torch.zeros(g.shape[-1], a.shape[-1], dtype=torch.promote_types(g.dtype, a.dtype), device=a.device)
    step = max(1, (1 << 24) // max(1, g.shape[0] * g.shape[-1] * a.shape[-1]))
    for i in range(0, a.shape[0], step):
        dw = torch.einsum("rbto,bti->rboi", g[:, i : i + step], a[i : i + step])
        total = total + dw.pow(2).sum((0, 1))
    return total


def kfac_layers(model: nn.Module, params: dict[str, torch.Tensor]) -> dict[str, dict[str, str | None]]:
    """Map the chosen parameters onto ``nn.Linear`` modules: ``module -> {"weight": name, "bias": name | None}``.

    Raises :class:`InvalidConfigError` naming any chosen parameter that is not the weight/bias of exactly one
    ``nn.Linear`` (K-FAC has no factorisation for it).
    """
    name_of = {id(p): n for n, p in model.named_parameters()}
    owners: dict[str, list[tuple[str, nn.Module, str]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in name_of:
                owners.setdefault(name_of[id(p)], []).append((mname, mod, pname))
    layers: dict[str, dict[str, str | None]] = {}
    bad = []
    for n in params:
        own = {(m, pn) for m, mod, pn in owners.get(n, [])}
        mods = [mod for _, mod, _ in owners.get(n, [])]
        if len(own) != 1 or not isinstance(mods[0], nn.Linear):
            bad.append(n)
            continue
        (m, pn), = own
        spec = layers.setdefault(m, {"weight": None, "bias": None})
        spec[pn] = n
    for m, spec in layers.items():
        mod = model.get_submodule(m)
        if spec["weight"] is None or (mod.bias is not None and spec["bias"] is None):
            bad.append(f"{m} (weight and bias must be chosen together)")
    if bad:
        raise InvalidConfigError(
            f"ihvp='kfac' factorises nn.Linear layers only; not supported: {bad[:10]}. Use ihvp='exact' or 'cg', "
            f"or a scope of Linear layers"
        )
    return layers
