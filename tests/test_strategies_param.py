"""Parameter-family strategies: LoRA adapters, layer freezing, sparsity-aware, neuron pruning, learned masks."""

import copy
import inspect
import math

import numpy as np
import pytest
import torch

from erasus_ray import ErasusUnlearner
from erasus_ray.evaluation.classification import per_sample_stats
from erasus_ray.settings import FLAT_KEYWORDS
from erasus_ray.strategies import STRATEGIES
from erasus_ray.strategies.base import UnlearnContext
from erasus_ray.strategies.neuron_pruning import hidden_layers, mean_abs_activation, selectivity_scores
from erasus_ray.strategies.sparse_aware import magnitude_masks


def _fit(b, name, **kw):
    return ErasusUnlearner(b.original, strategy=name, selector=None, fraction=None, task=b.task, seed=0, progress=False, **kw).fit(
        forget_data=b.forget, retain_data=b.retain
    )


def _acc(model, b, ds):
    return float(per_sample_stats(model, b.task, ds)["correct"].mean())


def _effect(b, res, retain_floor=0.95):
    assert _acc(res.model, b, b.forget) <= 0.05, "forget accuracy drops to the gold model's (0 for a removed class)"
    assert _acc(res.model, b, b.retain) >= retain_floor


def test_no_strategy_hyperparameter_shadows_an_unlearner_argument():
    """A strategy hyperparameter named like an ErasusUnlearner argument (e.g. ``fraction``) could never be set."""
    reserved = (set(inspect.signature(ErasusUnlearner.__init__).parameters) - {"self", "strategy_kwargs"}) | set(FLAT_KEYWORDS)
    for name in STRATEGIES.names():
        params = set(inspect.signature(STRATEGIES.get(name).__init__).parameters) - {"self"}
        assert not params & reserved, f"{name}: {sorted(params & reserved)} shadow ErasusUnlearner arguments (rename them)"


def test_lora_setup_injects_peft_layers_and_merge_is_base_plus_scaled_low_rank_product():
    """setup() puts peft LoRA layers in place (only their A/B train); finish() merges ``W + (alpha / r) B A`` with
    peft and gives back the original modules, names and ``requires_grad`` flags."""
    from peft.tuners.lora import LoraLayer

    from erasus_ray.strategies.lora_unlearning import LoRAUnlearning

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4))
    names = [n for n, _ in model.named_parameters()]
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx = UnlearnContext(model=model, task=None, forget=None, retain=None, device=torch.device("cpu"), seed=3)
    strat = LoRAUnlearning(rank=2, alpha=1.0, objective="gradient_ascent")
    strat.setup(ctx)
    assert isinstance(model[0], LoraLayer) and isinstance(model[2], LoraLayer), "peft's LoRA layers, in place"
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["0.lora_A.default.weight", "0.lora_B.default.weight", "2.lora_A.default.weight", "2.lora_B.default.weight"]
    assert float(model[0].lora_B["default"].weight.detach().abs().max()) == 0.0, "B starts at 0: the adapted model equals the base"
    with torch.no_grad():
        for i in (0, 2):
            model[i].lora_B["default"].weight.normal_()
    expected = {f"{i}.weight": base[f"{i}.weight"] + 0.5 * model[i].lora_B["default"].weight.detach() @ model[i].lora_A["default"].weight.detach()
                for i in (0, 2)}
    strat.finish(ctx)
    assert ctx.model is model and type(model[0]) is torch.nn.Linear and type(model[2]) is torch.nn.Linear
    assert [n for n, _ in model.named_parameters()] == names and all(p.requires_grad for p in model.parameters())
    for name, want in expected.items():
        assert torch.allclose(dict(model.named_parameters())[name].detach(), want, atol=1e-6), name
    for name in ("0.bias", "2.bias"):
        assert torch.equal(dict(model.named_parameters())[name].detach(), base[name])
    # the adapters' A comes from the run's seed
    again = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4))
    a_of = {}
    for seed in (3, 3, 4):
        c = UnlearnContext(model=copy.deepcopy(again), task=None, forget=None, retain=None, device=torch.device("cpu"), seed=seed)
        LoRAUnlearning(rank=2, objective="gradient_ascent").setup(c)
        a_of.setdefault(seed, []).append(c.model[0].lora_A["default"].weight.detach().clone())
    assert torch.equal(a_of[3][0], a_of[3][1]) and not torch.equal(a_of[3][0], a_of[4][0])


@pytest.fixture
def peft_calls(monkeypatch):
    """Counts peft's get_peft_model / merge_and_unload calls (the strategy reaches both through the peft module)."""
    import peft
    from peft.tuners.lora import LoraModel

    calls = {"get_peft_model": 0, "merge_and_unload": 0}
    real_get, real_merge = peft.get_peft_model, LoraModel.merge_and_unload

    def get_peft_model(*a, **k):
        calls["get_peft_model"] += 1
        return real_get(*a, **k)

    def merge_and_unload(self, *a, **k):
        calls["merge_and_unload"] += 1
        return real_merge(self, *a, **k)

    monkeypatch.setattr(peft, "get_peft_model", get_peft_model)
    monkeypatch.setattr(LoraModel, "merge_and_unload", merge_and_unload)  # PeftModel forwards to its LoraModel
    return calls


def test_lora_unlearning_changes_weights_by_rank_r_only(digits_class, peft_calls):
    b = digits_class
    res = _fit(b, "lora_unlearning", rank=2)
    assert peft_calls == {"get_peft_model": 1, "merge_and_unload": 1}, "peft adapted and merged the model"
    before, after = dict(b.original.named_parameters()), dict(res.model.named_parameters())
    assert set(before) == set(after), "merged: the original architecture and parameter names"
    assert [type(m) for m in res.model.modules()] == [type(m) for m in b.original.modules()]
    for name, p in before.items():
        diff = (after[name] - p).detach()
        if name.endswith("weight"):
            assert torch.linalg.matrix_rank(diff.double(), rtol=1e-5) <= 2  # float32 rounding of W + BA is noise
            assert diff.abs().max() > 0
        else:
            assert torch.equal(after[name], p), f"{name} is not adapted and must not change"
    _effect(b, res)


def test_lora_unlearning_on_gpt2_leaves_tied_embeddings_alone(tiny_lm, peft_calls):
    """GPT-2's Conv1D layers get rank-r updates through peft; the tied embedding / LM head is never adapted."""
    t = tiny_lm
    res = ErasusUnlearner(t["model"], strategy="lora_unlearning", selector=None, task=t["task"], seed=0, progress=False,
                          rank=2, objective="npo", epochs=3, lr=1e-2, batch_size=4).fit(forget_data=t["forget"], retain_data=t["retain"])
    assert peft_calls == {"get_peft_model": 1, "merge_and_unload": 1}
    before, after = dict(t["model"].named_parameters()), dict(res.model.named_parameters())
    assert set(before) == set(after) and res.model.lm_head.weight is res.model.transformer.wte.weight
    assert torch.equal(after["transformer.wte.weight"], before["transformer.wte.weight"])
    changed = []
    for name, p in before.items():
        diff = (after[name] - p).detach()
        if diff.abs().max() > 0:
            assert name.endswith(".weight") and diff.dim() == 2, f"{name} changed but is not an adapted weight"
            assert torch.linalg.matrix_rank(diff.double(), rtol=1e-5) <= 2, name
            changed.append(name)
    assert {n.rsplit(".", 2)[-2] for n in changed} == {"c_attn", "c_proj", "c_fc"}


def test_layer_freezing_keeps_frozen_layers_bit_identical(digits_class):
    b = digits_class
    res = _fit(b, "layer_freezing", num_layers=1)
    names = [n for n, _ in b.original.named_parameters()]
    before, after = dict(b.original.named_parameters()), dict(res.model.named_parameters())
    trained = {n for n in names if n.startswith("net.5.")}  # the output layer of the digits MLP
    for n in names:
        same = torch.equal(before[n], after[n])
        assert same != (n in trained), f"{n}: trained={n in trained} but changed={not same}"
    _effect(b, res)
    assert all(p.requires_grad for p in res.model.parameters()), "frozen parameters are unfrozen afterwards"


def test_layer_freezing_eu_k_reinitialises_and_trains_on_retain_only(digits_class):
    b = digits_class
    res = _fit(b, "layer_freezing", num_layers=1, mode="eu_k", epochs=30, lr=1e-2)
    assert res.report.forget_samples > 0  # paced by the forget set ...
    assert STRATEGIES.create("layer_freezing", mode="eu_k").uses_forget is False  # ... but never reads it
    assert _acc(res.model, b, b.forget) <= 0.1 and _acc(res.model, b, b.retain) >= 0.95


def test_magnitude_masks_are_the_global_top_magnitudes():
    torch.manual_seed(0)
    weights = {"a": torch.randn(5, 7), "b": torch.randn(3, 4)}
    masks = magnitude_masks(weights, 0.4)
    flat = torch.cat([w.abs().flatten() for w in weights.values()])
    kept = torch.cat([m.flatten() for m in masks.values()])
    assert int((~kept).sum()) == math.floor(0.4 * flat.numel())
    assert flat[kept].min() >= flat[~kept].max()


def test_sparse_aware_pruned_weights_stay_zero(digits_class):
    b = digits_class
    res = _fit(b, "sparse_aware", sparsity=0.5)
    weights = {n: p for n, p in b.original.named_parameters() if n.endswith("weight")}
    masks = magnitude_masks(weights, 0.5)
    after = dict(res.model.named_parameters())
    for n, mask in masks.items():
        assert torch.all(after[n][~mask] == 0), f"{n}: pruned weights must stay exactly zero"
        assert torch.count_nonzero(after[n][mask]) > 0.9 * int(mask.sum())
    _effect(b, res)


def test_neuron_pruning_zeroes_exactly_the_most_selective_neurons(digits_class):
    b = digits_class
    res = _fit(b, "neuron_pruning", prune_fraction=0.05, iterations=1, max_retain=None)
    layers = hidden_layers(b.original)
    scores = selectivity_scores(
        mean_abs_activation(b.original, b.task, b.forget, layers), mean_abs_activation(b.original, b.task, b.retain, layers)
    )
    flat = torch.cat([scores[n] for n, _ in layers])
    k = round(0.05 * flat.numel())
    expected = set(torch.sort(-flat, stable=True).indices[:k].tolist())
    after = dict(res.model.named_modules())
    zero_rows, offset = set(), 0
    for name, _ in layers:
        w = after[name].weight
        dead = ((w == 0).all(1) & (after[name].bias == 0)).nonzero().flatten() + offset
        zero_rows |= set(dead.tolist())
        offset += w.shape[0]
    assert zero_rows == expected


def test_neuron_pruning_defaults_forget_the_class(digits_class):
    b = digits_class
    res = _fit(b, "neuron_pruning")
    assert _acc(res.model, b, b.forget) <= 0.05
    assert _acc(res.model, b, b.retain) >= 0.85  # documented: 0.916 (pruning 10% of hidden neurons costs retain fit)


def test_mask_based_only_zeroes_weights(digits_class):
    b = digits_class
    res = _fit(b, "mask_based")
    before, after = dict(b.original.named_parameters()), dict(res.model.named_parameters())
    zeroed = 0
    for n, p in before.items():
        a = after[n]
        unchanged_or_zero = (a == p) | (a == 0)
        assert bool(unchanged_or_zero.all()), f"{n}: a learned mask may only zero weights, never change their values"
        zeroed += int(((a == 0) & (p != 0)).sum())
    assert zeroed > 0
    _effect(b, res)
