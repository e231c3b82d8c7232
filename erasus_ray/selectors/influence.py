"""Influence functions (Koh & Liang, ICML 2017, "Understanding Black-box Predictions via Influence Functions").

Per-sample influence scores with several inverse-Hessian-vector-product (IHVP) back-ends (see
:mod:`erasus_ray.selectors._ihvp`): a dense curvature matrix (the exact closed-form Hessian of a Linear head, a
Gauss-Newton / Fisher estimate, or the autograd Hessian) with a Cholesky factorisation, conjugate gradient
(Martens 2010; Koh & Liang 2017), LiSSA (Agarwal, Bullins & Hazan, JMLR 2017) and eigenvalue-corrected K-FAC
(Martens & Grosse 2015; George et al. 2018, as used for influence by Grosse et al. 2023); per-sample gradients
optionally JL-projected (TRAK, Park et al. ICML 2023; LoGra, Choe et al. 2024).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from erasus_ray.data import IdDataset, as_id_dataset
from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.selectors._ihvp import (
    CGIHVP,
    DenseIHVP,
    HeadWoodburyIHVP,
    KFACIHVP,
    NotAHeadError,
    LiSSAIHVP,
    _IHVP,
    autograd_hessian,
    check_dense_size,
    ggn_hessian,
    head_candidate,
    head_solver_costs,
    head_stats,
    hessian_pool,
    kfac_layers,
    linear_head,
    linear_head_hessian,
)
from erasus_ray.selectors._checks import probe_batch
from erasus_ray.selectors._solver_settings import (
    SOLVER_KEYWORDS,
    CGSettings,
    DenseSettings,
    KFACSettings,
    LissaSettings,
    SolverSettings,
    solver_knobs,
)
from erasus_ray.selectors._factored import LayerCapture
from erasus_ray.selectors._per_sample import (
    FunctionalLoss,
    GaussianProjector,
    iter_per_sample_grads,
    mean_grad,
    require_gradients,
)
from erasus_ray.selectors.base import SELECTORS, ScoreSelector, SharedState
from erasus_ray.selectors.gradient_norm import trainable_params
from erasus_ray.tasks import Capability, Task
from erasus_ray.tasks.base import TaskOutput
from erasus_ray.utils import model_device

IHVP_METHODS = ("auto", "exact", "ggn", "cg", "lissa", "kfac")
EXACT_SOLVERS = ("auto", "dense", "woodbury")
TARGETS = ("self", "forget", "retain")
#: ``fisher="auto"`` enumerates every class (the exact Fisher) for classifiers with at most this many classes.
MAX_EXPECTED_CLASSES = 64
#: ``fisher_samples=None`` for ``ihvp="ggn"`` draws ``ceil(D / n)`` labels per Hessian sample, at most this many.
MAX_AUTO_DRAWS = 64

__all__ = ["CGSettings", "DenseSettings", "IHVP_METHODS", "InfluenceSelector", "KFACSettings", "LissaSettings", "TARGETS",
           "kfac_layers"]


@dataclass
class _Plan:
    """What the selector decided from the model, data and arguments (shared by every shard)."""

    method: str  # exact | ggn | cg | lissa | kfac
    hessian: str  # closed_form | autograd | ggn | hvp | kfac
    fisher: str
    draws: int
    head: str | None
    solver: str = "dense"  # dense | woodbury (closed-form head Hessian only)


class _InfluenceState:
    """The set-level part of influence: the plan, the Hessian sample, the IHVP operator and (for a set target) the
    direction ``(H + damping I)^-1 g_S``. Pickling (to ship it to Ray actors) keeps the operator only when it is
    self-contained (dense / K-FAC factors); otherwise the shard rebuilds it from the same Hessian sample, which
    gives the same operator."""

    def __init__(self, plan: _Plan, pool: IdDataset, solver: _IHVP | None, direction: torch.Tensor | None) -> None:
        self.plan, self.pool, self.solver, self.direction = plan, pool, solver, direction

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.direction is not None or (self.solver is not None and not self.solver.shippable):
            state["solver"] = None  # a set target needs only the direction; HVP graphs do not pickle
        return state


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
      loss least (or even helps it). ``g_S`` and ``H`` are set-level: :meth:`shared_state` computes them once over
      the whole forget set, and a sharded (Ray) run reuses them on every shard.

    IHVP back-ends (``ihvp``):

    * ``"exact"``: the exact Hessian as a dense ``D x D`` matrix + Cholesky (``D <= max_exact_params``). When the
      scope is a Linear layer whose output is the logits (a classifier head: ``scope="last"``), it is formed in
      closed form from one forward pass, ``(1/n) sum_i (diag p_i - p_i p_i^T) (x) a_i a_i^T``; otherwise by
      ``jacrev(grad)`` (``D`` double-backward passes over the Hessian sample).
      ``exact_solver`` picks how the closed-form head Hessian is inverted: ``"dense"`` (the ``D x D`` matrix and
      its Cholesky factor), ``"woodbury"`` (:class:`~erasus_ray.selectors._ihvp.HeadWoodburyIHVP`: the matrix is
      block-diagonal minus a rank-``n`` term, so ``C`` blocks of ``k x k`` and one ``n x n`` capacitance matrix
      give the same inverse; memory ``n D``), or ``"auto"`` (default): the one with fewer multiply-adds
      (:func:`~erasus_ray.selectors._ihvp.head_solver_costs`; Woodbury whenever ``n`` is well below ``D``, as
      with the default Hessian sample of ``D / (C - 1)`` or ``2 D / (C - 1)`` and three or more classes). Because its memory is
      ``n D``, the Woodbury form also keeps heads with ``D > max_exact_params`` exact as long as
      ``n D <= max_exact_params^2`` (the dense matrix's budget). For ``target="self"`` a sample's head gradient
      is the outer product ``d_z a~_z^T`` of its logit gradient and head input, so the forget set is scored from
      one forward (+ backward to the logits only, in batches of ``hessian_batch_size``) without forming
      ``D``-dimensional gradients. A float32 head runs the large products in float32 (Cholesky factors in float64).
      Digits MLP head (``D = 1290``): dense form 0.14 s per self-influence call; Woodbury at ``n = 287`` 0.04 s;
      with the factor scoring, float32 products, ``n = D / (C - 1) = 146``, LAPACK/BLAS triangular solves and no
      probe pass, ~8 ms (about 2.6 training epochs over the 146 forget samples; ``benchmarks/selector_scoring``);
      scores against the float64 dense form: median relative error 5e-5, Spearman 0.999996 (see
      :class:`~erasus_ray.selectors._ihvp.HeadWoodburyIHVP`). With the closed-form head Hessian the plan needs no
      probe batch: the Hessian pass checks that the layer's output is the logits and that the loss has gradients
      w.r.t. its parameters (:func:`~erasus_ray.selectors._ihvp.head_stats` ``verify=True``).
    * ``"ggn"``: the dense Gauss-Newton matrix (= true Fisher for softmax cross-entropy) ``G^T G / n`` from
      per-sample gradients with labels from the model (``fisher``): PSD, one forward + a few backward passes, and
      the exact Hessian wherever the logits are linear in the scoped parameters (e.g. an LM's final LayerNorm).
    * ``"cg"``: conjugate gradient on exact Hessian-vector products (double backward via ``torch.func``), batched
      across the samples of a forget batch; needs ``H + damping`` positive definite.
    * ``"lissa"``: stochastic Neumann series (Agarwal et al. 2017); see :class:`~erasus_ray.selectors._ihvp.LiSSAIHVP`.
      ``lissa_depth="auto"`` (default) scales the depth with ``scale / damping`` (``ln(100) scale / damping`` steps,
      100 to 20,000) and stops early once the step residual is below ``cg_tol`` (as CG does).
    * ``"kfac"``: EK-FAC for ``nn.Linear`` parameters (Gauss-Newton approximation); see
      :class:`~erasus_ray.selectors._ihvp.KFACIHVP`. For ``target="self"`` scores use EK-FAC's inverse directly
      (one solve per forget sample would cost ``cg_iters`` HVPs each). For a set target (``"forget"`` /
      ``"retain"``) there is only one solve, ``(H + damping I)^-1 g_S``, so EK-FAC serves as the preconditioner of
      ``kfac_cg_iters`` (default 10; 0 = EK-FAC alone) conjugate-gradient steps on exact Hessian-vector products
      started from the EK-FAC solution (Martens & Grosse 2015, sec. 8): EK-FAC's block/basis error is removed
      where it costs one CG run. On the logistic-regression test EK-FAC alone ranks the retain target 0.913 like
      the exact scores; with the preconditioned steps >= 0.999.
    * ``"auto"`` (default): for ``D <= max_exact_params`` the cheapest exact form - ``"exact"`` when the closed form
      applies, else ``"ggn"`` (exact for logits linear in the scope, the PSD Gauss-Newton part of the Hessian
      otherwise, which deep-network influence estimates anyway: Bae et al. 2022); for larger ``D``, ``"exact"``
      (Woodbury) for a head whose ``n D`` fits, else ``"kfac"`` when
      every parameter is a Linear's, else ``"cg"``.

    ``fisher`` (labels for ``ggn`` / ``kfac``): ``"expected"`` (every class weighted by its probability: exact, for
    one prediction unit per sample), ``"mc"`` (``fisher_samples`` labels drawn from the model per unit, seeded),
    ``"empirical"`` (data labels: the empirical Fisher, biased) or ``"auto"`` (expected for classifiers with at
    most 64 classes, else mc). ``fisher_samples=None``: for ggn ``min(64, ceil(D / n))`` draws per sample, the
    fewest that give the ``D x D`` estimate ``>= D`` rank-one terms (full rank; damping covers the remaining noise:
    on the authors GPT-2, 5 to 40 draws all rank like the exact Hessian on the whole retain set, spearman 0.996-0.997;
    each draw costs one backward pass), for kfac 1.

    ``proj_dim``: per-sample gradients are projected by a seeded Gaussian JL map ``P`` (``D -> proj_dim``), streamed
    per batch so peak memory depends on ``batch_size`` / ``chunk_size``, not on the forget-set size; the curvature is
    then ``P^T G P`` from projected Fisher gradients (``ihvp="auto"``/``"ggn"``), or ``P^T H P`` (``"exact"``,
    small ``D`` only), and scores are ``(P^T g_z)^T (P^T H P + damping I)^-1 (P^T g_S)`` (TRAK-style).

    ``solver``: the IHVP back-end and its knobs as one dataclass instead of the flat keywords -
    :class:`DenseSettings` (``ihvp="exact"`` / ``"ggn"``: ``max_params``, ``exact_solver``, ``fisher``),
    :class:`CGSettings` (``max_iter``, ``tol``), :class:`LissaSettings` (``depth``, ``repeat``, ``scale``,
    ``batch_size``, ``tol``) or :class:`KFACSettings` (``correction``, ``cg_iters``, ``tol``, ``fisher``): e.g.
    ``InfluenceSelector(solver=CGSettings(max_iter=50))`` is ``InfluenceSelector(ihvp="cg", cg_iters=50)``.

    ``damping``: added to H; set it to the L2 / weight-decay strength of the training objective (the task loss
    does not include it) plus any extra damping for a non-convex model. The Hessian is estimated on a seeded
    sample of retain (training) data, or of retain + forget with ``hessian_data="retain+forget"``; without retain
    data it falls back to the forget set and records that in ``coreset.info["fallback"]``. ``hessian_samples``: an
    int, None (all of it) or ``"auto"`` (default): ``min(pool, max(|forget|, ceil(r D / (C - 1))))`` with
    ``r = 1`` for ``target="self"`` and ``r = 2`` for the set targets - at least the samples a full-rank estimate
    of the ``D``-dimensional curvature needs (each sample contributes rank ``C - 1``; self-influence measured as
    faithful at ``r = 1`` as at ``r = 2`` against the whole retain set's Hessian, set targets better at ``r = 2``),
    and at least as many as the forget set so the Hessian pass costs about one pass over it
    (:func:`~erasus_ray.selectors._ihvp.hessian_sample_size` has the numbers). ``target="retain"`` requires ``retain=``. ``seed``
    drives the Hessian sample, the model-sampled labels, LiSSA's minibatches, the power iteration and ``P``.

    Cost (``n`` Hessian samples, ``m`` forget samples): per-sample gradients of the forget set - one ordinary
    forward+backward per batch when the scope is Linear / Conv1D / Conv2d / LayerNorm layers, ``torch.func``
    otherwise; exact closed form one forward over the Hessian sample, ``n C^2 k^2 / 2`` flops, a ``D^3 / 3``
    Cholesky and ``m D^2`` to score; ggn one forward and ``C`` / ``draws`` backward passes over the Hessian sample;
    autograd ``D`` HVPs over it; cg up to ``cg_iters`` HVPs over it per forget batch (for ``"self"``; one solve for
    forget/retain targets); lissa ``depth x repeat`` minibatch HVPs per forget batch; kfac two forwards and ``C`` /
    ``draws`` backward passes, then ``O(in^2 out + in out^2)`` per sample and layer. ``hessian_batch_size`` rows go
    through each Hessian pass; ``chunk_size`` bounds ``vmap``.

    Example:
        >>> sel = InfluenceSelector(ihvp="cg", damping=1e-3)
        >>> coreset = sel.select(model, forget_loader, retain=retain_loader, fraction=0.1, seed=0)
        >>> coreset.info["hessian_data"], coreset.info["ihvp"]
    """

    #: per-sample gradients under vmap, and head / Gauss-Newton / Fisher curvature from the logits.
    requires = frozenset({Capability.LOGITS, Capability.INDEPENDENT})

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
        hessian_samples: int | str | None = "auto",
        hessian_data: str = "retain",
        hessian_batch_size: int = 256,
        chunk_size: int | None = None,
        max_exact_params: int = 4096,
        cg_iters: int = 100,
        cg_tol: float = 1e-6,
        lissa_depth: int | str = "auto",
        lissa_repeat: int = 1,
        lissa_scale: float | None = None,
        lissa_batch_size: int | None = 64,
        fisher: str = "auto",
        fisher_samples: int | None = None,
        kfac_correction: bool = True,
        kfac_cg_iters: int = 10,
        proj_dim: int | None = None,
        exact_solver: str = "auto",
        solver: SolverSettings | None = None,
    ) -> None:
        if target not in TARGETS:
            raise InvalidConfigError(f"target must be one of {TARGETS}, got {target!r}")
        if ihvp not in IHVP_METHODS:
            raise InvalidConfigError(f"ihvp must be one of {IHVP_METHODS}, got {ihvp!r}")
        if not float(damping) >= 0:
            raise InvalidConfigError(f"damping must be >= 0, got {damping!r}")
        if hessian_data not in ("retain", "retain+forget"):
            raise InvalidConfigError(f"hessian_data must be 'retain' or 'retain+forget', got {hessian_data!r}")
        flat = {kw: value for kw, value in locals().items() if kw in SOLVER_KEYWORDS}
        ihvp, knobs = solver_knobs(solver, ihvp, flat)  # the solvers' knobs, checked by their settings dataclasses
        if proj_dim is not None:
            if isinstance(proj_dim, bool) or not isinstance(proj_dim, (int, np.integer)) or proj_dim < 1:
                raise InvalidConfigError(f"proj_dim must be a positive integer, got {proj_dim!r}")
            if ihvp not in ("auto", "ggn", "exact"):
                raise InvalidConfigError(
                    f"proj_dim forms the curvature from projected gradients: use ihvp='auto', 'ggn' or 'exact', not {ihvp!r}"
                )
        if hessian_samples not in (None, "auto") and (
            isinstance(hessian_samples, bool) or not isinstance(hessian_samples, (int, np.integer)) or hessian_samples < 1
        ):
            raise InvalidConfigError(f"hessian_samples must be a positive integer, 'auto' or None, got {hessian_samples!r}")
        super().__init__(batch_size=batch_size, order=order or ("low" if target == "forget" else "high"))
        self.scope = scope
        self.target = target
        self.ihvp = ihvp
        self.damping = float(damping)
        self.hessian_samples = hessian_samples
        self.hessian_data = hessian_data
        self.hessian_batch_size = int(hessian_batch_size)
        self.chunk_size = chunk_size
        for kw, value in knobs.items():  # max_exact_params, cg_iters, cg_tol, lissa_*, fisher*, kfac_*, exact_solver
            setattr(self, kw, value)
        self.proj_dim = None if proj_dim is None else int(proj_dim)

    # ---------------------------------------------------------------------------------------------- planning

    def _projector(self, params: dict[str, torch.Tensor], seed: int) -> GaussianProjector | None:
        if self.proj_dim is None:
            return None
        p0 = next(iter(params.values()))
        return GaussianProjector([p.numel() for p in params.values()], self.proj_dim, seed, dtype=p0.dtype, device=p0.device)

    def _plan(self, model: nn.Module, task: Task, params: dict[str, torch.Tensor], probe: Any, n_hessian: int,
              out: TaskOutput | None = None, n_scored: int = 0, capture: LayerCapture | None = None) -> _Plan:
        """Choose the back-end (the ``ihvp="auto"`` rule), the curvature form and the Fisher labels from one batch
        ``probe`` (and its output ``out``; ``capture``: the head candidate's capture of that same forward)."""
        if out is None:
            with torch.no_grad():
                out = task.forward(model, probe)
        classes = int(out.logits.shape[-1])
        one_unit = out.logits.shape[0] == out.batch_size and bool(
            torch.equal(out.owner, torch.arange(out.batch_size, device=out.owner.device))
        )
        head = linear_head(model, task, params, probe, None if capture is None else (capture, out))
        return self._plan_for(model, params, classes, one_unit, head, n_hessian, n_scored)

    def _plan_for(self, model: nn.Module, params: dict[str, torch.Tensor], classes: int, one_unit: bool,
                  head: tuple[str, nn.Linear] | None, n_hessian: int, n_scored: int) -> _Plan:
        """:meth:`_plan`'s rule once the logits' shape and the classifier head (or None) are known."""
        d = sum(p.numel() for p in params.values())
        fisher = self.fisher
        if fisher == "auto":
            fisher = "expected" if one_unit and classes <= MAX_EXPECTED_CLASSES else "mc"
        solver = "dense"
        if head is not None and self.proj_dim is None and self.exact_solver != "dense":
            k = d // classes
            costs = head_solver_costs(n_hessian, classes, k, max(1, n_scored))
            # the Woodbury form holds n x D numbers where the dense one holds D x D: the same memory bound
            fits = n_hessian * d <= self.max_exact_params**2
            if self.exact_solver == "woodbury" or (fits and costs["woodbury"] < costs["dense"]):
                solver = "woodbury"
        method = self.ihvp
        if method == "auto":
            if self.proj_dim is not None:
                method = "ggn"
            elif d <= self.max_exact_params or solver == "woodbury":
                method = "exact" if head is not None else "ggn"
            else:
                try:
                    kfac_layers(model, params)
                    method = "kfac"
                except InvalidConfigError:
                    method = "cg"
        if method == "exact" and self.exact_solver == "woodbury" and head is None:
            raise InvalidConfigError(
                "exact_solver='woodbury' needs the closed-form Hessian of a Linear classifier head (scope='last', "
                "no proj_dim); use exact_solver='auto' or 'dense'"
            )
        if method != "exact":
            solver = "dense"
        dim = self.proj_dim if self.proj_dim is not None else d
        if method == "ggn" or (method == "exact" and solver == "dense"):
            check_dense_size(dim, self.max_exact_params, method)
        if method == "exact" and self.proj_dim is not None:
            check_dense_size(d, self.max_exact_params, "exact")
        draws = self.fisher_samples
        if draws is None:
            draws = min(MAX_AUTO_DRAWS, max(1, math.ceil(dim / max(1, n_hessian)))) if method == "ggn" else 1
        hessian = {"exact": "closed_form" if head is not None else "autograd", "ggn": "ggn", "kfac": "kfac"}.get(method, "hvp")
        return _Plan(method, hessian, fisher, int(draws), None if head is None else head[0], solver)

    def build_ihvp(self, model: nn.Module, task: Task, params: dict[str, torch.Tensor], data: IdDataset, seed: int,
                   plan: _Plan | None = None, verify_head: bool = False) -> _IHVP:
        """The IHVP operator for ``params`` with the curvature estimated on ``data`` (exposed for tests/analysis).
        ``verify_head``: the plan assumed a classifier head without a probe; the Hessian pass checks it
        (:func:`~erasus_ray.selectors._ihvp.head_stats` ``verify=True``)."""
        device = model_device(model)
        if plan is None:
            probe = probe_batch(data, task, device)
            plan = self._plan(model, task, params, probe, len(data))
        loss = FunctionalLoss(model, task, params)
        common = dict(batch_size=self.hessian_batch_size, damping=self.damping, device=device)
        projector = self._projector(params, seed)
        if plan.method in ("exact", "ggn"):
            if plan.hessian == "closed_form" and plan.solver == "woodbury":
                head = (plan.head, model.get_submodule(plan.head))
                solver = HeadWoodburyIHVP(model, task, params, data, head, self.damping,
                                          batch_size=self.hessian_batch_size, device=device, verify=verify_head)
                solver.info.update({"ihvp": plan.method, "hessian": plan.hessian})
                return solver
            if plan.hessian == "closed_form":
                head = (plan.head, model.get_submodule(plan.head))
                hess = linear_head_hessian(model, task, params, data, head, batch_size=self.hessian_batch_size, device=device,
                                           verify=verify_head)
            elif plan.hessian == "autograd":
                hess = autograd_hessian(loss, task, data, batch_size=self.hessian_batch_size, device=device,
                                        chunk_size=self.chunk_size)
            else:
                hess = ggn_hessian(model, task, params, data, batch_size=self.hessian_batch_size, device=device,
                                   labels=plan.fisher, draws=plan.draws, seed=seed, chunk_size=self.chunk_size,
                                   projector=projector)
                projector = None  # already projected
            if projector is not None:  # P^T H P
                hess = projector.project(projector.project(hess.to(projector.dtype)).T).double()
            solver: _IHVP = DenseIHVP(hess, self.damping)
            if plan.hessian == "closed_form":
                solver.info["exact_solver"] = "dense"
        elif plan.method == "cg":
            solver = CGIHVP(loss, task, data, iters=self.cg_iters, tol=self.cg_tol, **common)
        elif plan.method == "lissa":
            solver = LiSSAIHVP(loss, task, data, depth=self.lissa_depth, repeat=self.lissa_repeat, scale=self.lissa_scale,
                               lissa_batch_size=self.lissa_batch_size, seed=seed, tol=self.cg_tol, **common)
        else:
            solver = KFACIHVP(model, task, params, data, fisher=plan.fisher, fisher_samples=plan.draws,
                              correction=self.kfac_correction, seed=seed, **common)
        solver.info.update({"ihvp": plan.method, "hessian": plan.hessian})
        if plan.method in ("ggn", "kfac"):
            solver.info.update({"fisher": plan.fisher, "fisher_samples": plan.draws if plan.fisher == "mc" else None})
        return solver

    # ---------------------------------------------------------------------------------------------- scoring

    def shared_state(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, **context: Any) -> SharedState:
        """The Hessian sample, the IHVP operator and, for a set target, ``(H + damping I)^-1 g_S`` - computed once
        over the whole forget set (the driver computes it for a sharded run and ships it to every shard)."""
        retain = context.get("retain")
        if self.target == "retain" and (retain is None or len(as_id_dataset(retain)) == 0):
            raise InvalidDataError("influence target='retain' needs retain data: pass select(..., retain=retain_data)")
        params = trainable_params(model, self.scope)
        device = model_device(model)
        d = sum(p.numel() for p in params.values())
        per_rank = 1 if self.target == "self" else 2
        n_scored = len(forget) if self.target == "self" else 1
        ready = self._head_without_probe(model, forget, task, seed, retain, params, per_rank, n_scored)
        if ready is None:
            probe = probe_batch(forget, task, device)
            candidate = head_candidate(model, params)  # a classifier head's check shares the gradient check's forward
            capture = None if candidate is None else LayerCapture(dict([candidate]))
            out = require_gradients(model, task, probe, params, "influence", capture=capture)
            pool, info = hessian_pool(forget, retain, self.hessian_data, self.hessian_samples, seed,
                                      dim=self.proj_dim or d, classes=int(out.logits.shape[-1]), per_rank=per_rank)
            plan = self._plan(model, task, params, probe, len(pool), out, n_scored=n_scored, capture=capture)
            solver = self.build_ihvp(model, task, params, pool, seed, plan)
        else:
            pool, info, plan, solver = ready
        direction = None
        if self.target != "self":
            target_ds = forget if self.target == "forget" else as_id_dataset(retain).sorted()
            g_set = mean_grad(model, task, target_ds, params, self.batch_size).unsqueeze(0)
            projector = self._projector(params, seed)
            if projector is not None:
                g_set = projector.project(g_set)
            if plan.method == "kfac" and self.kfac_cg_iters > 0:  # EK-FAC-preconditioned CG on the one direction
                refine = CGIHVP(FunctionalLoss(model, task, params), task, pool, batch_size=self.hessian_batch_size,
                                damping=self.damping, device=device, iters=self.kfac_cg_iters, tol=self.cg_tol,
                                preconditioner=solver)
                direction = refine.solve(g_set)[0].detach()
                info.update({"kfac_cg_iters": refine.info["cg_iters"], "kfac_cg_rel_residual": refine.info["cg_max_rel_residual"]})
            else:
                direction = solver.solve(g_set)[0].detach()
        info.update(solver.info)
        info.update({"target": self.target, "scope": self.scope if isinstance(self.scope, str) else list(self.scope),
                     "num_params": int(d), "damping": self.damping, "proj_dim": self.proj_dim})
        return SharedState(_InfluenceState(plan, pool, solver, direction), info)

    def _head_without_probe(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, retain: Any,
                            params: dict[str, torch.Tensor], per_rank: int, n_scored: int) -> tuple | None:
        """The closed-form head path planned from the layer alone: when the scope is one untied ``nn.Linear`` and the
        plan gives its closed-form Hessian, the Hessian pass itself checks that the layer's output is the logits and
        that the loss has gradients w.r.t. it (``verify``), so the probe forward + backward is not needed. Returns
        ``(pool, info, plan, solver)``, or None (not a head after all, or another back-end): then the probe path runs."""
        if self.proj_dim is not None or self.ihvp not in ("auto", "exact"):
            return None
        candidate = head_candidate(model, params)
        if candidate is None or len(forget) == 0:
            return None
        d = sum(p.numel() for p in params.values())
        classes = int(candidate[1].out_features)
        pool, info = hessian_pool(forget, retain, self.hessian_data, self.hessian_samples, seed, dim=d, classes=classes,
                                  per_rank=per_rank)
        try:
            plan = self._plan_for(model, params, classes, True, candidate, len(pool), n_scored)
        except InvalidConfigError:
            return None  # let the probe path decide (and word) it
        if plan.hessian != "closed_form":
            return None
        try:
            solver = self.build_ihvp(model, task, params, pool, seed, plan, verify_head=True)
        except NotAHeadError:
            return None
        return pool, info, plan, solver

    def score(self, model: nn.Module, forget: IdDataset, task: Task, seed: int, *, shared: SharedState | None = None,
              **context: Any) -> np.ndarray:
        state = shared if shared is not None else self.shared_state(model, forget, task, seed, **context)
        st: _InfluenceState = state.value
        params = trainable_params(model, self.scope)
        solver = st.solver
        if st.direction is None and solver is None:  # shipped without its (unpicklable) operator: rebuild it
            solver = st.solver = self.build_ihvp(model, task, params, st.pool, seed, st.plan)
        projector = self._projector(params, seed)
        if st.direction is None and projector is None and isinstance(solver, HeadWoodburyIHVP):
            # a head's per-sample gradient is d_z a~_z^T: score from one forward (+ backward to the logits)
            head = (solver.head_name, model.get_submodule(solver.head_name))
            a, d = head_stats(model, task, forget, head, solver.with_bias, batch_size=self.hessian_batch_size,
                               device=model_device(model), dtype=solver.dtype, logit_grads=True)
            state.info.update(solver.info)
            return solver.self_influence_factors(a, d).detach().cpu().numpy()
        scores = []
        for _, g in iter_per_sample_grads(model, task, forget, params, batch_size=self.batch_size,
                                          chunk_size=self.chunk_size, projector=projector):
            if st.direction is None:
                scores.append(solver.self_influence(g).detach().double().cpu())
            else:
                scores.append(-(g.double() @ st.direction.double().to(g.device)).detach().cpu())
        if solver is not None:
            state.info.update(solver.info)
        return torch.cat(scores).numpy()
