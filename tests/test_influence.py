"""Influence functions on an L2-regularised multinomial logistic regression (one nn.Linear, convex):
closed form with the exact Hessian, CG / LiSSA / EK-FAC against it, and leave-one-out retraining."""

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
KFAC = [{"ihvp": "kfac"}, {"ihvp": "kfac", "kfac_fisher": "empirical"}]


@pytest.mark.parametrize("kwargs", LISSA + KFAC)
@pytest.mark.parametrize("target", ["self", "retain"])
def test_lissa_and_kfac_rank_like_exact(logreg, kwargs, target):
    got, core = _scores(logreg, target=target, **kwargs)
    rho = spearmanr(got, logreg["closed"][target]).statistic
    # EK-FAC's Kronecker eigenbasis is an approximation even with the exact expected Fisher: on this problem its
    # best possible spearman for the signed retain-target score is 0.91 (measured; 0.84-0.91 over seeds with MC
    # labels), so that case gets 0.8.
    bound = 0.8 if (kwargs["ihvp"] == "kfac" and target == "retain") else 0.95
    assert rho >= bound, f"{kwargs} {target}: spearman {rho:.3f}"
    assert core.info["ihvp"] == kwargs["ihvp"]


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
