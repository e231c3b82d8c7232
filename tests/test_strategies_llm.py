"""LLM unlearning objectives (issue #4): dpo, idk_dpo, altpo, flat, undial, token_masking, delta_unlearning,
embedding_alignment. Hand computations of each objective on tiny inputs, plus the effect each exists for."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from erasus_ray import ErasusUnlearner
from erasus_ray.data import make_loader
from erasus_ray.errors import InvalidConfigError
from erasus_ray.strategies import STRATEGIES, UnlearnContext, get_strategy
from erasus_ray.strategies._preference import alternative_answers, build_pairs, chosen_batch, other_labels
from erasus_ray.tasks import Capability, CapabilityError
from erasus_ray.strategies.dpo import dpo_loss
from erasus_ray.strategies.embedding_alignment import assign_anchors
from erasus_ray.strategies.flat import flat_loss
from erasus_ray.strategies.token_masking import fact_token_mask
from erasus_ray.strategies.undial import adjusted_targets
from erasus_ray.tasks import CausalLMTask
from erasus_ray.utils import model_hash

LLM_NAMES = ["dpo", "idk_dpo", "altpo", "flat", "undial", "token_masking", "delta_unlearning", "embedding_alignment"]


@torch.no_grad()
def mean_loss(model, task, ds):
    batch = next(iter(make_loader(ds, task.collate, batch_size=len(ds))))
    return float(task.forward(model, batch.data).sample_loss().mean())


def _ctx(model, t, **kw):
    return UnlearnContext(model=model, task=t["task"], forget=t["forget"], retain=t["retain"], device=torch.device("cpu"), **kw)


@torch.no_grad()
def _seq_logprob(model, prompt, response):
    """log p(response | prompt), summed over the response tokens, by a direct forward on one sequence."""
    ids = torch.cat([prompt, torch.tensor(response)])[None]
    logp = model(input_ids=ids).logits.log_softmax(-1)[0]
    start = len(prompt)
    return float(sum(logp[start - 1 + j, tok] for j, tok in enumerate(response)))


def _perturbed(model, scale=0.02, seed=1):
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def test_all_registered():
    for name in LLM_NAMES:
        assert name in STRATEGIES.names()
    assert STRATEGIES.get("token_masking").requires == {Capability.LOSS, Capability.LOGITS, Capability.TOKENS}


# --- dpo / idk_dpo -----------------------------------------------------------------------------------------------------
def test_dpo_loss_hand_computation():
    logp_c, ref_c = torch.tensor([-2.0, -5.0]), torch.tensor([-3.0, -4.0])
    logp_r, ref_r = torch.tensor([-1.0, -6.0]), torch.tensor([-1.5, -2.0])
    beta = 0.5
    expected = [
        -math.log(1 / (1 + math.exp(-beta * ((-2 + 3) - (-1 + 1.5))))),
        -math.log(1 / (1 + math.exp(-beta * ((-5 + 4) - (-6 + 2))))),
    ]
    assert dpo_loss(logp_c, ref_c, logp_r, ref_r, beta).tolist() == pytest.approx(expected, rel=1e-6)


def test_idk_dpo_step_equals_hand_computation_on_tiny_lm(tiny_lm):
    """The idk_dpo forget term equals -log sigmoid(beta((lp_c - ref_c) - (lp_r - ref_r))) with chosen = prompt + refusal,
    every log-likelihood computed here by a direct forward on the concatenated sequence."""
    t = tiny_lm
    reference = t["model"]
    refusals = [[5, 6, 0], [7, 0]]
    model = copy.deepcopy(reference)
    ctx = _ctx(model, t, seed=3)
    strat = get_strategy("idk_dpo", beta=0.3, alpha=0.0, refusal_ids=refusals)
    strat.setup(ctx)
    pairs = ctx.state["pairs"]
    assert all(pairs.chosen[int(i)][0] in refusals for i in t["forget"].ids)
    assert len({tuple(pairs.chosen[int(i)][0]) for i in t["forget"].ids}) == 2, "refusals drawn per id"
    model.load_state_dict(_perturbed(reference).state_dict())
    batch = next(iter(make_loader(t["forget"], t["task"].collate, batch_size=8)))
    loss = strat.loss(ctx, batch, None)[0].detach()

    manual = []
    for row, i in enumerate(batch.ids.tolist()):
        item = t["data"][i - 1000]
        prompt, answer = item["input_ids"][:3], item["input_ids"][3:].tolist()
        resp = pairs.chosen[i][0]
        lp_c, ref_c = _seq_logprob(model, prompt, resp), _seq_logprob(reference, prompt, resp)
        lp_r, ref_r = _seq_logprob(model, prompt, answer), _seq_logprob(reference, prompt, answer)
        manual.append(-math.log(1 / (1 + math.exp(-0.3 * ((lp_c - ref_c) - (lp_r - ref_r))))))
    assert float(loss) == pytest.approx(float(np.mean(manual)), rel=1e-4)


def test_idk_dpo_tokenises_refusals_with_the_task_tokenizer(tiny_lm):
    class FakeTokenizer:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1 + (ord(c) % 40) for c in text[:4]]}

    t = tiny_lm
    task = CausalLMTask(pad_token_id=0, tokenizer=FakeTokenizer())
    ctx = UnlearnContext(model=t["model"], task=task, forget=t["forget"], retain=t["retain"], device=torch.device("cpu"))
    pairs = build_pairs(ctx, "refusal", refusals=["No idea."], with_reference=False)
    expected = [1 + (ord(c) % 40) for c in " No "] + [0]
    assert all(pairs.chosen[int(i)] == [expected] for i in t["forget"].ids)
    # the chosen batch supervises exactly the refusal tokens after each prompt
    batch = next(iter(make_loader(t["forget"], task.collate, batch_size=2)))
    cb = chosen_batch(ctx, batch, pairs.responses(batch, 0))
    out = task.forward(t["model"], cb.data)
    assert out.targets.tolist() == expected * 2
    with pytest.raises(InvalidConfigError, match="refusals"):
        get_strategy("idk_dpo", refusals=[])


def test_classifier_chosen_is_a_seeded_other_label(digits_class):
    b = digits_class
    ctx = UnlearnContext(model=b.original, task=b.task, forget=b.forget, retain=b.retain, device=torch.device("cpu"), seed=0)
    pairs = build_pairs(ctx, "alternative", k=3)
    labels = {int(i): int(item[1]) for i, item in b.forget}
    for i, chosen in pairs.chosen.items():
        assert labels[i] not in chosen and len(set(chosen)) == 3
    assert build_pairs(ctx, "alternative", k=3, with_reference=False).chosen == pairs.chosen, "deterministic"
    assert other_labels(2, 10, 3, 0, 7) != other_labels(2, 10, 3, 1, 7), "depends on the seed"


# --- altpo -------------------------------------------------------------------------------------------------------------
def test_alternatives_are_answers_to_the_same_template(tiny_lm):
    """Prompt-token Jaccard picks the pool answer whose prompt shares the template, and skips identical answers."""
    from erasus_ray.data import IdDataset

    def item(prompt, answer):
        ids = torch.tensor(prompt + answer)
        return {"input_ids": ids, "answer_start": len(prompt)}

    # template A = tokens [1, 2, 3, entity], template B = [4, 5, 6, entity]
    forget_items = [item([1, 2, 3, 10], [20, 21, 0]), item([4, 5, 6, 11], [30, 31, 0])]
    pool_items = [
        item([4, 5, 6, 12], [32, 33, 0]),  # B about another entity
        item([1, 2, 3, 13], [20, 21, 0]),  # A, but the same answer as forget 0: skipped
        item([1, 2, 3, 14], [22, 23, 0]),  # A about another entity
        item([7, 8, 9, 15], [40, 41, 0]),  # unrelated
    ]
    forget = IdDataset(forget_items, np.arange(2), np.array([0, 1]))
    pool = IdDataset(pool_items, np.arange(4), np.array([10, 11, 12, 13]))
    ctx = UnlearnContext(model=tiny_lm["model"], task=CausalLMTask(), forget=forget, retain=pool, device=torch.device("cpu"))
    alts = alternative_answers(ctx, forget, pool, k=1, seed=0)
    assert alts == {0: [[22, 23, 0]], 1: [[32, 33, 0]]}


def test_altpo_prefers_alternatives_over_the_forget_answer(tiny_lm):
    t = tiny_lm
    res = ErasusUnlearner(t["model"], strategy="altpo", selector=None, task=t["task"], seed=0, progress=False,
                          epochs=20, lr=3e-3, batch_size=8).fit(forget_data=t["forget"], retain_data=t["retain"])
    ctx = _ctx(copy.deepcopy(t["model"]), t)
    pairs = build_pairs(ctx, "alternative", k=2, with_reference=False)
    batch = next(iter(make_loader(t["forget"], t["task"].collate, batch_size=8)))
    alt = chosen_batch(ctx, batch, pairs.responses(batch, 0))
    with torch.no_grad():
        alt_before = t["task"].forward(t["model"], alt.data).sample_loss().mean()
        alt_after = t["task"].forward(res.model, alt.data).sample_loss().mean()
    assert float(alt_after) < float(alt_before) - 1.0, "positive feedback: the alternative answers become likely"
    assert mean_loss(res.model, t["task"], t["forget"]) > mean_loss(t["model"], t["task"], t["forget"]) + 0.5


# --- flat --------------------------------------------------------------------------------------------------------------
def test_flat_loss_hand_computation():
    p_e, p_f = torch.tensor([0.2, 0.9]), torch.tensor([0.7, 0.1])
    assert flat_loss(p_e, p_f, "kl").tolist() == pytest.approx([-0.2 + math.exp(0.7 - 1), -0.9 + math.exp(0.1 - 1)], rel=1e-6)
    assert flat_loss(p_e, p_f, "tv").tolist() == pytest.approx(
        [-0.5 * math.tanh(0.2) + 0.5 * math.tanh(0.7), -0.5 * math.tanh(0.9) + 0.5 * math.tanh(0.1)], rel=1e-6)
    pe = torch.tensor([0.3], requires_grad=True)
    pf = torch.tensor([0.6], requires_grad=True)
    flat_loss(pe, pf, "kl").sum().backward()
    assert float(pe.grad) == pytest.approx(-1.0) and float(pf.grad) == pytest.approx(math.exp(-0.4), rel=1e-6)
    with pytest.raises(InvalidConfigError, match="divergence"):
        get_strategy("flat", divergence="hellinger2")


def test_flat_step_uses_mean_token_probabilities(tiny_lm):
    t = tiny_lm
    model = copy.deepcopy(t["model"])
    ctx = _ctx(model, t)
    strat = get_strategy("flat", refusal_ids=[[9, 0]])
    strat.setup(ctx)
    batch = next(iter(make_loader(t["forget"], t["task"].collate, batch_size=4)))
    loss, _ = strat.loss(ctx, batch, None)
    manual = []
    with torch.no_grad():
        for i in batch.ids.tolist():
            seq = t["data"][i - 1000]["input_ids"]
            lp = model(input_ids=seq[None]).logits.log_softmax(-1)[0]
            p_f = np.mean([math.exp(float(lp[j - 1, seq[j]])) for j in range(3, len(seq))])
            e = torch.cat([seq[:3], torch.tensor([9, 0])])
            lpe = model(input_ids=e[None]).logits.log_softmax(-1)[0]
            p_e = np.mean([math.exp(float(lpe[j - 1, e[j]])) for j in range(3, 5)])
            manual.append(-p_e + math.exp(p_f - 1))
    assert float(loss) == pytest.approx(float(np.mean(manual)), rel=1e-5)
    assert not STRATEGIES.get("flat").needs_retain


# --- undial ------------------------------------------------------------------------------------------------------------
def test_undial_adjusted_target_hand_computation():
    z = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]])
    y = torch.tensor([2, 0])
    got = adjusted_targets(z, y, gamma=1.5)
    e1 = np.exp([1.0, 2.0, 1.5])
    e2 = np.exp([-1.0, 0.0, -1.0])
    assert got[0].tolist() == pytest.approx((e1 / e1.sum()).tolist(), rel=1e-6)
    assert got[1].tolist() == pytest.approx((e2 / e2.sum()).tolist(), rel=1e-6)
    assert torch.equal(z, torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]])), "input not modified"


def test_undial_step_is_cross_entropy_to_the_adjusted_teacher(tiny_lm):
    t = tiny_lm
    reference = t["model"]
    model = copy.deepcopy(reference)
    ctx = _ctx(model, t)
    strat = get_strategy("undial", gamma=4.0)
    strat.setup(ctx)
    model.load_state_dict(_perturbed(reference).state_dict())
    batch = next(iter(make_loader(t["forget"], t["task"].collate, batch_size=8)))
    loss, _ = strat.loss(ctx, batch, None)
    per_sample = []
    with torch.no_grad():
        for i in batch.ids.tolist():
            seq = t["data"][i - 1000]["input_ids"]
            zr = reference(input_ids=seq[None]).logits[0]
            lz = model(input_ids=seq[None]).logits.log_softmax(-1)[0]
            ces = []
            for j in range(3, len(seq)):
                teacher = zr[j - 1].clone()
                teacher[seq[j]] -= 4.0
                ces.append(float(-(teacher.softmax(-1) * lz[j - 1]).sum()))
            per_sample.append(np.mean(ces))
    assert float(loss) == pytest.approx(float(np.mean(per_sample)), rel=1e-5)


# --- token_masking -----------------------------------------------------------------------------------------------------
def test_fact_token_mask_hand_computation():
    pool = [[1, 2, 9], [1, 3, 9]]
    # idf = log(3 / (1 + df)): token 1 -> 0, 4 -> log 3, 9 -> 0, 2 -> log 1.5; keep ceil(0.5 * 4) = 2
    assert fact_token_mask([1, 4, 9, 2], pool, 0.5) == [False, True, False, True]
    assert fact_token_mask([1, 9], pool, 0.1) == [True, False], "at least one token; ties go to the earlier one"


def test_token_masking_forgets_fact_tokens_and_keeps_the_rest(tiny_lm):
    t = tiny_lm
    res = ErasusUnlearner(t["model"], strategy="token_masking", selector=None, task=t["task"], seed=0, progress=False,
                          epochs=20, lr=3e-3, batch_size=8).fit(forget_data=t["forget"], retain_data=t["retain"])
    ctx = _ctx(copy.deepcopy(t["model"]), t)
    get_strategy("token_masking").setup(ctx)
    batch = next(iter(make_loader(t["forget"], t["task"].collate, batch_size=8)))
    mask = torch.cat([ctx.state["fact_masks"][int(i)] for i in batch.ids])
    with torch.no_grad():
        before = t["task"].forward(t["model"], batch.data).unit_loss()
        after = t["task"].forward(res.model, batch.data).unit_loss()
    fact_rise = float((after - before)[mask].mean())
    other_rise = float((after - before)[~mask].mean())
    assert fact_rise > 2.0 and other_rise < 0.25 * fact_rise, (fact_rise, other_rise)


def test_token_masking_is_lm_only(digits_class):
    b = digits_class
    with pytest.raises(CapabilityError, match=r"strategy 'token_masking' needs 'tokens'.*'classification'"):
        ErasusUnlearner(b.original, strategy="token_masking", selector=None, progress=False)


# --- delta_unlearning --------------------------------------------------------------------------------------------------
def test_delta_unlearning_wrapper_is_base_plus_learned_offset(tiny_lm):
    """With a separate small model as the offset pair: the result's logits are base + offset - offset_ref exactly,
    the base weights are untouched, and the offset (not the base) did the unlearning."""
    from erasus_ray.strategies.delta_unlearning import OffsetModel

    t = tiny_lm
    small = t["factory"](seed=5)  # an untrained small model sharing the vocabulary: the offset starts at zero
    base_hash = model_hash(t["model"])
    res = ErasusUnlearner(t["model"], strategy="delta_unlearning", selector=None, task=t["task"], seed=0, progress=False,
                          epochs=20, lr=1e-2, batch_size=8, offset_model=small).fit(
        forget_data=t["forget"], retain_data=t["retain"])
    wrapper = res.model
    assert isinstance(wrapper, OffsetModel)
    assert model_hash(wrapper.base) == model_hash(t["model"]) == base_hash
    assert model_hash(wrapper.offset_ref) == model_hash(small)
    batch = next(iter(make_loader(t["forget"], t["task"].collate, batch_size=8)))
    ids = batch.data["input_ids"]
    small.eval(), t["model"].eval(), wrapper.eval()  # GPT-2 has dropout
    with torch.no_grad():
        combined = wrapper(input_ids=ids).logits
        hand = t["model"](input_ids=ids).logits + wrapper.offset(input_ids=ids).logits - small(input_ids=ids).logits
    assert torch.allclose(combined, hand, atol=1e-5)
    assert model_hash(wrapper.offset) != model_hash(small), "the offset model was trained"
    assert mean_loss(wrapper, t["task"], t["forget"]) > mean_loss(t["model"], t["task"], t["forget"]) + 1.0
    assert mean_loss(wrapper, t["task"], t["retain"]) < 0.5


def test_offset_model_generate_matches_hf_greedy_at_zero_offset(tiny_lm):
    from erasus_ray.strategies.delta_unlearning import OffsetModel

    base = tiny_lm["model"]
    wrapper = OffsetModel(base, copy.deepcopy(base), copy.deepcopy(base)).eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])  # left-padded first row
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    ours = wrapper.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0, eos_token_id=0)
    theirs = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, num_beams=1,
                           pad_token_id=0, eos_token_id=0)
    assert torch.equal(ours, theirs)


# --- embedding_alignment -----------------------------------------------------------------------------------------------
def test_anchor_assignment_other_class_and_seeded():
    anchors = assign_anchors([1, 2, 3], [0, 1, 0], [10, 11, 12, 13], [0, 0, 1, 2], seed=0)
    assert anchors[1] in (12, 13) and anchors[3] in (12, 13) and anchors[2] in (10, 11, 13)
    assert anchors == assign_anchors([3, 2, 1], [0, 1, 0], [10, 11, 12, 13], [0, 0, 1, 2], seed=0), "order-invariant"
    assert assign_anchors([1], [None], [10], [None], seed=0) == {1: 10}


def test_embedding_alignment_moves_forget_features_onto_anchors(digits_class):
    b = digits_class
    res = ErasusUnlearner(b.original, strategy="embedding_alignment", selector=None, seed=0, progress=False).fit(
        forget_data=b.forget, retain_data=b.retain)
    ctx = UnlearnContext(model=b.original, task=b.task, forget=b.forget, retain=b.retain, device=torch.device("cpu"))
    strat = get_strategy("embedding_alignment")
    strat.setup(ctx)
    batch = next(iter(make_loader(b.forget, b.task.collate, batch_size=len(b.forget))))
    target = torch.stack([ctx.state["align_target"][int(i)] for i in batch.ids])
    with torch.no_grad():
        before = (b.task.features(b.original, batch.data) - target).pow(2).mean()
        after = (b.task.features(res.model, batch.data) - target).pow(2).mean()
        pred = b.task.forward(res.model, batch.data).logits.argmax(-1)
    assert float(after) < 0.6 * float(before), (float(before), float(after))
    # Similar inputs cannot each reach a different random anchor: they move towards their anchors' centroid, which the
    # head reads as some retained class - never the forgotten one - while retain accuracy holds.
    assert float((pred == batch.data[1]).float().mean()) < 0.05
    rb = next(iter(make_loader(b.retain, b.task.collate, batch_size=len(b.retain))))
    with torch.no_grad():
        assert float(b.task.forward(res.model, rb.data).sample_accuracy().mean()) > 0.97


# --- the effect each exists for, on the tiny LM --------------------------------------------------------------------------
@pytest.mark.parametrize("name", LLM_NAMES)
def test_effect_forget_nll_rises_more_than_retain(name, tiny_lm):
    t = tiny_lm
    lr = 1e-3 if name == "flat" else 3e-3  # flat reads no retain data: at 3e-3 it unlearns the retain set with the forget set
    res = ErasusUnlearner(t["model"], strategy=name, selector=None, task=t["task"], seed=0, progress=False,
                          epochs=20, lr=lr, batch_size=8).fit(forget_data=t["forget"], retain_data=t["retain"])
    d_forget = mean_loss(res.model, t["task"], t["forget"]) - mean_loss(t["model"], t["task"], t["forget"])
    d_retain = mean_loss(res.model, t["task"], t["retain"]) - mean_loss(t["model"], t["task"], t["retain"])
    assert d_forget > 0.5 and d_forget > 3 * d_retain, f"{name}: forget NLL +{d_forget:.3f}, retain NLL +{d_retain:.3f}"
