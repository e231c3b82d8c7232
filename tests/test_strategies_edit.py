"""Locate-and-edit and inference-time strategies: causal_tracing, attention_surgery, dexperts, activation_steering."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from erasus_ray import ErasusUnlearner, evaluate
from erasus_ray.data import as_id_dataset, make_loader
from erasus_ray.errors import InvalidConfigError
from erasus_ray.strategies import UnlearnContext
from erasus_ray.strategies.activation_steering import ActivationSteering, SteeredModel, steer
from erasus_ray.strategies.attention_surgery import AttentionSurgery, attention_sites
from erasus_ray.strategies.causal_tracing import indirect_effects, top_layers
from erasus_ray.strategies.dexperts import DExpertsModel, dexperts_logits
from erasus_ray.tasks import CapabilityError, ClassificationTask
from erasus_ray.utils import model_hash

from _tolerances import assert_float32_close


@torch.no_grad()
def fit(model, task, ds):
    """(mean loss, mean accuracy) on the whole dataset."""
    batch = next(iter(make_loader(ds, task.collate, batch_size=len(ds))))
    out = task.forward(model, batch.data)
    return float(out.sample_loss().mean()), float(out.sample_accuracy().mean())


def run(name, model, task, forget, retain, **kw):
    return ErasusUnlearner(model, strategy=name, selector=None, fraction=None, task=task, seed=0, progress=False, **kw).fit(
        forget_data=forget, retain_data=retain)


def changed_params(before: nn.Module, after: nn.Module) -> list[str]:
    b = dict(before.named_parameters())
    return [n for n, p in after.named_parameters() if not torch.equal(p, b[n])]


class ConceptSequences(Dataset):
    """Rows 0..23: copy sequences ``[a b c a b c a b c]`` (the answer repeats the prompt, so it needs attention);
    rows 24..63: successor sequences ``[x x+1 x+2 ...]`` (each token follows from the previous one alone).
    Forgetting the copy rows is a concept shared by the forget samples, unlike the contract LM's random rows."""

    def __init__(self, n_copy: int = 24, n_succ: int = 40, vocab: int = 48, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.seqs = [torch.randint(1, vocab, (3,), generator=g).repeat(3) for _ in range(n_copy)]
        for _ in range(n_succ):
            x = int(torch.randint(1, vocab, (1,), generator=g))
            self.seqs.append(torch.tensor([1 + (x + i) % (vocab - 1) for i in range(9)]))
        self.ids = np.arange(len(self.seqs))

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.seqs[i], "answer_start": 3}


@pytest.fixture(scope="module")
def concept_lm():
    """A 1-block, 4-head GPT-2 trained on ConceptSequences; forget = the copy rows."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from erasus_ray.tasks import get_task
    from erasus_ray.training import TrainRecipe, train_model

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_head=4, n_embd=32, vocab_size=48, n_positions=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(cfg)
    full = as_id_dataset(ConceptSequences())
    task = get_task("auto", model)
    train_model(model, full, task, TrainRecipe(epochs=40, lr=1e-2, batch_size=8, optimizer="adamw", seed=0))
    forget_ids = full.ids[:24]
    return {"model": model, "task": task, "forget": full.subset(forget_ids), "retain": full.exclude(forget_ids)}


# --- the wrappers -----------------------------------------------------------------------------------------------

def test_wrapper_generate_matches_hugging_face_greedy(tiny_lm):
    """With alpha 0 the wrappers are the base model: their greedy decoding (left-padded prompts) equals HF generate."""
    t = tiny_lm
    base = t["model"].eval()
    wrappers = [DExpertsModel(base, copy.deepcopy(base), alpha=0.0), SteeredModel(base, "transformer.h.0", torch.ones(32), 0.0)]
    ids = torch.tensor([[0, 0, 5, 7, 9], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    expected = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, num_beams=1, pad_token_id=0)
    for w in wrappers:
        got = w.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, num_beams=1, pad_token_id=0)
        assert torch.equal(got[:, : expected.shape[1]], expected)


# --- dexperts ---------------------------------------------------------------------------------------------------

def test_dexperts_logits_hand_computation():
    base = torch.tensor([[1.0, 2.0, 0.0]])
    anti = torch.tensor([[0.0, 4.0, 1.0]])
    expert = torch.tensor([[2.0, 2.0, 2.0]])
    assert dexperts_logits(base, anti, 0.5).tolist() == [[1.5, 1.0, -0.5]]  # expert = base: 1.5 z - 0.5 z_anti
    assert dexperts_logits(base, anti, 2.0, expert).tolist() == [[5.0, -2.0, 2.0]]
    # softmax of the ensemble = renormalised product p_base * (p_expert / p_anti) ** alpha
    p = lambda z: z.softmax(-1)  # noqa: E731
    prod = p(base) * (p(expert) / p(anti)) ** 2.0
    assert torch.allclose(p(dexperts_logits(base, anti, 2.0, expert)), prod / prod.sum(), atol=1e-6)


def test_dexperts_model_combines_members_and_round_trips():
    torch.manual_seed(0)
    base, anti, expert = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 3)
    x = torch.randn(5, 4)
    model = DExpertsModel(base, anti, 1.5, expert)
    with torch.no_grad():
        assert torch.allclose(model(x), base(x) + 1.5 * (expert(x) - anti(x)), atol=1e-6)
        rebuilt = DExpertsModel(nn.Linear(4, 3), nn.Linear(4, 3), 0.0, nn.Linear(4, 3))
        rebuilt.load_state_dict(model.state_dict())
        assert torch.equal(rebuilt(x), model(x)) and model_hash(rebuilt) == model_hash(model)
        assert torch.equal(pickle.loads(pickle.dumps(model))(x), model(x))


def test_dexperts_effect_on_digits(digits_class):
    """Forget fit drops to the gold model's, retain holds, the original weights are untouched (measured numbers in
    the docstring: forget acc 0.00, retain 0.962, test 0.853 vs gold 0.00 / 0.998 / 0.869)."""
    b = digits_class
    res = run("dexperts", b.original, b.task, b.forget, b.retain)
    assert isinstance(res.model, DExpertsModel)
    assert model_hash(res.model.base) == model_hash(b.original), "the base weights are not edited"
    assert fit(res.model, b.task, b.forget)[1] <= 0.05
    assert fit(res.model, b.task, b.retain)[1] >= 0.95
    metrics = evaluate(res.model, forget=b.forget, retain=b.retain, test=b.test, task=b.task, gold=b.gold)
    original = evaluate(b.original, forget=b.forget, retain=b.retain, test=b.test, task=b.task, gold=b.gold)
    assert metrics["avg_gap"] < original["avg_gap"] / 2, "moves towards the retrained model"


def test_dexperts_forgets_a_concept_on_an_lm(concept_lm):
    """On the concept LM the anti-expert raises the forget (copy) loss far more than the retain loss."""
    c = concept_lm
    f0, r0 = fit(c["model"], c["task"], c["forget"])[0], fit(c["model"], c["task"], c["retain"])[0]
    res = run("dexperts", c["model"], c["task"], c["forget"], c["retain"], epochs=10, lr=3e-3)
    f1, r1 = fit(res.model, c["task"], c["forget"])[0], fit(res.model, c["task"], c["retain"])[0]
    assert f1 - f0 > 3 * (r1 - r0) and f1 - f0 > 0.1
    # evaluation (incl. greedy generation through the wrapper) runs unchanged
    metrics = evaluate(res.model, forget=c["forget"], retain=c["retain"], test=c["retain"], task=c["task"])
    assert 0.0 <= metrics["forget_rougeL"] <= 1.0


# --- activation_steering ----------------------------------------------------------------------------------------

def test_steering_vector_is_the_mean_difference(digits_class):
    b = digits_class
    ctx = UnlearnContext(model=b.original, task=b.task, forget=b.forget, retain=b.retain, device=torch.device("cpu"))
    v, name, on_input, _ = ActivationSteering().vector(ctx)
    assert name == "net.5" and on_input  # the head's input
    feats = lambda ds: b.original.net[:-1](torch.stack([ds[i][1][0] for i in range(len(ds))]).float())  # noqa: E731
    with torch.no_grad():
        forget_mean, retain_mean = feats(b.forget).mean(0), feats(b.retain).mean(0)
    # batched means vs one forward each: float32 rounding relative to the means, not to their (smaller) difference
    assert_float32_close(v, forget_mean - retain_mean, scale=float(torch.cat([forget_mean, retain_mean]).abs().max()))


def test_steering_hook_changes_only_that_layer(digits_class):
    """Outputs of the layers before the steered one are identical; the steered output is the formula's."""
    b = digits_class
    x = torch.stack([b.forget[i][1][0] for i in range(8)]).float()
    v = torch.randn(128, generator=torch.Generator().manual_seed(0))
    model = SteeredModel(b.original, "net.3", v, 0.7, mode="subtract")

    def outputs(m):
        caught = {}
        hooks = [b.original.get_submodule(f"net.{i}").register_forward_hook(
            lambda mod, i_, o, i=i: caught.__setitem__(i, o.detach().clone())) for i in range(6)]
        with torch.no_grad():
            m(x)
        for h in hooks:
            h.remove()
        return caught

    clean, steered = outputs(b.original), outputs(model)
    assert torch.equal(clean[1], steered[1]) and torch.equal(clean[2], steered[2])
    # the forward hook on net.3 sees its clean output, then the steered value feeds net.4
    assert torch.allclose(steered[4], torch.relu(clean[3] - 0.7 * v), atol=1e-6)
    assert not b.original.get_submodule("net.3")._forward_hooks, "no hook stays behind"
    # project mode removes the direction: the steered activation is orthogonal to v
    h = torch.randn(4, 128)
    # zero up to float32 rounding of a 128-term dot product, relative to |h| |v| (h . v itself is ~ |h| |v| / 11)
    assert_float32_close(steer(h, v, 1.0, "project") @ v, torch.zeros(4), scale=float(h.norm(dim=1).max() * v.norm()))


def test_activation_steering_effect_on_digits(digits_class):
    """Measured: forget acc 1.00 -> 0.00, retain 0.998 -> 0.962 (gold 0.00 / 0.998)."""
    b = digits_class
    res = run("activation_steering", b.original, b.task, b.forget, b.retain)
    assert fit(res.model, b.task, b.forget)[1] <= 0.05
    assert fit(res.model, b.task, b.retain)[1] >= 0.95
    again = run("activation_steering", b.original, b.task, b.forget, b.retain)
    assert model_hash(again.model) == model_hash(res.model) != res.model_hash_before
    rebuilt = SteeredModel(copy.deepcopy(b.original), "net.5", torch.zeros(128), 0.0, "project", on_input=True)
    rebuilt.load_state_dict(res.model.state_dict())
    x = torch.stack([b.forget[i][1][0] for i in range(4)]).float()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), res.model(x))


def test_activation_steering_on_a_concept_lm(concept_lm):
    """LM path: the vector is the mean over answer-predicting positions; steering hits the forget concept harder."""
    c = concept_lm
    f0, r0 = fit(c["model"], c["task"], c["forget"])[0], fit(c["model"], c["task"], c["retain"])[0]
    res = run("activation_steering", c["model"], c["task"], c["forget"], c["retain"])
    f1, r1 = fit(res.model, c["task"], c["forget"])[0], fit(res.model, c["task"], c["retain"])[0]
    assert f1 - f0 > 2 * (r1 - r0) > 0  # measured: forget +0.08, retain +0.03


# --- attention_surgery ------------------------------------------------------------------------------------------

def test_attention_surgery_zeroes_exactly_the_top_heads(concept_lm):
    c = concept_lm
    ctx = UnlearnContext(model=c["model"], task=c["task"], forget=c["forget"], retain=c["retain"], device=torch.device("cpu"))
    sites, score, _, _ = AttentionSurgery(num_heads=2).scores(ctx)
    top = set(score.flatten().argsort(descending=True)[:2].tolist())
    res = run("attention_surgery", c["model"], c["task"], c["forget"], c["retain"], num_heads=2)
    site = sites[0]
    w_before = c["model"].get_submodule(site.name).c_proj.weight
    w_after = res.model.get_submodule(site.name).c_proj.weight
    for h in range(site.num_heads):
        rows = slice(h * site.head_dim, (h + 1) * site.head_dim)
        if h in top:
            assert float(w_after[rows].detach().abs().max()) == 0.0
        else:
            assert torch.equal(w_after[rows], w_before[rows])
    assert changed_params(c["model"], res.model) == [f"{site.name}.c_proj.weight"]
    f0, r0 = fit(c["model"], c["task"], c["forget"])[0], fit(c["model"], c["task"], c["retain"])[0]
    f1, r1 = fit(res.model, c["task"], c["forget"])[0], fit(res.model, c["task"], c["retain"])[0]
    assert f1 - f0 > 5 * (r1 - r0) and f1 - f0 > 0.5  # measured: forget 0.11 -> 1.06, retain 0.01 -> 0.08
    again = run("attention_surgery", c["model"], c["task"], c["forget"], c["retain"], num_heads=2)
    assert model_hash(again.model) == model_hash(res.model) != res.model_hash_before


def test_attention_surgery_finds_heads_and_refuses_classifiers(tiny_lm, digits_class):
    assert [(s.name, s.num_heads, s.head_dim) for s in attention_sites(tiny_lm["model"])] == [("transformer.h.0.attn", 2, 16)]
    with pytest.raises(CapabilityError, match=r"'attention_surgery'.*'tokens'.*'classification'"):
        ErasusUnlearner(digits_class.original, strategy="attention_surgery", task=digits_class.task)
    with pytest.raises(InvalidConfigError, match="num_heads"):
        AttentionSurgery(num_heads=0)


# --- causal_tracing ---------------------------------------------------------------------------------------------

class Residual(nn.Module):
    """``h = pad(x); h += f1(h); h += f2(h); logits = head(h)``: x lives in dims 0..3, f2 writes dims 4..7, the head
    reads only dims 4..7 and f1 is zero - so f2's output carries all of the signal."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.f1, self.f2, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        with torch.no_grad():
            self.f1.weight.zero_(), self.f1.bias.zero_()
            self.f2.weight[:4].zero_(), self.f2.bias[:4].zero_()
            self.f2.weight[:, 4:].zero_()
            self.head.weight[:, :4].zero_()
            self.head.weight.mul_(20)  # confident clean predictions, so that noise measurably hurts them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, torch.zeros_like(x)], dim=1)
        h = h + self.f1(h)
        h = h + self.f2(h)
        return self.head(h)


def test_tracing_picks_the_layer_that_carries_the_signal():
    model = Residual()
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1).detach()
    data = as_id_dataset(torch.utils.data.TensorDataset(x, y))
    ctx = UnlearnContext(model=model, task=ClassificationTask(head="head"), forget=data, retain=None, device=torch.device("cpu"))
    effects, probs, _ = indirect_effects(model, ctx, data, ["f1", "f2"], noise=3.0, samples=3, seed=0)
    assert probs["p_corrupt"] < probs["p_clean"]
    assert float(effects[0]) == pytest.approx(0.0, abs=1e-6)  # restoring f1 (all zeros) restores nothing
    assert float(effects[1]) == pytest.approx(probs["p_clean"] - probs["p_corrupt"], abs=1e-5)  # f2 restores all
    assert top_layers(["f1", "f2"], effects, 1) == ["f2"]
    assert top_layers(["a", "b", "c"], torch.tensor([0.5, 0.5, 0.1]), 1) == ["b"]  # ties go to the later layer


def test_causal_tracing_edits_only_the_located_layer(digits_class):
    """Measured: trace ties net.1/net.3 (plain MLP), net.3 is edited; forget acc 0.00, retain 0.998, test 0.869."""
    b = digits_class
    res = run("causal_tracing", b.original, b.task, b.forget, b.retain)
    trace = res.report.history[0]
    assert trace["edited:net.3"] == 1.0 and trace["ie:net.1"] > 0.3
    assert changed_params(b.original, res.model) == ["net.3.weight", "net.3.bias"]
    assert fit(res.model, b.task, b.forget)[1] <= 0.05 and fit(res.model, b.task, b.retain)[1] >= 0.97


def test_causal_tracing_on_an_lm_edits_the_located_mlp(concept_lm):
    from transformers import GPT2Config, GPT2LMHeadModel

    c = concept_lm
    # 2 blocks: the edit must touch exactly one of the two MLPs, the one the trace ranks first
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=48, n_positions=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    from erasus_ray.training import TrainRecipe, train_model

    model = GPT2LMHeadModel(cfg)
    both = as_id_dataset(ConceptSequences(n_copy=8, n_succ=8))
    train_model(model, both, c["task"], TrainRecipe(epochs=30, lr=1e-2, batch_size=8, optimizer="adamw", seed=0))
    forget, retain = both.subset(both.ids[:8]), both.exclude(both.ids[:8])
    res = run("causal_tracing", model, c["task"], forget, retain, epochs=10, lr=3e-3, batch_size=4)
    trace = res.report.history[0]
    ies = {k[3:]: v for k, v in trace.items() if k.startswith("ie:")}
    assert set(ies) == {"transformer.h.0.mlp", "transformer.h.1.mlp"}
    best = max(ies, key=lambda k: (round(ies[k], 6), k))
    assert trace[f"edited:{best}"] == 1.0
    assert {n.rsplit(".", 2)[0] for n in changed_params(model, res.model)} == {best}
    assert fit(res.model, c["task"], forget)[0] > fit(model, c["task"], forget)[0] + 0.5


def test_bad_hyperparameters_name_the_argument():
    with pytest.raises(InvalidConfigError, match="num_layers"):
        ErasusUnlearner(nn.Linear(2, 2), strategy="causal_tracing", num_layers=0)
    with pytest.raises(InvalidConfigError, match="mode"):
        ActivationSteering(mode="add")
    with pytest.raises(InvalidConfigError, match="alpha"):
        ErasusUnlearner(nn.Linear(2, 2), strategy="dexperts", alpha=-1.0)
