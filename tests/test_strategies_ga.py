"""Method-specific checks of the ascent-family strategies: negative_gradient, neggrad_plus, wga, random_label,
simnpo and rmu (the registry-wide contract in test_strategies.py covers them too)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from erasus_ray import ErasusUnlearner
from erasus_ray.data import make_loader
from erasus_ray.runners import LocalRunner, RunnerConfig
from erasus_ray.strategies import (
    RMU,
    WGA,
    GradientAscent,
    NegativeGradient,
    NegGradPlus,
    RandomLabel,
    SimNPO,
    UnlearnContext,
    simnpo_loss,
)
from erasus_ray.strategies.random_label import wrong_targets
from erasus_ray.strategies.rmu import activations
from erasus_ray.strategies.wga import wga_weights
from erasus_ray.tasks import TaskOutput
from erasus_ray.utils import model_hash

CPU = torch.device("cpu")


def _batch(ds, task, n, start=0):
    return next(iter(make_loader(ds.subset(ds.ids[start : start + n]), task.collate, batch_size=n)))


def _ctx(src, model=None, seed=0):
    """A context on a copy of the digits original (a Benchmark) or of the tiny LM (the fixture's dict)."""
    if isinstance(src, dict):
        model, task, forget, retain = model or copy.deepcopy(src["model"]), src["task"], src["forget"], src["retain"]
    else:
        model, task, forget, retain = model or copy.deepcopy(src.original), src.task, src.forget, src.retain
    return UnlearnContext(model=model, task=task, forget=forget, retain=retain, device=CPU, seed=seed)


# --- negative_gradient -------------------------------------------------------------------------------------------
def test_negative_gradient_is_gradient_ascent_bit_for_bit(digits_class):
    b = digits_class
    assert issubclass(NegativeGradient, GradientAscent)
    for attr in ("default_lr", "default_epochs", "needs_retain"):
        assert getattr(NegativeGradient, attr) == getattr(GradientAscent, attr)
    hashes = []
    for name in ("gradient_ascent", "negative_gradient"):
        unlearner = ErasusUnlearner(b.original, strategy=name, selector=None, fraction=None, seed=3, progress=False)
        res = unlearner.fit(forget_data=b.forget)
        hashes.append(model_hash(res.model))
    assert hashes[0] == hashes[1]


# --- neggrad_plus ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cap", [None, "uniform"])
def test_neggrad_plus_loss_is_the_hand_formula(digits_class, cap):
    b = digits_class
    ctx = _ctx(b)
    fb, rb = _batch(b.forget, b.task, 16), _batch(b.retain, b.task, 16)
    beta = 0.7
    loss, logs = NegGradPlus(beta=beta, forget_loss_cap=cap).loss(ctx, fb, rb)
    with torch.no_grad():
        lf = F.cross_entropy(ctx.model(fb.data[0]), fb.data[1])  # the original model's forget losses are << log 10
        lr = F.cross_entropy(ctx.model(rb.data[0]), rb.data[1])
    assert float(loss.detach()) == pytest.approx(float(beta * lr - (1 - beta) * lf), rel=1e-5)
    assert float(logs["forget_loss"]) == pytest.approx(float(lf), rel=1e-5)


def test_neggrad_plus_rejects_beta_one():
    from erasus_ray.errors import InvalidConfigError

    with pytest.raises(InvalidConfigError, match="beta"):
        NegGradPlus(beta=1.0)
    with pytest.raises(InvalidConfigError, match="beta"):
        NegGradPlus(beta=-0.1)


# --- wga ---------------------------------------------------------------------------------------------------------
def test_wga_weights_are_confidence_to_the_alpha():
    logits = torch.tensor([[4.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 3.0, 0.0]], requires_grad=True)
    targets = torch.tensor([0, 0, 0])  # confident, unsure, wrong
    unit_loss = F.cross_entropy(logits, targets, reduction="none")
    p = logits.softmax(-1)[:, 0].detach()
    for alpha in (0.0, 0.5, 1.0, 2.0):
        w = wga_weights(unit_loss, alpha)
        assert torch.allclose(w, p**alpha, rtol=1e-6)
        assert not w.requires_grad
    w = wga_weights(unit_loss, 1.0)
    assert w[0] > w[1] > w[2], "remembered (high-confidence) units get the larger ascent weight"


def test_wga_loss_weights_each_lm_token(tiny_lm):
    t = tiny_lm
    ctx = _ctx(t)
    fb = _batch(t["forget"], t["task"], 4)
    alpha = 0.5
    loss, _ = WGA(alpha=alpha, retain_weight=0.0).loss(ctx, fb, None)
    with torch.no_grad():
        out = t["task"].forward(ctx.model, fb.data)
        ce = F.cross_entropy(out.logits, out.targets, reduction="none")
        w = torch.exp(-ce) ** alpha  # per token, not per sample
        counts = torch.zeros(4).index_add(0, out.owner, torch.ones_like(ce))
        per_sample = torch.zeros(4).index_add(0, out.owner, w * ce) / counts
    assert float(loss.detach()) == pytest.approx(float(-per_sample.mean()), rel=1e-5)
    # The gradient is the ascent gradient rescaled per unit: at alpha = 0 WGA is gradient ascent.
    ga, _ = GradientAscent().loss(ctx, fb, None)
    wga0, _ = WGA(alpha=0.0, retain_weight=0.0).loss(ctx, fb, None)
    assert float(wga0.detach()) == pytest.approx(float(ga.detach()), rel=1e-6)


# --- random_label ------------------------------------------------------------------------------------------------
def test_random_label_targets_are_never_the_true_label(digits_class, tiny_lm):
    b = digits_class
    fb = _batch(b.forget, b.task, len(b.forget))
    with torch.no_grad():
        out = b.task.forward(b.original, fb.data)
    wrong = wrong_targets(out, fb.ids, seed=0)
    assert (wrong != out.targets).all()
    assert set(wrong.tolist()) == set(range(10)) - {3}, "uniform over the other classes: every wrong class appears"
    # fixed per (seed, id): another batching gives the same labels; another seed different ones
    half = _batch(b.forget, b.task, 20, start=5)
    with torch.no_grad():
        out_half = b.task.forward(b.original, half.data)
    assert torch.equal(wrong_targets(out_half, half.ids, seed=0), wrong[5:25])
    assert not torch.equal(wrong_targets(out, fb.ids, seed=1), wrong)
    # LM: every answer token gets a random vocabulary token other than the true one
    t = tiny_lm
    lb = _batch(t["forget"], t["task"], 8)
    with torch.no_grad():
        lout = t["task"].forward(t["model"], lb.data)
    lwrong = wrong_targets(lout, lb.ids, seed=0)
    assert lwrong.shape == lout.targets.shape and (lwrong != lout.targets).all()
    assert int(lwrong.min()) >= 0 and int(lwrong.max()) < lout.logits.shape[-1]


def test_random_label_loss_fits_the_relabelled_targets(digits_class):
    b = digits_class
    ctx = _ctx(b)
    strat = RandomLabel(alpha=2.0)
    strat.setup(ctx)
    fb, rb = _batch(b.forget, b.task, 8), _batch(b.retain, b.task, 8)
    loss, logs = strat.loss(ctx, fb, rb)
    with torch.no_grad():
        logits = ctx.model(fb.data[0])
        relabelled = wrong_targets(TaskOutput(logits, fb.data[1], torch.arange(8), 8), fb.ids, seed=0)
        expected = F.cross_entropy(logits, relabelled) + 2.0 * F.cross_entropy(ctx.model(rb.data[0]), rb.data[1])
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


# --- simnpo ------------------------------------------------------------------------------------------------------
def test_simnpo_loss_hand_computation():
    # two samples: log pi = [-2, -6] over |y| = [1, 3] tokens, beta = 2.5, gamma = 0.5
    logp, lengths, beta, gamma = torch.tensor([-2.0, -6.0]), torch.tensor([1.0, 3.0]), 2.5, 0.5

    def by_hand(lp, n):
        z = -(beta / n) * lp - gamma  # 4.5 and 4.5: same per-token likelihood, same loss despite the lengths
        return -(2 / beta) * math.log(1 / (1 + math.exp(-z)))

    expected = [by_hand(-2.0, 1), by_hand(-6.0, 3)]
    assert simnpo_loss(logp, lengths, beta, gamma).tolist() == pytest.approx(expected, rel=1e-6)
    assert expected[0] == pytest.approx(expected[1])
    # gamma = 0, logp = 0: (2 / beta) log 2
    assert float(simnpo_loss(torch.zeros(1), torch.ones(1), beta, 0.0)) == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_simnpo_strategy_uses_length_normalised_loglik(tiny_lm):
    t = tiny_lm
    ctx = _ctx(t)
    fb = _batch(t["forget"], t["task"], 6)  # sequence lengths 10, 9, 8 with answer_start 3: 7, 6, 5 answer tokens
    loss, _ = SimNPO(beta=2.5, gamma=0.3, alpha=0.0).loss(ctx, fb, None)
    with torch.no_grad():
        out = t["task"].forward(ctx.model, fb.data)
        tok = -F.cross_entropy(out.logits, out.targets, reduction="none")
        seq = torch.zeros(6).index_add(0, out.owner, tok)
        n = torch.zeros(6).index_add(0, out.owner, torch.ones_like(tok))
    assert sorted(set(n.tolist())) == [5.0, 6.0, 7.0]
    manual = (-(2 / 2.5) * F.logsigmoid(-(2.5 / n) * seq - 0.3)).mean()
    assert float(loss.detach()) == pytest.approx(float(manual), rel=1e-5)


# --- rmu ---------------------------------------------------------------------------------------------------------
def _cos_mse(acts, control):
    flat = acts.reshape(-1, acts.shape[-1])
    return float(F.cosine_similarity(flat, control.expand_as(flat), dim=-1).mean()), float((flat - control).pow(2).mean())


@pytest.mark.parametrize("which", ["digits_auto", "lm_block"])
def test_rmu_misdirects_forget_and_keeps_retain_activations(which, digits_class, tiny_lm):
    if which == "digits_auto":
        src, layer, frozen_after = digits_class, "auto", ("net.5.",)  # the head (last Linear) comes after the features
        model = copy.deepcopy(digits_class.original)
        task, forget, retain = digits_class.task, digits_class.forget, digits_class.retain
        cfg = RunnerConfig(epochs=RMU.default_epochs, lr=RMU.default_lr, batch_size=32, progress=False)
    else:
        src, layer, frozen_after = tiny_lm, "transformer.h.0", ("transformer.ln_f.",)
        model = copy.deepcopy(tiny_lm["model"])
        task, forget, retain = tiny_lm["task"], tiny_lm["forget"], tiny_lm["retain"]
        cfg = RunnerConfig(epochs=30, lr=3e-3, batch_size=4, progress=False)
    original = copy.deepcopy(model).eval()
    ctx = _ctx(src, model=model)
    strat = RMU(layer=layer)
    fb, rb = _batch(forget, task, min(len(forget), 64)), _batch(retain, task, 64)

    def acts(m, batch):
        with torch.no_grad():
            m.eval()
            return activations(ctx, batch, layer, model=m)

    before_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = LocalRunner(cfg).run(strat, ctx)
    assert report.steps > 0 and "rmu_frozen" not in ctx.state
    control = ctx.state["rmu_control"]
    cos0, mse0 = _cos_mse(acts(original, fb), control)
    cos1, mse1 = _cos_mse(acts(model, fb), control)
    assert cos1 > cos0 + 0.2 and cos1 > 0.8, (cos0, cos1)
    assert mse1 < 0.5 * mse0, (mse0, mse1)  # measured: digits 72 -> 27, LM block 41 -> 13
    r0, r1 = acts(original, rb), acts(model, rb)
    retain_shift = float((r1 - r0).norm() / r0.norm())
    forget_shift = float((acts(model, fb) - acts(original, fb)).norm() / acts(original, fb).norm())
    # measured relative shifts (retain, forget): digits (0.24, 2.47); the 1-block LM (0.48, 2.12), whose forget and
    # retain sets are both random token strings, so one block can separate them only partly
    assert retain_shift < 0.3 * forget_shift, (retain_shift, forget_shift)
    if which == "digits_auto":
        assert retain_shift < 0.35
    # only the layers up to l moved
    for n, p in model.named_parameters():
        if n.startswith(frozen_after):
            assert torch.equal(p, before_params[n]), f"{n} is after the layer and must stay frozen"
    assert any(not torch.equal(p, before_params[n]) for n, p in model.named_parameters())


def test_rmu_update_params_and_bad_layer(digits_class):
    from erasus_ray.errors import InvalidConfigError

    b = digits_class
    ctx = _ctx(b)
    strat = RMU(update_params=["net.3"])
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    LocalRunner(RunnerConfig(epochs=1, lr=1e-3, batch_size=32, progress=False)).run(strat, ctx)
    moved = {n for n, p in ctx.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"net.3.weight", "net.3.bias"}
    with pytest.raises(InvalidConfigError, match="no module named"):
        RMU(layer="net.99").setup(_ctx(b))
    with pytest.raises(InvalidConfigError, match="match no parameter"):
        RMU(update_params="nope").setup(_ctx(b))
