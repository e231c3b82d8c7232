"""Requirements declared and checked once (issue 23): strategies and selectors declare the task capabilities they read
(``requires``), and a task that lacks one is refused up front - naming the algorithm, the task and what is missing -
before any forward pass or training step. A loss-only toy task (a regression objective, no logits) is the probe."""

from __future__ import annotations

import ast
import inspect
import textwrap

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from erasus_ray import ErasusUnlearner, StrategyPipeline
from erasus_ray.data import as_id_dataset, make_loader
from erasus_ray.errors import InvalidConfigError
from erasus_ray.selectors import SELECTORS, Selector, get_selector
from erasus_ray.strategies import STRATEGIES, Strategy
from erasus_ray.strategies.ensemble import Ensemble
from erasus_ray.tasks import Capability, CapabilityError, CausalLMTask, ClassificationTask, Task, TaskOutput

C = Capability


class LossOnlyTask(Task):
    """A regression objective (squared error per sample): a per-sample loss and nothing else (not registered)."""

    name = "loss_only_toy"

    def collate(self, items):
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])

    def model_inputs(self, data):
        return (data[0],), {}

    def dense_sample_loss(self, raw, data):
        return (raw - data[1]).pow(2).mean(-1)

    def read_output(self, raw, data, *, features=None):
        return TaskOutput(losses=self.dense_sample_loss(raw, data))


@pytest.fixture()
def toy():
    """A linear model fitted to a noiseless linear target (forget-set loss ~0), a forget and a retain split."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=gen)
    y = x @ torch.randn(4, 3, generator=gen)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()
    data = TensorDataset(x, y)
    return model, torch.utils.data.Subset(data, range(16)), torch.utils.data.Subset(data, range(16, 48))


def forward_counter(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda m, i, o: calls.append(1))
    return calls


def mean_loss(model, task, data) -> float:
    with torch.no_grad():
        return float(torch.cat([task.forward(model, b.data).sample_loss() for b in make_loader(as_id_dataset(data), task.collate, batch_size=16)]).mean())


def test_toy_task_declares_only_loss_and_has_no_logits(toy):
    model, forget, _ = toy
    out = LossOnlyTask().forward(model, next(iter(make_loader(as_id_dataset(forget), LossOnlyTask().collate, batch_size=16))).data)
    assert LossOnlyTask.capabilities == {C.LOSS}
    with pytest.raises(CapabilityError, match="logits"):
        out.logits  # noqa: B018


def test_logits_strategy_refused_at_construction_before_any_forward(toy):
    model, forget, retain = toy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = forward_counter(model)
    for name, kwargs in (("npo", {}), ("grad_diff", {"forget_loss_cap": "uniform"}), ("scrub", {})):
        with pytest.raises(CapabilityError, match=rf"strategy '{name}' needs 'logits'.*task 'loss_only_toy'"):
            ErasusUnlearner(model, strategy=name, selector=None, fraction=None, task=LossOnlyTask(), **kwargs)
    assert calls == [] and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_logits_selector_refused_at_select_and_at_construction(toy):
    model, forget, _ = toy
    calls = forward_counter(model)
    with pytest.raises(CapabilityError, match=r"selector 'el2n' needs 'logits'.*task 'loss_only_toy'"):
        get_selector("el2n").select(model, forget, task=LossOnlyTask(), k=4)
    with pytest.raises(CapabilityError, match=r"selector 'k_center' needs 'features'.*task 'loss_only_toy'"):
        get_selector("k_center").select(model, forget, task=LossOnlyTask(), k=4)
    with pytest.raises(CapabilityError, match=r"selector 'el2n' needs 'logits'"):
        ErasusUnlearner(model, strategy="gradient_ascent", selector="el2n", fraction=0.5, task=LossOnlyTask())
    assert calls == []


def test_refusal_names_the_providers():
    with pytest.raises(CapabilityError, match=r"'labels' - a class label per sample \(provided by tasks: [^)]*classification"):
        get_selector("deepfool").check_task(CausalLMTask())


def test_loss_only_algorithms_run_on_the_toy_task(toy):
    model, forget, _ = toy
    core = get_selector("loss").select(model, forget, task=LossOnlyTask(), k=4)
    assert len(core.ids) == 4
    # the loss selector keeps the highest per-sample losses
    losses = {int(i): s for i, s in core.scores.items()}
    assert sorted(losses, key=lambda i: (-losses[i], i))[:4] == core.ids.tolist()


def test_gradient_ascent_raises_the_loss_of_a_loss_only_task(toy):
    model, forget, _ = toy
    task = LossOnlyTask()
    before = mean_loss(model, task, forget)
    unl = ErasusUnlearner(model, strategy="gradient_ascent", selector=None, fraction=None, task=task, lr=5e-2,
                          epochs=10, inplace=False, progress=False)
    res = unl.fit(forget_data=forget)
    after = mean_loss(res.model, task, forget)
    assert before < 1e-3 and after > before + 0.1, (before, after)


def test_typo_in_requires_fails_at_class_definition():
    with pytest.raises(InvalidConfigError, match=r"unknown capability 'logit'.*Did you mean 'logits'"):
        class Typo(Strategy):  # noqa: F841
            requires = {"logit"}
    with pytest.raises(InvalidConfigError, match=r"unknown capability 'feature'.*Did you mean 'features'"):
        class TypoSelector(Selector):  # noqa: F841
            requires = frozenset({"feature"})

    class Named(Strategy):
        requires = {"tokens"}

    assert Named.requires == {C.LOSS, C.TOKENS}  # parsed to the enum; loss always included


def test_meta_requirements_are_the_union():
    assert StrategyPipeline(["gradient_ascent", "fine_tune"]).requirements() == {C.LOSS}
    assert StrategyPipeline(["gradient_ascent", "token_masking"]).requirements() == {C.LOSS, C.LOGITS, C.TOKENS}
    assert StrategyPipeline(["rmu", "fisher_forgetting"]).requirements() == {C.LOSS, C.FEATURES, C.INDEPENDENT}
    assert Ensemble(members=["gradient_ascent", "fine_tune"]).requirements() == {C.LOSS}
    # selecting the best member reads accuracies (logits)
    assert Ensemble(members=["gradient_ascent", "fine_tune"], mode="select").requirements() == {C.LOSS, C.LOGITS}
    assert STRATEGIES.create("layer_freezing", objective="npo").requirements() == {C.LOSS, C.LOGITS}
    assert SELECTORS.create("voting", selectors=["loss", "random"]).requirements() == {C.LOSS}
    assert SELECTORS.create("voting", selectors=["el2n", "k_center"]).requirements() == {C.LOSS, C.LOGITS, C.FEATURES}


def test_a_pipeline_is_refused_for_its_stage(toy):
    model, *_ = toy
    with pytest.raises(CapabilityError, match=r"strategy 'pipeline' needs 'logits'"):
        ErasusUnlearner(model, strategy=StrategyPipeline(["gradient_ascent", "npo"]), selector=None, task=LossOnlyTask())
    ErasusUnlearner(model, strategy=StrategyPipeline(["gradient_ascent", "fine_tune"]), selector=None, task=LossOnlyTask())


def test_configuration_refines_requirements():
    assert STRATEGIES.create("grad_diff").requirements() == {C.LOSS}  # "auto" cap: log C only where logits exist
    assert STRATEGIES.create("grad_diff", forget_loss_cap="uniform").requirements() == {C.LOSS, C.LOGITS}
    assert STRATEGIES.create("grad_diff", forget_loss_cap=None).requirements() == {C.LOSS}
    assert STRATEGIES.create("rmu", layer="fc").requirements() == {C.LOSS}
    assert SELECTORS.create("k_center").requirements() == {C.LOSS, C.FEATURES}
    assert SELECTORS.create("k_center", embedding="gradient").requirements() == {C.LOSS, C.LOGITS, C.FEATURES}


def _declares_requires(cls: type) -> bool:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    return any(
        isinstance(node, (ast.Assign, ast.AnnAssign))
        and any(getattr(t, "id", None) == "requires" for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))
        for node in body
    )


#: Registered algorithms that read nothing beyond the per-sample loss (or run others, which bring their own).
LOSS_ONLY_STRATEGIES = {
    "auto", "ensemble", "fine_tune", "grad_diff", "gradient_ascent", "l1_sparse", "layer_freezing", "lora_unlearning",
    "mask_based", "negative_gradient", "neggrad_plus", "neuron_pruning", "pipeline", "retrain", "sparse_aware",
}
LOSS_ONLY_SELECTORS = {"auto", "full", "loss", "random", "voting", "weighted_fusion"}
#: Registered classes that inherit ``requires`` from a registered parent on purpose (same reads).
INHERITED = {("selector", "farthest_first")}


def test_every_registered_algorithm_declares_its_requirements():
    """A new algorithm must choose: declare ``requires`` in its class body (or be listed as inheriting it), and the
    set of loss-only algorithms is pinned, so a new one cannot slip in as "supported everywhere" by default."""
    undeclared = {(kind, n) for kind, reg in (("strategy", STRATEGIES), ("selector", SELECTORS))
                  for n in reg.names() if not _declares_requires(reg.get(n))}
    assert undeclared == INHERITED
    assert {n for n in STRATEGIES.names()
            if STRATEGIES.get(n).requires == {C.LOSS} and not STRATEGIES.get(n).requires_one_of} == LOSS_ONLY_STRATEGIES
    assert {n for n in SELECTORS.names() if SELECTORS.get(n).requires == {C.LOSS}} == LOSS_ONLY_SELECTORS


def test_bundled_tasks_run_what_they_ran_before():
    """The declarations keep the old task restrictions: LM-only strategies refuse the classifier, class-label
    selectors refuse the LM, and nothing else is refused by either bundled task."""
    cls_task, lm_task = ClassificationTask(), CausalLMTask()
    refused_cls = {n for n in STRATEGIES.names() if not STRATEGIES.get(n).requires <= cls_task.capabilities}
    refused_lm = {n for n in STRATEGIES.names() if not STRATEGIES.get(n).requires <= lm_task.capabilities}
    diffusion_only = {"concept_ablation", "esd", "selective_amnesia", "noise_injection", "unet_surgery", "timestep_masking",
                      "meta_unlearning", "safe_latents", "uce"}  # class-erasure methods need guidance (a diffusion task)
    # vision-language methods need a model's vision and text towers or its joint image-text space
    vlm_only = {"contrastive_unlearning", "modality_decoupling", "vision_text_split", "vlm_attention"}
    assert refused_cls == {"attention_surgery", "token_masking"} | diffusion_only | vlm_only
    assert refused_lm == {"certified_removal"} | diffusion_only | vlm_only
    assert {n for n in SELECTORS.names() if not SELECTORS.get(n).requires <= lm_task.capabilities} == {
        "data_shapley", "deepfool", "valuation_network"}
    assert all(SELECTORS.get(n).requires <= cls_task.capabilities for n in SELECTORS.names())


class IndependentLossTask(LossOnlyTask):
    """The toy objective, declared independent per sample (squared error of one row does not see the others)."""

    name = "independent_loss_toy"
    capabilities = {"independent"}


@pytest.mark.parametrize("method", ["func", "factored"])
def test_gradient_norm_needs_only_independent_losses(toy, method):
    """Per-sample gradients need the loss and independence, not logits: gradient_norm scores the toy task with
    the per-sample gradient norms computed one sample at a time (and refuses the task without independence)."""
    model, forget, _ = toy
    with torch.no_grad():  # move off the optimum so the gradients are not ~0
        model.weight.add_(0.3)
    with pytest.raises(CapabilityError, match=r"selector 'gradient_norm' needs 'independent'"):
        get_selector("gradient_norm").select(model, forget, task=LossOnlyTask(), k=4)
    task = IndependentLossTask()
    core = get_selector("gradient_norm", method=method).select(model, forget, task=task, k=4)
    expected = {}
    for i in range(len(forget)):
        x, y = forget[i]
        model.zero_grad()
        (model(x[None]) - y[None]).pow(2).mean().backward()
        expected[i] = float(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())))
    got = core.scores
    assert sorted(got) == sorted(expected)
    for i in expected:  # float32 vs per-sample loop
        assert abs(got[i] - expected[i]) <= 1e-4 * max(1.0, expected[i]), (i, got[i], expected[i])


def test_auto_target_on_a_loss_only_task_skips_the_gold_rule_it_cannot_measure(toy):
    """The gold rule compares accuracies: with a retrained model *and* a held-out set, ``target="auto"`` on a task
    without logits resolves to the held-out target instead of refusing; asking for ``gold`` by name still refuses."""
    from erasus_ray.data import as_id_dataset
    from erasus_ray.evaluation.verification import resolve_target

    model, forget, retain = toy
    task = LossOnlyTask()
    f, r = as_id_dataset(forget), as_id_dataset(retain)
    resolved = resolve_target("auto", task=task, forget=f, retain=r, heldout=r, gold=model)
    assert resolved.target is not None and resolved.target.name == "heldout"
    with pytest.raises(CapabilityError, match="target 'gold' needs 'logits'"):
        resolve_target("gold", task=task, forget=f, retain=r, heldout=r, gold=model)


def test_a_selector_whose_scores_are_all_equal_says_so(toy):
    """Equal scores (forgetting events on an LM whose proxy replay never learns an answer) pick the smallest ids: the
    selection carries no information, and the coreset says it and warns instead of passing it off as a ranking."""
    from erasus_ray.selectors.base import ScoreSelector

    class Flat(ScoreSelector):
        requires = frozenset({C.LOSS})

        def score(self, model, forget, task, seed, **context):
            return np.full(len(forget), 8.0)

    Flat.name = "flat_scores"
    model, forget, _ = toy
    with pytest.warns(RuntimeWarning, match="scored every one of the 16 forget samples 8"):
        core = Flat().select(model, forget, task=LossOnlyTask(), k=4)
    assert "uninformative_scores" in core.info and sorted(core.ids.tolist()) == [0, 1, 2, 3]
    informative = get_selector("loss").select(model, forget, task=LossOnlyTask(), k=4)
    assert "uninformative_scores" not in informative.info
