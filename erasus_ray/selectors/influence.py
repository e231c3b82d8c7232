"""Influence functions (Koh & Liang, ICML 2017, "Understanding Black-box Predictions via Influence Functions").

Per-sample influence scores with four inverse-Hessian-vector-product (IHVP) back-ends: the exact damped Hessian,
conjugate gradient on Hessian-vector products (Martens 2010; Koh & Liang 2017), LiSSA (Agarwal, Bullins & Hazan,
JMLR 2017) and an eigenvalue-corrected Kronecker-factored preconditioner (K-FAC, Martens & Grosse 2015; EK-FAC,
George et al. 2018, as used for influence by Grosse et al. 2023).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import grad, jacrev, vjp, vmap
from torch.utils.data import Dataset

from erasus_ray.data import IdDataset, as_id_dataset, make_loader
from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.selectors._per_sample import FunctionalLoss, flatten, iter_per_sample_grads, mean_grad, unflatten
from erasus_ray.selectors.base import SELECTORS, Coreset, ScoreSelector
from erasus_ray.selectors.gradient_norm import trainable_params
from erasus_ray.tasks import Task
from erasus_ray.tasks.base import TaskOutput
from erasus_ray.utils import model_device

IHVP_METHODS = ("auto", "exact", "cg", "lissa", "kfac")
TARGETS = ("self", "forget", "retain")


# --------------------------------------------------------------------------------------------------------------
# Hessian data
# --------------------------------------------------------------------------------------------------------------


class _Concat(Dataset):
    """Items of two IdDatasets back to back (their ids dropped), for pools over different base datasets."""

    def __init__(self, a: IdDataset, b: IdDataset) -> None:
        self.a, self.b = a, b

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    def __getitem__(self, i: int) -> Any:
        return self.a[i][1] if i < len(self.a) else self.b[i - len(self.a)][1]


def _union(a: IdDataset, b: IdDataset) -> IdDataset:
    if a.base is b.base:
        keep = ~np.isin(b.ids, a.ids)
        return IdDataset(a.base, np.concatenate([a.positions, b.positions[keep]]), np.concatenate([a.ids, b.ids[keep]]))
    both = _Concat(a, b)
    return IdDataset(both, np.arange(len(both)), np.arange(len(both)))


def hessian_pool(
    forget: IdDataset, retain: Any, source: str, samples: int | None, seed: int
) -> tuple[IdDataset, dict[str, Any]]:
    """The (seeded) sample of data the Hessian is estimated on, and a description for ``coreset.info``.

    ``source="retain"`` uses ``retain``; ``"retain+forget"`` their union. Without retain data the forget set is
    used and the fallback is recorded.
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
        pool, info["hessian_data"] = _union(retain_ds, forget), "retain+forget"
    if samples is not None:
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
            raise InvalidConfigError(f"hessian_samples must be a positive integer or None, got {samples!r}")
        if samples < len(pool):
            rows = np.sort(np.random.default_rng(seed).choice(len(pool), size=int(samples), replace=False))
            pool = IdDataset(pool.base, pool.positions[rows], pool.ids[rows])
    info["hessian_samples"] = len(pool)
    return pool, info


# --------------------------------------------------------------------------------------------------------------
# IHVP back-ends: each applies (H + damping I)^-1 to rows of a [R, D] matrix of flat gradients, where H is the
# Hessian (or its approximation) of the mean per-sample loss over the Hessian data w.r.t. the chosen parameters.
# --------------------------------------------------------------------------------------------------------------


class _IHVP:
    def __init__(self) -> None:
        self.info: dict[str, Any] = {}

    def solve(self, v: torch.Tensor) -> torch.Tensor:  # [R, D] -> [R, D]
        raise NotImplementedError

    def self_influence(self, v: torch.Tensor) -> torch.Tensor:  # [R, D] -> [R]: v_r^T (H + dI)^-1 v_r
        return (v * self.solve(v)).sum(-1)


class _HVP:
    """Hessian-vector products of the mean loss over ``data`` (reverse-over-reverse, vmapped over the vectors).

    The per-batch autograd graphs are built once and reused for every product (memory: one graph per Hessian
    batch, like holding that many training activations).
    """

    def __init__(self, loss: FunctionalLoss, task: Task, data: IdDataset, batch_size: int, device: torch.device) -> None:
        self.flat = flatten(loss.params, batch_dims=0)
        self.n = len(data)
        self.fns = []
        with task.functional_context(loss.model):
            for b in make_loader(data, task.collate, batch_size=batch_size, shuffle=False):
                batch = b.to(device).data
                _, fn = vjp(grad(lambda f, d=batch: loss.flat_sum(f, d)), self.flat)
                self.fns.append(fn)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        v = v.to(self.flat.dtype)
        return sum(vmap(fn)(v)[0] for fn in self.fns) / self.n


class ExactIHVP(_IHVP):
    """Dense Hessian (``jacrev(grad)``) + Cholesky factorisation in float64. Memory ``D^2``; cost ``D`` HVPs over
    the Hessian sample and ``D^3/3`` flops once, then ``D^2`` per sample."""

    def __init__(self, loss: FunctionalLoss, task: Task, data: IdDataset, *, batch_size: int, damping: float,
                 device: torch.device, max_params: int, chunk_size: int | None) -> None:
        super().__init__()
        flat = flatten(loss.params, batch_dims=0)
        d = flat.numel()
        if d > max_params:
            raise InvalidConfigError(
                f"ihvp='exact' builds a {d}x{d} Hessian, over max_exact_params={max_params}: use ihvp='cg', 'lissa' "
                f"or 'kfac', a smaller scope, or raise max_exact_params"
            )
        hess = torch.zeros(d, d, dtype=torch.float64, device=flat.device)
        with task.functional_context(loss.model):
            for b in make_loader(data, task.collate, batch_size=batch_size, shuffle=False):
                batch = b.to(device).data
                h = jacrev(grad(lambda f: loss.flat_sum(f, batch)), chunk_size=chunk_size or 256)(flat)
                hess += h.detach().double()
        hess = hess / len(data)
        hess = (hess + hess.T) / 2 + damping * torch.eye(d, dtype=hess.dtype, device=hess.device)
        self.chol, status = torch.linalg.cholesky_ex(hess)
        if int(status) != 0:
            low = float(torch.linalg.eigvalsh(hess).min()) - damping
            raise InvalidConfigError(
                f"Hessian + damping is not positive definite (smallest Hessian eigenvalue {low:.3g}, damping {damping}): "
                f"raise damping above {max(-low, 0.0):.3g}"
            )

    def _whiten(self, v: torch.Tensor) -> torch.Tensor:  # L^-1 v^T: [D, R]
        return torch.linalg.solve_triangular(self.chol, v.double().to(self.chol.device).T, upper=False)

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(v.double().to(self.chol.device).T, self.chol).T

    def self_influence(self, v: torch.Tensor) -> torch.Tensor:
        return self._whiten(v).pow(2).sum(0)


class CGIHVP(_IHVP):
    """Batched conjugate gradient on ``(H + damping I) x = v`` (one CG per row, vectorised across rows)."""

    def __init__(self, loss: FunctionalLoss, task: Task, data: IdDataset, *, batch_size: int, damping: float,
                 device: torch.device, iters: int, tol: float) -> None:
        super().__init__()
        self.hvp = _HVP(loss, task, data, batch_size, device)
        self.damping, self.iters, self.tol = float(damping), int(iters), float(tol)
        self.info = {"cg_iters": 0, "cg_max_rel_residual": 0.0}

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        b = v.to(self.hvp.flat.dtype)
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = (r * r).sum(-1)
        bnorm = rs.sqrt().clamp_min(torch.finfo(b.dtype).tiny)
        it = 0
        for it in range(1, self.iters + 1):
            active = rs.sqrt() > self.tol * bnorm
            if not bool(active.any()):
                it -= 1
                break
            ap = self.hvp(p) + self.damping * p
            pap = (p * ap).sum(-1)
            if bool((pap[active] <= 0).any()):
                raise InvalidConfigError(
                    "conjugate gradient met negative curvature: Hessian + damping is not positive definite; raise damping"
                )
            alpha = torch.where(active, rs / pap.where(active, torch.ones_like(pap)), torch.zeros_like(rs))
            x = x + alpha[:, None] * p
            r = r - alpha[:, None] * ap
            rs_new = (r * r).sum(-1)
            beta = torch.where(active, rs_new / rs.where(active, torch.ones_like(rs)), torch.zeros_like(rs))
            p = torch.where(active[:, None], r + beta[:, None] * p, p)
            rs = torch.where(active, rs_new, rs)
        self.info["cg_iters"] = max(self.info["cg_iters"], it)
        self.info["cg_max_rel_residual"] = max(self.info["cg_max_rel_residual"], float((rs.sqrt() / bnorm).max()))
        return x


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
    """

    def __init__(self, loss: FunctionalLoss, task: Task, data: IdDataset, *, batch_size: int, damping: float,
                 device: torch.device, depth: int, repeat: int, scale: float | None, lissa_batch_size: int | None,
                 seed: int) -> None:
        super().__init__()
        self.damping, self.depth, self.repeat, self.seed = float(damping), int(depth), int(repeat), int(seed)
        if self.depth < 1 or self.repeat < 1:
            raise InvalidConfigError(f"lissa_depth and lissa_repeat must be >= 1, got {depth!r}, {repeat!r}")
        self.flat = flatten(loss.params, batch_dims=0)
        n = len(data)
        size = n if lissa_batch_size is None or lissa_batch_size >= n else int(lissa_batch_size)
        # A seeded partition of the Hessian sample into minibatches whose graphs are built once; each recursion
        # step draws one of them at random (seeded).
        perm = np.random.default_rng([self.seed, 1]).permutation(n)
        self.minibatches = []
        for start in range(0, n - size + 1, size):
            rows = np.sort(perm[start : start + size])
            sub = IdDataset(data.base, data.positions[rows], data.ids[rows])
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
        self.info = {"lissa_scale": self.scale, "lissa_depth": self.depth, "lissa_repeat": self.repeat,
                     "lissa_batch_size": size}

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        v = v.to(self.flat.dtype)
        total = torch.zeros_like(v)
        for r in range(self.repeat):
            picks = np.random.default_rng([self.seed, 2, r]).integers(len(self.minibatches), size=self.depth)
            h = v.clone()
            for j in picks:
                h = v + h - (self.minibatches[j](h) + self.damping * h) / self.scale
            if not bool(torch.isfinite(h).all()):
                raise InvalidConfigError("LiSSA diverged: raise lissa_scale (or damping)")
            total = total + h / self.scale
        return total / self.repeat


class KFACIHVP(_IHVP):
    """Eigenvalue-corrected K-FAC (EK-FAC) for ``nn.Linear`` layers.

    Approximation: the Hessian is replaced by the Fisher / Gauss-Newton matrix of the loss (equal to the Hessian
    for a linear model under cross-entropy, PSD otherwise), made block-diagonal across layers. For a layer with
    input ``a`` (with a 1 appended for the bias) and output-gradient ``g``, the per-sample gradient is
    ``sum_t g_t a_t^T``; K-FAC approximates the block as ``A (x) G`` with ``A = E[a a^T]`` (over tokens) and
    ``G = E_samples[sum_t g_t g_t^T]``, both collected with hooks in ordinary backward passes. With
    ``correction=True`` (EK-FAC) only their eigenbases ``Q_A, Q_G`` are kept and the eigenvalues are replaced by
    the exact second moments of the per-sample gradients in that basis, ``E[(Q_G^T dW Q_A)^2]``, which makes the
    approximation exact for any block that is diagonal in the Kronecker eigenbasis. Labels for ``g`` are sampled
    from the model's own predictive distribution (``fisher="mc"``, the true Fisher, ``fisher_samples`` draws,
    seeded) or are the data labels (``"empirical"``). Cost: two forward+backward passes over the Hessian sample
    and one eigendecomposition of ``A`` and ``G`` per layer; memory ``in^2 + out^2 + in*out`` per layer.
    """

    def __init__(self, model: nn.Module, task: Task, params: dict[str, torch.Tensor], data: IdDataset, *,
                 batch_size: int, damping: float, device: torch.device, fisher: str, fisher_samples: int,
                 correction: bool, seed: int) -> None:
        super().__init__()
        if fisher not in ("mc", "empirical"):
            raise InvalidConfigError(f"kfac_fisher must be 'mc' or 'empirical', got {fisher!r}")
        if fisher_samples < 1:
            raise InvalidConfigError(f"fisher_samples must be >= 1, got {fisher_samples!r}")
        self.params = params
        self.damping = float(damping)
        self.layers = kfac_layers(model, params)
        self.model, self.task, self.data, self.device = model, task, data, device
        self.batch_size, self.fisher, self.fisher_samples, self.seed = batch_size, fisher, int(fisher_samples), int(seed)
        n = len(data)
        A = {m: 0.0 for m in self.layers}
        G = {m: 0.0 for m in self.layers}
        tokens = {m: 0 for m in self.layers}
        for acts, gouts in self._passes():
            for m in self.layers:
                a, g = acts[m], gouts[m]  # [B, T, in+1], [S, B, T, out]
                A[m] = A[m] + torch.einsum("bti,btj->ij", a, a)
                tokens[m] += a.shape[0] * a.shape[1]
                G[m] = G[m] + torch.einsum("sbto,sbtp->op", g, g) / g.shape[0]
        self.qa, self.qg, self.lam = {}, {}, {}
        for m in self.layers:
            ea, self.qa[m] = torch.linalg.eigh((A[m] / tokens[m]).double())
            eg, self.qg[m] = torch.linalg.eigh((G[m] / n).double())
            self.lam[m] = torch.outer(eg.clamp_min(0), ea.clamp_min(0))
        if correction:
            lam = {m: 0.0 for m in self.layers}
            for acts, gouts in self._passes():
                for m in self.layers:
                    a = acts[m].double() @ self.qa[m]
                    g = gouts[m].double() @ self.qg[m]
                    # per-sample gradients in the eigenbasis, a few samples at a time (<= ~2^24 entries)
                    step = max(1, (1 << 24) // max(1, g.shape[0] * g.shape[-1] * a.shape[-1]))
                    for i in range(0, a.shape[0], step):
                        dw = torch.einsum("sbto,bti->sboi", g[:, i : i + step], a[i : i + step])
                        lam[m] = lam[m] + dw.pow(2).sum((0, 1)) / g.shape[0]
            self.lam = {m: lam[m] / n for m in self.layers}
        self.info = {"kfac_layers": list(self.layers), "kfac_fisher": fisher, "kfac_correction": bool(correction)}

    def _passes(self):
        """Per Hessian batch: layer inputs ``[B, T, in(+1)]`` and output-gradients ``[S, B, T, out]``."""
        modules = {m: self.model.get_submodule(m) for m in self.layers}
        for bi, b in enumerate(make_loader(self.data, self.task.collate, batch_size=self.batch_size, shuffle=False)):
            data = b.to(self.device).data
            ins: dict[str, list] = {m: [] for m in modules}
            outs: dict[str, list] = {m: [] for m in modules}

            def hook(mod, inp, out, name=None):
                ins[name].append(inp[0].detach())
                outs[name].append(out)

            handles = [mod.register_forward_hook(lambda mod, i, o, name=m: hook(mod, i, o, name)) for m, mod in modules.items()]
            try:
                with torch.enable_grad():
                    out = self.task.forward(self.model, data)
            finally:
                for h in handles:
                    h.remove()
            bsz = out.batch_size
            acts = {}
            for m in modules:
                a = torch.cat([x.reshape(bsz, -1, x.shape[-1]) for x in ins[m]], dim=1)
                if self.layers[m]["bias"] is not None:
                    a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
                acts[m] = a
            flat_outs = [o for m in modules for o in outs[m]]
            gs: dict[str, list] = {m: [] for m in modules}
            for s in range(self.fisher_samples):
                if self.fisher == "mc":
                    gen = torch.Generator(device=out.logits.device).manual_seed(
                        int(np.random.SeedSequence([self.seed, bi, s]).generate_state(1)[0])
                    )
                    probs = out.logits.detach().float().softmax(-1)
                    targets = torch.multinomial(probs, 1, generator=gen).squeeze(1)
                else:
                    targets = out.targets
                loss = TaskOutput(out.logits, targets, out.owner, bsz).sample_loss().sum()
                grads = torch.autograd.grad(loss, flat_outs, retain_graph=s + 1 < self.fisher_samples, allow_unused=True)
                k = 0
                for m in modules:
                    parts = []
                    for o in outs[m]:
                        g = grads[k] if grads[k] is not None else torch.zeros_like(o)
                        parts.append(g.detach().reshape(bsz, -1, g.shape[-1]))
                        k += 1
                    gs[m].append(torch.cat(parts, dim=1))
            yield acts, {m: torch.stack(gs[m]) for m in modules}

    def _matrices(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        d = unflatten(v.double(), self.params)
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
        return flatten({n: out[n] for n in self.params}, batch_dims=1)

    def self_influence(self, v: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for m, mat in self._matrices(v).items():
            rot = self.qg[m].T @ mat @ self.qa[m]
            total = total + (rot.pow(2) / (self.lam[m] + self.damping)).sum((-2, -1))
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


# --------------------------------------------------------------------------------------------------------------
# Selector
# --------------------------------------------------------------------------------------------------------------


@SELECTORS.register("influence")
class InfluenceSelector(ScoreSelector):
    """Score each forget sample ``z`` by its influence (Koh & Liang 2017), with ``H`` the Hessian of the mean
    training loss w.r.t. the parameters in ``scope`` plus ``damping * I``.

    Targets (``g_z`` = gradient of z's loss, ``g_S`` = gradient of the mean loss over set S):

    * ``"self"`` (default): ``g_z^T H^-1 g_z``, the *self-influence*. Removing z from training raises z's own loss
      by ``~ g_z^T H^-1 g_z / n``: it measures how much the model memorised z - how much of z's fit came from
      training on z itself rather than from the rest of the data. That is exactly what unlearning has to undo, and
      it needs no set-level target, so it is the default (it is also ``-I_up,loss(z, z)`` in the paper's notation).
    * ``"forget"`` / ``"retain"``: ``-g_S^T H^-1 g_z = I_up,loss(z, S)``, the derivative of S's mean loss w.r.t.
      up-weighting z (the paper's sign). Removing z changes S's mean loss by ``~ -score / n``. So a *negative* score
      means z helps S: for ``"forget"`` the default ``order="low"`` picks the samples whose removal raises the
      forget loss most; for ``"retain"`` the default ``order="high"`` picks samples whose removal hurts the retain
      loss least (or even helps it).

    IHVP back-ends (``ihvp``):

    * ``"exact"``: dense Hessian ``D x D`` by ``jacrev(grad)`` and a Cholesky factorisation (``D <= max_exact_params``).
    * ``"cg"``: conjugate gradient on Hessian-vector products (double backward via ``torch.func``), batched across
      the samples of a forget batch; needs ``H + damping`` positive definite.
    * ``"lissa"``: stochastic Neumann series (Agarwal et al. 2017); see :class:`LiSSAIHVP`.
    * ``"kfac"``: EK-FAC for ``nn.Linear`` parameters (Fisher/Gauss-Newton approximation); see :class:`KFACIHVP`.
    * ``"auto"`` (default): exact for ``D <= max_exact_params``, else kfac when every parameter is a Linear's, else cg.

    ``damping``: added to H; set it to the L2 / weight-decay strength of the training objective (the task loss
    does not include it) plus any extra damping for a non-convex model. The Hessian is estimated on a seeded
    sample of ``hessian_samples`` rows of ``retain=`` data (``ErasusUnlearner`` passes ``retain=`` to ``select``),
    or of retain + forget with ``hessian_data="retain+forget"``; without retain data it falls back to the forget
    set and records that in ``coreset.info["fallback"]``. ``target="retain"`` requires ``retain=``. ``seed`` drives
    the Hessian sample, LiSSA's minibatches, the power iteration and K-FAC's sampled labels.

    Cost: per-sample gradients of the forget set (one vectorised forward+backward each) plus the IHVP: exact
    ``D`` HVPs over the Hessian sample once and ``O(D^2)`` per sample; cg up to ``cg_iters`` HVPs over the Hessian
    sample per forget batch (for ``"self"``; one solve in total for forget/retain targets); lissa ``depth x repeat``
    minibatch HVPs per forget batch; kfac two passes over the Hessian sample, then ``O(in^2 out + in out^2)`` per
    sample and layer. ``hessian_batch_size`` rows go through each Hessian pass; ``chunk_size`` bounds ``vmap``.

    Example:
        >>> sel = InfluenceSelector(ihvp="cg", damping=1e-3)
        >>> coreset = sel.select(model, forget_loader, retain=retain_loader, fraction=0.1, seed=0)
        >>> coreset.info["hessian_data"]
    """

    default_order = "high"
    forward_only = False

    def __init__(
        self,
        batch_size: int = 64,
        order: str | None = None,
        scope: str | Sequence[str] = "last",
        target: str = "self",
        ihvp: str = "auto",
        damping: float = 0.01,
        hessian_samples: int | None = 512,
        hessian_data: str = "retain",
        hessian_batch_size: int = 256,
        chunk_size: int | None = None,
        max_exact_params: int = 4096,
        cg_iters: int = 100,
        cg_tol: float = 1e-6,
        lissa_depth: int = 500,
        lissa_repeat: int = 1,
        lissa_scale: float | None = None,
        lissa_batch_size: int | None = 64,
        kfac_fisher: str = "mc",
        fisher_samples: int = 1,
        kfac_correction: bool = True,
    ) -> None:
        if target not in TARGETS:
            raise InvalidConfigError(f"target must be one of {TARGETS}, got {target!r}")
        if ihvp not in IHVP_METHODS:
            raise InvalidConfigError(f"ihvp must be one of {IHVP_METHODS}, got {ihvp!r}")
        if not float(damping) >= 0:
            raise InvalidConfigError(f"damping must be >= 0, got {damping!r}")
        if hessian_data not in ("retain", "retain+forget"):
            raise InvalidConfigError(f"hessian_data must be 'retain' or 'retain+forget', got {hessian_data!r}")
        super().__init__(batch_size=batch_size, order=order or ("low" if target == "forget" else "high"))
        self.scope = scope
        self.target = target
        self.ihvp = ihvp
        self.damping = float(damping)
        self.hessian_samples = hessian_samples
        self.hessian_data = hessian_data
        self.hessian_batch_size = int(hessian_batch_size)
        self.chunk_size = chunk_size
        self.max_exact_params = int(max_exact_params)
        self.cg_iters, self.cg_tol = int(cg_iters), float(cg_tol)
        self.lissa_depth, self.lissa_repeat, self.lissa_scale = int(lissa_depth), int(lissa_repeat), lissa_scale
        self.lissa_batch_size = lissa_batch_size
        self.kfac_fisher, self.fisher_samples, self.kfac_correction = kfac_fisher, int(fisher_samples), bool(kfac_correction)

    def _method(self, model: nn.Module, params: dict[str, torch.Tensor]) -> str:
        if self.ihvp != "auto":
            return self.ihvp
        if sum(p.numel() for p in params.values()) <= self.max_exact_params:
            return "exact"
        try:
            kfac_layers(model, params)
            return "kfac"
        except InvalidConfigError:
            return "cg"

    def build_ihvp(self, model: nn.Module, task: Task, params: dict[str, torch.Tensor], data: IdDataset, seed: int) -> _IHVP:
        """The IHVP operator for ``params`` with the Hessian estimated on ``data`` (exposed for tests/analysis)."""
        method = self._method(model, params)
        device = model_device(model)
        loss = FunctionalLoss(model, task, params)
        common = dict(batch_size=self.hessian_batch_size, damping=self.damping, device=device)
        if method == "exact":
            solver: _IHVP = ExactIHVP(loss, task, data, max_params=self.max_exact_params, chunk_size=self.chunk_size, **common)
        elif method == "cg":
            solver = CGIHVP(loss, task, data, iters=self.cg_iters, tol=self.cg_tol, **common)
        elif method == "lissa":
            solver = LiSSAIHVP(loss, task, data, depth=self.lissa_depth, repeat=self.lissa_repeat, scale=self.lissa_scale,
                               lissa_batch_size=self.lissa_batch_size, seed=seed, **common)
        else:
            solver = KFACIHVP(model, task, params, data, fisher=self.kfac_fisher, fisher_samples=self.fisher_samples,
                              correction=self.kfac_correction, seed=seed, **common)
        solver.info["ihvp"] = method
        return solver

    def _select(self, model: nn.Module, forget: IdDataset, task: Task, budget: int, seed: int, **context: Any) -> Coreset:
        info: dict[str, Any] = {}
        coreset = super()._select(model, forget, task, budget, seed, _info=info, **context)
        coreset.info.update(info)
        return coreset

    def score(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, **context: Any) -> np.ndarray:
        info = context.pop("_info", None)
        info = {} if info is None else info
        retain = context.get("retain")
        if self.target == "retain" and (retain is None or len(as_id_dataset(retain)) == 0):
            raise InvalidDataError("influence target='retain' needs retain data: pass select(..., retain=retain_data)")
        params = trainable_params(model, self.scope)
        pool, pool_info = hessian_pool(forget, retain, self.hessian_data, self.hessian_samples, seed)
        info.update(pool_info)
        solver = self.build_ihvp(model, task, params, pool, seed)
        direction = None
        if self.target != "self":
            target_ds = forget if self.target == "forget" else as_id_dataset(retain).sorted()
            g_set = mean_grad(model, task, target_ds, params, self.batch_size)
            direction = solver.solve(g_set.unsqueeze(0))[0]
        scores = []
        for _, g in iter_per_sample_grads(model, task, forget, params, batch_size=self.batch_size, chunk_size=self.chunk_size):
            if direction is None:
                scores.append(solver.self_influence(g).detach().double().cpu())
            else:
                scores.append(-(g.double() @ direction.double().to(g.device)).detach().cpu())
        info.update(solver.info)
        info.update({"target": self.target, "scope": self.scope if isinstance(self.scope, str) else list(self.scope),
                     "num_params": int(sum(p.numel() for p in params.values())), "damping": self.damping})
        return torch.cat(scores).numpy()
