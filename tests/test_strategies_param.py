"""Parameter-family strategies: LoRA adapters, layer freezing, sparsity-aware, neuron pruning, learned masks."""

import copy
import inspect
import math

import numpy as np
import pytest
import torch

from erasus_ray import ErasusUnlearner
from erasus_ray.evaluation.classification import per_sample_stats
from erasus_ray.strategies import STRATEGIES
from erasus_ray.strategies.base import UnlearnContext
from erasus_ray.strategies.lora_unlearning import LoRADelta, merge_lora
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
    reserved = set(inspect.signature(ErasusUnlearner.__init__).parameters) - {"self", "strategy_kwargs"}
    for name in STRATEGIES.names():
        params = set(inspect.signature(STRATEGIES.get(name).__init__).parameters) - {"self"}
        assert not params & reserved, f"{name}: {sorted(params & reserved)} shadow ErasusUnlearner arguments (rename them)"


def test_lora_merge_is_base_plus_scaled_low_rank_product():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4)
    base = layer.weight.detach().clone()
    delta = LoRADelta(layer.weight.shape, rank=2, scale=0.5, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    with torch.no_grad():
        delta.lora_B.normal_()
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", delta)
    expected = base + 0.5 * delta.lora_B.detach() @ delta.lora_A.detach()
    ctx = UnlearnContext(model=layer, task=None, forget=None, retain=None, device=torch.device("cpu"))
    ctx.state["lora_modules"] = [("", layer)]
    merge_lora(ctx)
    assert not torch.nn.utils.parametrize.is_parametrized(layer)
    assert torch.equal(layer.weight.detach(), expected)


def test_lora_unlearning_changes_weights_by_rank_r_only(digits_class):
    b = digits_class
    res = _fit(b, "lora_unlearning", rank=2)
    before, after = dict(b.original.named_parameters()), dict(res.model.named_parameters())
    assert set(before) == set(after), "merged: the original architecture and parameter names"
    for name, p in before.items():
        diff = (after[name] - p).detach()
        if name.endswith("weight"):
            assert torch.linalg.matrix_rank(diff.double(), rtol=1e-5) <= 2  # float32 rounding of W + BA is noise
            assert diff.abs().max() > 0
        else:
            assert torch.equal(after[name], p), f"{name} is not adapted and must not change"
    _effect(b, res)


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
