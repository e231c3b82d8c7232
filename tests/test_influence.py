"""Influence functions on an L2-regularised multinomial logistic regression (one nn.Linear, convex):
closed form with the exact Hessian, CG / LiSSA / EK-FAC against it, and leave-one-out retraining."""

import copy
import math

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn
from torch.utils.data import Dataset

from erasus_ray.data import as_id_dataset
from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.selectors import get_selector
from erasus_ray.tasks import ClassificationTask

N, D, C, LAM = 60, 4, 3, 0.01
FORGET = 20  # ids 0..19 are the forget set, 20..59 the retain set


class Points(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _loss(w, b, x, y, weights=None):
    ce = nn.functional.cross_entropy(x @ w.T + b, y, reduction="none")
    weights = torch.ones_like(ce) if weights is None else weights
    return (weights * ce).sum() / N + LAM / 2 * (w.pow(2).sum() + b.pow(2).sum())


def _fit(x, y, weights=None, init=None):
    w = (torch.zeros(C, D, dtype=torch.float64) if init is None else init[0].clone()).requires_grad_()
    b = (torch.zeros(C, dtype=torch.float64) if init is None else init[1].clone()).requires_grad_()
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _loss(w, b, x, y, weights)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return w.detach(), b.detach()


@pytest.fixture(scope="module")
def logreg():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(C, D, generator=g, dtype=torch.float64) * 1.5
    y = torch.arange(N) % C
    x = centers[y] + torch.randn(N, D, generator=g, dtype=torch.float64)
    flip = torch.randperm(N, generator=g)[:6]  # some label noise, so some points are poorly fit (high influence)
    y = y.clone()
    y[flip] = (y[flip] + 1) % C
    w, b = _fit(x, y)
    model = nn.Linear(D, C).double()
    with torch.no_grad():
        model.weight.copy_(w)
        model.bias.copy_(b)
    full = as_id_dataset(Points(x, y))
    forget, retain = full.subset(range(FORGET)), full.subset(range(FORGET, N))
    # Closed form in the parameter order of named_parameters(): weight (row-major), then bias.
    xt = torch.cat([x, torch.ones(N, 1, dtype=torch.float64)], 1)
    p = (x @ w.T + b).softmax(-1)
    err = p - nn.functional.one_hot(y, C).double()
    gmat = err[:, :, None] * xt[:, None, :]  # [N, C, D+1]
    grads = torch.cat([gmat[:, :, :D].reshape(N, -1), gmat[:, :, D]], 1)
    order = torch.cat([torch.arange(C * (D + 1)).view(C, D + 1)[:, :D].reshape(-1), torch.arange(C) * (D + 1) + D])
    s = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    hess = torch.einsum("ncd,nij->cidj", s, xt[:, :, None] * xt[:, None, :]).reshape(C * (D + 1), C * (D + 1)) / N
    hess = hess[order][:, order] + LAM * torch.eye(C * (D + 1), dtype=torch.float64)
    hinv_g = torch.linalg.solve(hess, grads.T).T
    closed = {
        "self": (grads * hinv_g).sum(1)[:FORGET].numpy(),
        "retain": -(hinv_g @ grads[FORGET:].mean(0))[:FORGET].numpy(),
        "forget": -(hinv_g @ grads[:FORGET].mean(0))[:FORGET].numpy(),
    }
    return {"model": model, "forget": forget, "retain": retain, "closed": closed, "x": x, "y": y, "w": w, "b": b}


def _scores(lr, **kwargs):
    kwargs = {"scope": "all", "damping": LAM, "hessian_data": "retain+forget", "hessian_samples": None, **kwargs}
    sel = get_selector("influence", **kwargs)
    core = sel.select(lr["model"], lr["forget"], task=ClassificationTask(), k=5, seed=0, retain=lr["retain"])
    return np.array([core.scores[i] for i in range(FORGET)]), core


@pytest.mark.parametrize("ihvp", ["exact", "cg"])
@pytest.mark.parametrize("target", ["self", "retain", "forget"])
def test_exact_and_cg_match_closed_form(logreg, ihvp, target):
    got, core = _scores(logreg, ihvp=ihvp, target=target, cg_tol=1e-10)
    ref = logreg["closed"][target]
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 1e-4, f"{ihvp}/{target}: relative error {rel:.2e}"
    assert core.info["ihvp"] == ihvp and core.info["hessian_samples"] == N and "fallback" not in core.info


LISSA = [
    {"ihvp": "lissa", "lissa_batch_size": None, "lissa_depth": 200},  # deterministic Neumann series
    {"ihvp": "lissa", "lissa_batch_size": 30, "lissa_depth": 200, "lissa_repeat": 3},  # stochastic minibatches
]
# fisher="auto" is the expected (exact true) Fisher for this 3-class classifier; MC needs many draws on 60 points.
# With the default kfac_cg_iters the set targets' one direction is refined by EK-FAC-preconditioned CG.
KFAC = [{"ihvp": "kfac"}, {"ihvp": "kfac", "fisher": "mc", "fisher_samples": 200}]
# EK-FAC alone (kfac_cg_iters=0): its best possible rank correlation on this problem (see
# test_kfac_is_the_ekfac_oracle) is self 0.985, forget 0.984, retain 0.913 - retain's target gradient is 10% of a
# sample's, so dropping the off-diagonal 36% of the Hessian in the Kronecker eigenbasis reorders it.
KFAC_ALONE_BOUND = {"self": 0.95, "forget": 0.95, "retain": 0.9}


@pytest.mark.parametrize("kwargs", LISSA + KFAC)
@pytest.mark.parametrize("target", ["self", "retain", "forget"])
def test_lissa_and_kfac_rank_like_exact(logreg, kwargs, target):
    got, core = _scores(logreg, target=target, **kwargs)
    rho = spearmanr(got, logreg["closed"][target]).statistic
    assert rho >= 0.95, f"{kwargs} {target}: spearman {rho:.3f}"
    assert core.info["ihvp"] == kwargs["ihvp"]
    if kwargs["ihvp"] == "kfac" and target != "self":
        assert 1 <= core.info["kfac_cg_iters"] <= 10


def test_lissa_auto_depth_scales_with_scale_over_damping():
    """lissa_depth="auto": ln(100) scale / damping steps (every eigen-direction keeps >= 99% of its contribution),
    clamped to LISSA_AUTO_DEPTH; damping 0 takes the cap."""
    from erasus_ray.selectors._ihvp import LISSA_AUTO_DEPTH, lissa_auto_depth

    assert lissa_auto_depth(1.0, 0.01) == math.ceil(math.log(100) * 100) == 461
    assert lissa_auto_depth(2.0, 0.01) == 922 and lissa_auto_depth(1.0, 0.001) == 4606
    assert lissa_auto_depth(1.0, 1.0) == LISSA_AUTO_DEPTH[0]
    assert lissa_auto_depth(1.0, 0.0) == lissa_auto_depth(1.0, 1e-9) == LISSA_AUTO_DEPTH[1]
    for bad in (0, -3, "deep", 2.5, True):
        with pytest.raises(InvalidConfigError, match="lissa_depth"):
            get_selector("influence", ihvp="lissa", lissa_depth=bad)


def test_lissa_default_depth_follows_damping_and_stops_on_the_residual(logreg):
    """By default LiSSA runs lissa_auto_depth(scale, damping) steps at most and stops once every row's step (its
    residual) is below cg_tol relative to the row: here well before the depth, at the exact scores."""
    from erasus_ray.selectors._ihvp import lissa_auto_depth

    got, core = _scores(logreg, ihvp="lissa", target="self", lissa_batch_size=None, cg_tol=1e-5)
    assert core.info["lissa_depth"] == lissa_auto_depth(core.info["lissa_scale"], LAM)
    assert 0 < core.info["lissa_steps"] < core.info["lissa_depth"]
    ref = logreg["closed"]["self"]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-3


@pytest.mark.slow
def test_lissa_default_depth_converges_at_small_damping():
    """At small damping (5e-4 against a top eigenvalue ~0.4) a fixed 500-step LiSSA is under-converged along the
    small-eigenvalue directions (median score 0.89 of exact here; the audit saw 0.85 on the digits MLP), while the
    default depth (ln(100) scale / damping: 3419 steps) reaches the exact scores (measured median 1.0000, largest
    deviation 1e-4). An untrained logistic regression whose features mostly have small scales, so most of every
    gradient lies along eigenvalues near the damping. ~4,000 Hessian-vector products: ~5 s idle, a minute or more
    on a loaded 2-core machine."""
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1.0, 0.05, 0.05, 0.05, 0.05, 0.05], dtype=torch.float64)
    x = torch.randn(N, len(scales), generator=g, dtype=torch.float64) * scales
    y = torch.randint(0, C, (N,), generator=g)
    model = nn.Linear(len(scales), C).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(C, len(scales), generator=g, dtype=torch.float64) * 0.3)
        model.bias.zero_()
    full = as_id_dataset(Points(x, y))
    lr = {"model": model, "forget": full.subset(range(FORGET)), "retain": full.subset(range(FORGET, N))}
    damping = 5e-4
    exact, _ = _scores(lr, ihvp="exact", target="self", damping=damping)
    fixed, _ = _scores(lr, ihvp="lissa", target="self", damping=damping, lissa_batch_size=None, lissa_depth=500)
    auto, core = _scores(lr, ihvp="lissa", target="self", damping=damping, lissa_batch_size=None)
    assert np.median(fixed / exact) < 0.95  # the old fixed default is under-converged on this problem
    assert core.info["lissa_depth"] > 3000
    assert np.median(auto / exact) >= 0.97 and spearmanr(auto, exact).statistic >= 0.99
    assert np.max(np.abs(auto / exact - 1)) < 0.01


def test_kfac_preconditioned_cg_converges_to_exact(logreg):
    """EK-FAC as the preconditioner of CG on the set target's one direction: a few steps reach the exact scores
    (and the preconditioner makes CG converge faster than plain CG from zero)."""
    for target in ("retain", "forget"):
        got, core = _scores(logreg, ihvp="kfac", target=target, kfac_cg_iters=50, cg_tol=1e-10)
        ref = logreg["closed"][target]
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4, target
        _, plain = _scores(logreg, ihvp="cg", target=target, cg_tol=1e-10)
        assert core.info["kfac_cg_iters"] < plain.info["cg_iters"], (target, core.info["kfac_cg_iters"], plain.info["cg_iters"])


@pytest.mark.parametrize("target", ["self", "retain", "forget"])
def test_kfac_alone_ranks_like_exact(logreg, target):
    got, _ = _scores(logreg, ihvp="kfac", target=target, kfac_cg_iters=0)
    rho = spearmanr(got, logreg["closed"][target]).statistic
    assert rho >= KFAC_ALONE_BOUND[target], f"{target}: spearman {rho:.3f}"


def _ekfac_oracle(lr):
    """EK-FAC from the exact expected factors in closed form: A = E[a a^T], G = E[diag p - p p^T], and eigenvalues
    = the exact Hessian's diagonal in the Kronecker eigenbasis (the Frobenius-optimal EK-FAC for that basis)."""
    x, y, w, b = lr["x"], lr["y"], lr["w"], lr["b"]
    xt = torch.cat([x, torch.ones(N, 1, dtype=torch.float64)], 1)
    p = (x @ w.T + b).softmax(-1)
    s = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    k = D + 1
    hess = torch.einsum("ncd,nij->cidj", s, xt[:, :, None] * xt[:, None, :]).reshape(C * k, C * k) / N
    qa = torch.linalg.eigh(xt.T @ xt / N)[1].contiguous()
    qg = torch.linalg.eigh(s.mean(0))[1].contiguous()
    q = torch.kron(qg, qa)
    lam = torch.einsum("di,de,ei->i", q, hess, q)
    g = ((p - nn.functional.one_hot(y, C).double())[:, :, None] * xt[:, None, :]).reshape(N, -1)
    hg = ((g @ q) / (lam + LAM)) @ q.T
    off = q.T @ hess @ q
    off_mass = float((off - torch.diag(torch.diag(off))).norm() / off.norm())
    scores = {"self": (g * hg).sum(1)[:FORGET], "retain": -(hg[:FORGET] @ g[FORGET:].mean(0)),
              "forget": -(hg[:FORGET] @ g[:FORGET].mean(0))}
    return {t: v.numpy() for t, v in scores.items()}, off_mass


def test_kfac_is_the_ekfac_oracle(logreg):
    """K-FAC with the expected Fisher reproduces the closed-form EK-FAC exactly (so the eigenvalue correction, the
    bias as a homogeneous coordinate and the Fisher are right), and that oracle's rank correlation with the exact
    scores is what bounds K-FAC here: >= 0.95 for self and forget, 0.913 for retain."""
    oracle, off_mass = _ekfac_oracle(logreg)
    for target in ("self", "retain", "forget"):
        got, core = _scores(logreg, ihvp="kfac", target=target, kfac_cg_iters=0)
        assert core.info["fisher"] == "expected"
        np.testing.assert_allclose(got, oracle[target], rtol=1e-6, atol=1e-9)
        rho = spearmanr(oracle[target], logreg["closed"][target]).statistic
        assert rho >= KFAC_ALONE_BOUND[target], (target, rho)
    assert spearmanr(oracle["retain"], logreg["closed"]["retain"]).statistic < 0.95  # why retain's bound is 0.9
    assert 0.3 < off_mass < 0.4  # the part of the Hessian the Kronecker eigenbasis leaves off the diagonal


def test_ekfac_correction_one_gemm_equals_per_sample_gradients():
    """EK-FAC's corrected eigenvalues with one token per sample are one GEMM of the class-summed squared
    output-gradients and the squared inputs; that equals summing every per-sample gradient's square (the reference
    form, still used for several tokens per sample) to float64 rounding."""
    from erasus_ray.selectors import _ihvp

    g = torch.Generator().manual_seed(3)
    grads, acts = torch.randn(4, 9, 1, 5, generator=g, dtype=torch.float64), torch.randn(9, 1, 7, generator=g, dtype=torch.float64)
    fast, ref = _ihvp.eigenbasis_second_moment(grads, acts), _ihvp._eigenbasis_second_moment_per_sample(grads, acts)
    assert fast.shape == (5, 7)
    assert float((fast - ref).abs().max() / ref.abs().max()) < 1e-10
    tokens = torch.randn(4, 9, 3, 5, generator=g, dtype=torch.float64), torch.randn(9, 3, 7, generator=g, dtype=torch.float64)
    assert torch.equal(_ihvp.eigenbasis_second_moment(*tokens), _ihvp._eigenbasis_second_moment_per_sample(*tokens))


def test_kfac_scores_with_the_one_gemm_correction_equal_the_reference(logreg, monkeypatch):
    """The whole EK-FAC path (expected Fisher, every class's output-gradients) scores the same with the GEMM form of
    the eigenvalue correction as with per-sample gradients formed explicitly."""
    from erasus_ray.selectors import _ihvp

    fast, _ = _scores(logreg, ihvp="kfac", target="self", fisher="expected", kfac_cg_iters=0)
    monkeypatch.setattr(_ihvp, "eigenbasis_second_moment", _ihvp._eigenbasis_second_moment_per_sample)
    ref, _ = _scores(logreg, ihvp="kfac", target="self", fisher="expected", kfac_cg_iters=0)
    assert np.max(np.abs(fast - ref) / np.abs(ref)) < 1e-10


def test_kfac_empirical_fisher_ranks_self_influence(logreg):
    """The empirical Fisher (data labels) is a different matrix from the Hessian; it still ranks self-influence."""
    got, core = _scores(logreg, ihvp="kfac", fisher="empirical", target="self")
    assert spearmanr(got, logreg["closed"]["self"]).statistic >= 0.95 and core.info["fisher"] == "empirical"


def test_predicted_removal_effect_matches_leave_one_out(logreg):
    x, y = logreg["x"], logreg["y"]
    self_inf, _ = _scores(logreg, ihvp="exact", target="self")
    ret_inf, _ = _scores(logreg, ihvp="exact", target="retain")

    def losses(w, b):
        ce = nn.functional.cross_entropy(x @ w.T + b, y, reduction="none")
        return ce

    base = losses(logreg["w"], logreg["b"])
    actual_self, actual_retain = [], []
    for z in range(FORGET):
        keep = torch.ones(N, dtype=torch.float64)
        keep[z] = 0
        w, b = _fit(x, y, keep, init=(logreg["w"], logreg["b"]))
        new = losses(w, b)
        actual_self.append(float(new[z] - base[z]))
        actual_retain.append(float(new[FORGET:].mean() - base[FORGET:].mean()))
    # removal = up-weighting by -1/n: d(own loss) ~ +self/n, d(set loss) ~ -score/n
    r_self = pearsonr(self_inf / N, actual_self).statistic
    r_ret = pearsonr(-ret_inf / N, actual_retain).statistic
    assert r_self >= 0.9 and r_ret >= 0.9, (r_self, r_ret)
    # first order: the prediction is of the right size, not just correlated
    ratio = np.median(np.asarray(actual_self) / (self_inf / N))
    assert 0.7 < ratio < 1.5, ratio


def test_fallback_and_errors(logreg):
    task = ClassificationTask()
    core = get_selector("influence", damping=LAM).select(logreg["model"], logreg["forget"], task=task, k=3)
    assert core.info["hessian_data"] == "forget" and "forget set" in core.info["fallback"]
    with pytest.raises(InvalidDataError, match="retain"):
        get_selector("influence", target="retain").select(logreg["model"], logreg["forget"], task=task, k=3)
    with pytest.raises(InvalidConfigError, match="max_exact_params"):
        get_selector("influence", scope="all", ihvp="exact", max_exact_params=4).select(logreg["model"], logreg["forget"], task=task, k=3)
    with pytest.raises(InvalidConfigError, match="ihvp"):
        get_selector("influence", ihvp="newton")


def test_kfac_rejects_non_linear_params(tiny_lm):
    with pytest.raises(InvalidConfigError, match="nn.Linear"):
        get_selector("influence", ihvp="kfac").select(tiny_lm["model"], tiny_lm["forget"], task=tiny_lm["task"], k=2)


def test_lm_methods_agree(tiny_lm):
    """On the tiny GPT-2 (scope: final layer norm), CG reproduces the exact Hessian's scores."""
    kw = dict(task=tiny_lm["task"], k=3, seed=0, retain=tiny_lm["retain"])
    ex = get_selector("influence", ihvp="exact").select(tiny_lm["model"], tiny_lm["forget"], **kw)
    cg = get_selector("influence", ihvp="cg", cg_tol=1e-8).select(tiny_lm["model"], tiny_lm["forget"], **kw)
    a = np.array([ex.scores[i] for i in sorted(ex.scores)])
    b = np.array([cg.scores[i] for i in sorted(cg.scores)])
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-3


# --- curvature forms ------------------------------------------------------------------------------------------


def _mlp(seed=0, hidden=6, act=True):
    torch.manual_seed(seed)
    layers = [nn.Linear(D, hidden), nn.Tanh(), nn.Linear(hidden, C)] if act else [nn.Linear(D, hidden), nn.Linear(hidden, C)]
    return nn.Sequential(*layers).double().eval()


def test_closed_form_linear_head_equals_dense_hessian(logreg):
    """The closed-form Hessian of a Linear head, (1/n) sum (diag p - p p^T) (x) a a^T from one forward pass, equals
    jacrev(grad)'s dense Hessian - for the logistic regression and for the head of a nonlinear MLP."""
    from erasus_ray.selectors import trainable_params
    from erasus_ray.selectors._ihvp import autograd_hessian, linear_head, linear_head_hessian
    from erasus_ray.selectors._per_sample import FunctionalLoss

    task, data = ClassificationTask(), as_id_dataset(Points(logreg["x"], logreg["y"]))
    probe = (logreg["x"][:8], logreg["y"][:8])
    for model in (logreg["model"], _mlp()):
        params = trainable_params(model, "last")
        head = linear_head(model, task, params, probe)
        assert head is not None
        fast = linear_head_hessian(model, task, params, data, head, batch_size=17, device=torch.device("cpu"))
        dense = autograd_hessian(FunctionalLoss(model, task, params), task, data, batch_size=17, device=torch.device("cpu"), chunk_size=None)
        torch.testing.assert_close(fast, dense, rtol=1e-10, atol=1e-12)
    # not a head: a hidden layer, or a head whose output is post-processed
    mlp = _mlp()
    assert linear_head(mlp, task, trainable_params(mlp, ["0"]), probe) is None
    scaled = nn.Sequential(logreg["model"], nn.Tanh())
    assert linear_head(scaled, task, trainable_params(scaled, "all"), probe) is None
    # the same answers from the gradient check's forward (gradients on: LayerCapture hands the network a copy)
    from erasus_ray.selectors._checks import require_gradients
    from erasus_ray.selectors._factored import LayerCapture
    from erasus_ray.selectors._ihvp import head_candidate

    for model, expected in ((_mlp(), True), (scaled, False)):
        params = trainable_params(model, "last" if expected else "all")
        capture = LayerCapture(dict([head_candidate(model, params)]))
        out = require_gradients(model, task, probe, params, "test", capture=capture)
        assert (linear_head(model, task, params, probe, (capture, out)) is not None) is expected


def test_head_plan_needs_no_probe_and_falls_back_when_not_a_head(logreg, monkeypatch):
    """A classifier head is planned from the layer alone: the Hessian pass checks it (no probe forward/backward).
    A Linear whose output is post-processed (tanh) fails that check and goes the probe way - to the same
    Gauss-Newton scores as asking for ihvp='ggn' directly; and a head whose inputs are all zero is named as
    receiving no gradient, as the probe check names it."""
    import erasus_ray.selectors.influence as influence_mod
    from erasus_ray.errors import NonDifferentiableModelError

    task = ClassificationTask()
    probes = []
    real_probe = influence_mod.probe_batch
    monkeypatch.setattr(influence_mod, "probe_batch", lambda *a, **k: probes.append(1) or real_probe(*a, **k))
    kw = dict(task=task, k=5, seed=0, retain=logreg["retain"])
    core = get_selector("influence", damping=LAM).select(logreg["model"], logreg["forget"], **kw)
    assert core.info["hessian"] == "closed_form" and probes == []
    wrapped = nn.Sequential(copy.deepcopy(logreg["model"]), nn.Tanh()).eval()
    got = get_selector("influence", damping=LAM).select(wrapped, logreg["forget"], **kw)
    assert got.info["ihvp"] == "ggn" and probes  # fell back to the probe path
    ref = get_selector("influence", damping=LAM, ihvp="ggn").select(wrapped, logreg["forget"], **kw)
    assert got.scores.keys() == ref.scores.keys()
    np.testing.assert_allclose([got.scores[i] for i in ref.scores], list(ref.scores.values()), rtol=1e-12)
    # dead inputs: ReLU after a layer whose bias drives every pre-activation negative
    dead = nn.Sequential(nn.Linear(D, 5), nn.ReLU(), nn.Linear(5, C)).double().eval()
    with torch.no_grad():
        dead[0].bias.fill_(-1e6)
    with pytest.raises(NonDifferentiableModelError, match=r"1 of 2.*'2\.weight'"):
        get_selector("influence", damping=LAM).select(dead, logreg["forget"], **kw)


def test_auto_picks_the_closed_form_for_a_head(logreg):
    got, core = _scores(logreg, target="self")  # ihvp="auto"
    assert core.info["ihvp"] == "exact" and core.info["hessian"] == "closed_form"
    ref = logreg["closed"]["self"]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-6


def _explicit_ggn(model, params, x, y):
    """sum_i J_i^T (diag p_i - p_i p_i^T) J_i / n with J_i = d logits_i / d params (jacrev), in flat order."""
    from torch.func import functional_call, jacrev

    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in params}

    def logits(p):
        return functional_call(model, {**fixed, **p}, (x,))

    jac = jacrev(logits)(params)  # name -> [n, C, *shape]
    j = torch.cat([v.reshape(len(x), C, -1) for v in jac.values()], -1)
    p = logits(params).softmax(-1)
    s = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("nca,ncd,ndb->ab", j, s, j) / len(x)


@pytest.mark.parametrize("method", ["factored", "func"])
def test_ggn_equals_explicit_gauss_newton_and_hessian_where_linear(logreg, method):
    """ihvp='ggn' with all labels weighted (expected) is J^T S J exactly - by layer factors and by torch.func - and
    equals the dense Hessian when the logits are linear in the scoped parameters (a hidden layer under a linear
    head); under a tanh it is the Hessian's PSD Gauss-Newton part, not the Hessian."""
    from erasus_ray.selectors import trainable_params
    from erasus_ray.selectors._ihvp import autograd_hessian
    from erasus_ray.selectors._per_sample import FunctionalLoss, fisher_gradients

    x, y = logreg["x"], logreg["y"]
    task = ClassificationTask()
    data = as_id_dataset(Points(x, y))
    for act in (False, True):
        model = _mlp(act=act)
        params = trainable_params(model, ["0"])
        rows, weight = fisher_gradients(model, task, (x, y), params, labels="expected", method=method)
        flat = rows.reshape(-1, rows.shape[-1])
        ggn = weight * flat.T @ flat / len(x)
        torch.testing.assert_close(ggn, _explicit_ggn(model, params, x, y), rtol=1e-9, atol=1e-12)
        hess = autograd_hessian(FunctionalLoss(model, task, params), task, data, batch_size=64, device=torch.device("cpu"), chunk_size=None)
        gap = float((ggn - hess).norm() / hess.norm())
        assert (gap < 1e-9) if not act else (gap > 1e-3), (act, gap)


def test_ggn_mc_labels_are_unbiased_on_lm_final_layer_norm(tiny_lm):
    """On the GPT-2's final LayerNorm (logits linear in it: Hessian = Gauss-Newton) the Monte-Carlo Fisher from
    model-sampled labels converges to the autograd Hessian at the 1/sqrt(draws) rate of an unbiased estimate."""
    from erasus_ray.selectors import trainable_params
    from erasus_ray.selectors._ihvp import autograd_hessian, ggn_hessian
    from erasus_ray.selectors._per_sample import FunctionalLoss

    model, task, data = tiny_lm["model"].eval(), tiny_lm["task"], tiny_lm["retain"]
    params = trainable_params(model, "last")
    assert set(params) == {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    cpu = torch.device("cpu")
    hess = autograd_hessian(FunctionalLoss(model, task, params), task, data, batch_size=64, device=cpu, chunk_size=None)
    errs = []
    for draws in (50, 800):
        g = ggn_hessian(model, task, params, data, batch_size=64, device=cpu, labels="mc", draws=draws, seed=0, chunk_size=None)
        errs.append(float((g - hess).norm() / hess.norm()))
    assert errs[1] < 0.2 and errs[1] < 0.5 * errs[0], errs  # 1/sqrt(16) = 0.25 expected ratio; measured 0.46 -> 0.13


def test_hessian_samples_rule(logreg):
    from erasus_ray.selectors._ihvp import hessian_sample_size

    assert hessian_sample_size(pool=1291, forget=146, dim=1290, classes=10) == 287  # ceil(2 * 1290 / 9)
    assert hessian_sample_size(pool=3600, forget=400, dim=650, classes=10) == 400  # the forget set dominates
    assert hessian_sample_size(pool=180, forget=20, dim=192, classes=846) == 20
    assert hessian_sample_size(pool=100, forget=20, dim=5000, classes=2) == 100  # never more than the pool
    core = get_selector("influence", scope="all", damping=LAM).select(
        logreg["model"], logreg["forget"], task=ClassificationTask(), k=3, retain=logreg["retain"])
    assert core.info["hessian_samples"] == min(40, max(20, int(np.ceil(15 / 2))))
    # a small forget set: self-influence asks for ceil(D / (C - 1)) = 8 samples, a set target for twice that
    small = logreg["forget"].subset(range(5))
    for target, want in (("self", 8), ("forget", 15)):
        core = get_selector("influence", scope="all", damping=LAM, target=target).select(
            logreg["model"], small, task=ClassificationTask(), k=2, retain=logreg["retain"])
        assert core.info["hessian_samples"] == want, (target, core.info)
        assert core.info["hessian_samples_rule"].startswith(f"min(pool, max(|forget|, ceil({1 if target == 'self' else 2} D")
    with pytest.raises(InvalidConfigError, match="hessian_samples"):
        get_selector("influence", hessian_samples=0)


# --- projected gradients ------------------------------------------------------------------------------------


def test_projected_influence_ranks_like_unprojected_and_is_chunk_invariant(digits_class):
    """proj_dim: a seeded JL projection of the (streamed) per-sample gradients, curvature P^T G P from projected
    Fisher gradients. Scores rank like the unprojected Gauss-Newton influence and do not depend on how the forget
    set is batched or vmap-chunked."""
    b = digits_class
    kw = dict(task=b.task, k=10, seed=0, retain=b.retain)
    ref = get_selector("influence", ihvp="ggn").select(b.original, b.forget, **kw)
    ids = sorted(ref.scores)
    a = np.array([ref.scores[i] for i in ids])
    runs = [get_selector("influence", proj_dim=256, batch_size=bs, chunk_size=cs).select(b.original, b.forget, **kw)
            for bs, cs in ((64, None), (7, 3))]
    p0, p1 = (np.array([r.scores[i] for i in ids]) for r in runs)
    assert spearmanr(a, p0).statistic >= 0.95  # measured 0.999
    # Batches of 7 and vmap chunks of 3 are not bitwise the rows of one batch of 64 (float32 kernels round a row by
    # the rows beside it), so the promise is float32 closeness at the scale of the scores (measured <= 8e-5 relative
    # to one small score, 1e-6 of the largest on an AVX-512 Xeon) and the same top-k; a mis-assigned chunk would move whole scores.
    assert np.abs(p1 - p0).max() <= 1e-4 * np.abs(p0).max()
    assert runs[1].ids.tolist() == runs[0].ids.tolist()
    assert runs[0].info["proj_dim"] == 256 and runs[0].info["ihvp"] == "ggn"
    other = get_selector("influence", proj_dim=256).select(b.original, b.forget, task=b.task, k=10, seed=1, retain=b.retain)
    assert not np.allclose([other.scores[i] for i in ids], p0)  # the map is seeded
    with pytest.raises(InvalidConfigError, match="proj_dim"):
        get_selector("influence", proj_dim=64, ihvp="cg")


def test_woodbury_head_inverse_equals_dense(logreg):
    """The Woodbury form of the closed-form head Hessian (block-diagonal minus rank n) applies the same
    (H + damping I)^-1 as the dense jacrev(grad) Hessian: solves and self-influence to 1e-9, with and without a
    bias, for the logistic regression and an MLP head, on fewer Hessian samples than parameters."""
    from erasus_ray.selectors import trainable_params
    from erasus_ray.selectors._ihvp import DenseIHVP, HeadWoodburyIHVP, autograd_hessian, linear_head
    from erasus_ray.selectors._per_sample import FunctionalLoss

    task = ClassificationTask()
    data = as_id_dataset(Points(logreg["x"][:7], logreg["y"][:7]))  # n = 7 < D
    probe = (logreg["x"][:8], logreg["y"][:8])
    torch.manual_seed(1)
    no_bias = nn.Linear(D, C, bias=False).double().eval()
    for model in (logreg["model"], _mlp(hidden=9), no_bias):
        params = trainable_params(model, "last")
        head = linear_head(model, task, params, probe)
        wood = HeadWoodburyIHVP(model, task, params, data, head, LAM, batch_size=3, device=torch.device("cpu"))
        dense = DenseIHVP(autograd_hessian(FunctionalLoss(model, task, params), task, data, batch_size=3,
                                           device=torch.device("cpu"), chunk_size=None), LAM)
        v = torch.randn(5, sum(p.numel() for p in params.values()), dtype=torch.float64)
        torch.testing.assert_close(wood.solve(v), dense.solve(v), rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(wood.self_influence(v), dense.self_influence(v), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("target", ["self", "retain", "forget"])
def test_auto_uses_woodbury_when_cheaper_and_scores_match_dense(logreg, target):
    """With fewer Hessian samples than parameters auto picks the Woodbury form; its scores equal the dense form's,
    and it keeps a head over max_exact_params exact (n D within the dense budget) instead of falling to EK-FAC."""
    common = dict(target=target, hessian_samples=5, hessian_data="retain")
    got, core = _scores(logreg, **common)
    assert core.info["ihvp"] == "exact" and core.info["exact_solver"] == "woodbury"
    ref, core_dense = _scores(logreg, exact_solver="dense", **common)
    assert core_dense.info["exact_solver"] == "dense"
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-12)
    wide, core_wide = _scores(logreg, max_exact_params=10, **common)  # D = 15 > 10, n D = 75 <= 100
    assert core_wide.info["ihvp"] == "exact" and core_wide.info["exact_solver"] == "woodbury"
    np.testing.assert_allclose(wide, ref, rtol=1e-8, atol=1e-12)


def test_exact_solver_errors(logreg):
    with pytest.raises(InvalidConfigError, match="exact_solver must be one of"):
        get_selector("influence", exact_solver="qr")
    mlp = _mlp()
    sel = get_selector("influence", scope=["0"], ihvp="exact", exact_solver="woodbury", damping=LAM)
    with pytest.raises(InvalidConfigError, match="woodbury.*Linear classifier head"):
        sel.select(mlp, logreg["forget"], task=ClassificationTask(), k=5, seed=0, retain=logreg["retain"])


def test_tril_inverse_equals_triangular_solve():
    """The block-recursive inverse of a batch of Cholesky factors equals solve_triangular(L, I), for sizes that
    split unevenly and sizes at the leaf."""
    from erasus_ray.selectors._ihvp import tril_inverse

    g = torch.Generator().manual_seed(0)
    for k in (5, 16, 37, 129):
        m = torch.randn(3, k, k, generator=g, dtype=torch.float64)
        chol = torch.linalg.cholesky(m @ m.transpose(1, 2) / k + 0.1 * torch.eye(k, dtype=torch.float64))
        ref = torch.linalg.solve_triangular(chol, torch.eye(k, dtype=torch.float64).expand(3, k, k), upper=False)
        torch.testing.assert_close(tril_inverse(chol), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_block_cholesky_solves_match_dense_inverse_on_both_backends(dtype):
    """BlockCholesky's LAPACK/BLAS (SciPy) and torch back-ends give L_c^-1 x^T, L_c^-1 v_c and L_c^-T v_c equal to
    the dense inverse of each factor (so (L^-1 x)^T (L^-1 x) = x^T M^-1 x), and both name a matrix that is not
    positive definite."""
    from erasus_ray.errors import InvalidConfigError
    from erasus_ray.selectors._ihvp import BlockCholesky

    g = torch.Generator().manual_seed(1)
    c, k, m = 4, 37, 23
    base = torch.randn(c, k, k, generator=g, dtype=torch.float64)
    mats = base @ base.transpose(1, 2) / k + 0.05 * torch.eye(k, dtype=torch.float64)
    chol = torch.linalg.cholesky(mats)
    inv = torch.linalg.inv(chol)  # [C, k, k], the reference L_c^-1
    x = torch.randn(m, k, generator=g, dtype=torch.float64)
    v = torch.randn(c, k, m, generator=g, dtype=torch.float64)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    for backend in ("scipy", "torch"):
        bc = BlockCholesky(mats, dtype, "not PD", backend=backend)
        rows = bc.solve_rows(x.to(dtype))
        assert rows.dtype == dtype and rows.shape == (c, k, m)
        torch.testing.assert_close(rows.double(), inv @ x.T, **tol)
        torch.testing.assert_close(bc.solve_each(v.to(dtype)).double(), inv @ v, **tol)
        torch.testing.assert_close(bc.solve_each(v.to(dtype), transpose=True).double(), inv.transpose(1, 2) @ v, **tol)
        # the quadratic form it exists for: ||L^-1 x||^2 = x^T M^-1 x
        quad = torch.einsum("mk,ckj,mj->cm", x, torch.linalg.inv(mats), x)
        torch.testing.assert_close(rows.double().pow(2).sum(1), quad, **tol)
        import pickle  # solvers are shipped to Ray scoring actors

        torch.testing.assert_close(pickle.loads(pickle.dumps(bc)).solve_rows(x.to(dtype)), rows)
        bad = mats.clone()
        bad[2] = -bad[2]
        with pytest.raises(InvalidConfigError, match="not PD"):
            BlockCholesky(bad, dtype, "not PD", backend=backend)


def test_woodbury_self_influence_from_head_factors_in_float32():
    """A float32 head: the Woodbury solver runs its products in float32 and scores each sample from its inputs and
    logit gradients (g_z = d_z a~_z^T, no D-dimensional gradients); the scores equal those of the same weights in
    float64 through the dense closed-form Hessian to 1e-4 relative, and the float64 head's factor path equals the
    dense path to 1e-9."""
    torch.manual_seed(3)
    n, d_in, hidden, classes = 120, 6, 24, 5
    x = torch.randn(n, d_in)
    y = torch.randint(0, classes, (n,))
    net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, classes)).eval()
    common = dict(damping=0.05, hessian_samples=40)  # n = 40 < D = 125: auto picks Woodbury
    task = ClassificationTask()

    def run(model, data_x, **kw):
        ds = as_id_dataset(Points(data_x, y))
        core = get_selector("influence", **common, **kw).select(model, ds.subset(range(30)), task=task, k=5, seed=0,
                                                                retain=ds.subset(range(30, n)))
        return np.array([core.scores[i] for i in range(30)]), core

    got32, core32 = run(net, x)
    assert core32.info["exact_solver"] == "woodbury" and core32.info["solver_dtype"] == "float32"
    net64 = copy.deepcopy(net).double()
    ref, core_ref = run(net64, x.double(), exact_solver="dense")
    assert core_ref.info["exact_solver"] == "dense"
    np.testing.assert_allclose(got32, ref, rtol=1e-4)
    got64, core64 = run(net64, x.double())
    assert core64.info["solver_dtype"] == "float64"
    np.testing.assert_allclose(got64, ref, rtol=1e-9)
