"""The metric registry (issue 23 item 3): the registry path gives the old suites' values, a metric registered here
runs without editing a suite, requirement mismatches name metric / task / capability, a loss-only task gets a default
suite from its requirements, and every split is forwarded once per evaluation whatever the number of metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset, default_collate

from erasus_ray.data import IdDataset, as_id_dataset, make_loader
from erasus_ray.errors import InvalidConfigError, UnknownNameError
from erasus_ray.evaluation import (
    METRICS,
    display_names_for,
    evaluate,
    gap_names_for,
    metric_names_for,
    register_metric,
    run_metrics,
)
from erasus_ray.evaluation.classification import svc_mia_efficacy
from erasus_ray.evaluation.lm import greedy_answers, membership_auc, mink_scores, rouge_l_recall
from erasus_ray.tasks import TASKS, Capability, CapabilityError, CausalLMTask, Task, TaskOutput

# The suites as erasus_ray.evaluation.SUITES declared them before the registry (commit 684c8a8).
OLD_SUITES = {
    "classification": {
        "gap": ("forget_acc", "retain_acc", "test_acc", "mia_svc_efficacy"),
        "display": ("forget_acc", "retain_acc", "test_acc", "mia_svc_efficacy", "mia_loss_auc"),
    },
    "causal_lm": {
        "gap": ("forget_rougeL", "retain_rougeL", "forget_prob", "retain_prob", "mia_mink_auc"),
        "display": ("forget_rougeL", "retain_rougeL", "test_rougeL", "forget_loss", "retain_loss", "test_loss", "mia_mink_auc"),
    },
}


def count_forwards(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    return calls


def n_batches(*sets: IdDataset, batch_size: int) -> int:
    return sum(math.ceil(len(s) / batch_size) for s in sets)


# ----------------------------------------------------------------------------------------------------------------------
# the old suite functions, written out from task.forward (the oracle the registry path must reproduce exactly)
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _outputs(model, task, data, batch_size):
    model.eval()
    return [task.forward(model, b.data) for b in make_loader(data, task.collate, batch_size=batch_size)]


def old_classification(model, task, forget, retain, test, seed=0):
    per = {}
    for name, data in (("forget", forget), ("retain", retain), ("test", test)):
        outs = _outputs(model, task, data, 256)
        per[name] = (np.concatenate([o.sample_loss().float().numpy() for o in outs]),
                     np.concatenate([o.sample_accuracy().float().numpy() for o in outs]))
    m = {}
    for name, (loss, correct) in per.items():
        m[f"{name}_acc"], m[f"{name}_loss"] = float(correct.mean()), float(loss.mean())
    m["mia_loss_auc"] = membership_auc(-per["forget"][0], -per["test"][0])
    conf = {n: np.exp(-per[n][0]) for n in per}
    m["mia_svc_efficacy"] = svc_mia_efficacy(conf["retain"], conf["test"], conf["forget"], seed)
    return m


def old_lm(model, task, forget, retain, test, batch_size=32, k=0.2):
    sets = {"forget": forget, "retain": retain, "test": test}
    loss, mink, refs = {}, {}, {}
    for name, data in sets.items():
        outs = _outputs(model, task, data, batch_size)
        loss[name] = np.concatenate([o.sample_loss().numpy() for o in outs])
        mink[name] = np.concatenate([mink_scores(o, k).numpy() for o in outs])
        refs[name] = []
        for o in outs:
            for row in range(o.batch_size):
                ref = o.targets[o.owner == row].tolist()
                refs[name].append(ref[:-1] if ref and ref[-1] == model.config.eos_token_id else ref)
    max_new = max(len(r) for rs in refs.values() for r in rs) + 2
    m = {}
    for name, data in sets.items():
        answers = greedy_answers(model, task, data, max_new_tokens=max_new, batch_size=batch_size)
        m[f"{name}_loss"] = float(np.mean(loss[name]))
        m[f"{name}_prob"] = float(np.mean(np.exp(-loss[name])))
        m[f"{name}_rougeL"] = float(np.mean([rouge_l_recall(r, a) for r, a in zip(refs[name], answers)]))
    m["mia_mink_auc"] = membership_auc(mink["forget"], mink["test"])
    m["mia_loss_auc"] = membership_auc(-loss["forget"], -loss["test"])
    return m


def _with_gaps(metrics, gold, keys, seed=0):
    out = dict(metrics)
    out.update({f"gold_{k}": gold[k] for k in keys})
    gaps = {f"gap_{k}": abs(metrics[k] - gold[k]) for k in keys}
    out.update(gaps, avg_gap=sum(gaps.values()) / len(gaps), seed=seed)
    return out


def test_classification_registry_path_equals_old_suite(digits_class):
    b = digits_class
    new = evaluate(b.original, forget=b.forget, retain=b.retain, test=b.test, task=b.task, gold=b.gold)
    old = old_classification(b.original, b.task, b.forget, b.retain, b.test)
    gold = old_classification(b.gold, b.task, b.forget, b.retain, b.test)
    expected = _with_gaps(old, gold, OLD_SUITES["classification"]["gap"])
    assert list(new.items()) == list(expected.items())  # names, order and values, exactly
    assert gap_names_for(b.task) == OLD_SUITES["classification"]["gap"]
    assert display_names_for(b.task) == OLD_SUITES["classification"]["display"]


def _tiny_gpt2(seed: int = 0, vocab: int = 40):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=vocab, n_positions=64, bos_token_id=1,
                     eos_token_id=1, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def qa():
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(24):
        prompt, answer = torch.randint(2, 40, (3 + i % 4,), generator=g), torch.randint(2, 40, (2 + i % 3,), generator=g)
        ids = torch.cat([prompt, answer, torch.tensor([1])])
        items.append({"input_ids": ids, "answer_start": len(prompt)})
    ds = IdDataset(items, np.arange(24), 500 + np.arange(24))
    return {"task": CausalLMTask(pad_token_id=0), "forget": ds.subset(ds.ids[:8]), "retain": ds.subset(ds.ids[8:16]),
            "test": ds.subset(ds.ids[16:])}


def test_lm_registry_path_equals_old_suite(qa):
    model, gold_model = _tiny_gpt2(0), _tiny_gpt2(1)
    sets = {k: qa[k] for k in ("forget", "retain", "test")}
    new = evaluate(model, task=qa["task"], gold=gold_model, batch_size=4, **sets)
    old = old_lm(model, qa["task"], batch_size=4, **sets)
    gold = old_lm(gold_model, qa["task"], batch_size=4, **sets)
    expected = _with_gaps(old, gold, OLD_SUITES["causal_lm"]["gap"])
    assert list(new.items()) == list(expected.items())
    assert gap_names_for(qa["task"]) == OLD_SUITES["causal_lm"]["gap"]
    assert display_names_for(qa["task"]) == OLD_SUITES["causal_lm"]["display"]


def test_every_registered_task_declares_registered_metrics():
    for name in TASKS.names():
        suite = metric_names_for(TASKS.get(name))  # an unknown declared name raises UnknownNameError
        assert suite and set(gap_names_for(TASKS.get(name))) <= set(suite), name


def test_declared_suite_drops_metrics_the_task_cannot_run():
    class NoGenerationLM(CausalLMTask):  # not registered
        capabilities = CausalLMTask.capabilities - {Capability.GENERATION}

    suite = metric_names_for(NoGenerationLM)
    assert suite == tuple(n for n in CausalLMTask.default_metrics if not n.endswith("rougeL"))
    assert gap_names_for(NoGenerationLM) == ("forget_prob", "retain_prob", "mia_mink_auc")


# ----------------------------------------------------------------------------------------------------------------------
# a metric of one's own; requirement errors
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def loss_spread_metric():
    @register_metric("forget_loss_spread", requires={"loss"}, splits=("forget", "test"), gap=True)
    def forget_loss_spread(ctx):
        """Forget loss std over test loss std."""
        return float(ctx.stats("forget").loss.std() / ctx.stats("test").loss.std())

    yield "forget_loss_spread"
    METRICS.remove("forget_loss_spread")


def test_registered_metric_runs_without_editing_a_suite_and_shares_the_forward_pass(digits_class, loss_spread_metric):
    b = digits_class
    calls = count_forwards(b.original)
    names = ["forget_acc", "test_acc", loss_spread_metric]
    m = evaluate(b.original, forget=b.forget, retain=b.retain, test=b.test, task=b.task, gold_metrics={
        "forget_acc": 0.0, "test_acc": 0.9, loss_spread_metric: 1.0}, metrics=names)
    # forget and test forwarded once each (retain is read by no selected metric), shared by the three metrics
    assert calls[0] == n_batches(b.forget, b.test, batch_size=256)
    forget_loss = _outputs(b.original, b.task, b.forget, 256)[0].sample_loss().numpy()
    test_loss = np.concatenate([o.sample_loss().numpy() for o in _outputs(b.original, b.task, b.test, 256)])
    assert m[loss_spread_metric] == pytest.approx(forget_loss.std() / test_loss.std(), rel=1e-6)
    assert [k for k in m if not k.startswith(("gap_", "gold_"))] == names + ["avg_gap", "seed"]
    # its own gap flag puts it in Avg.Gap next to the task's gap metrics
    assert gap_names_for(b.task, names) == ("forget_acc", "test_acc", loss_spread_metric)
    assert m["avg_gap"] == pytest.approx(np.mean([m["gap_forget_acc"], m["gap_test_acc"], m[f"gap_{loss_spread_metric}"]]))
    assert loss_spread_metric not in metric_names_for(b.task)  # named explicitly, not added to the suite


def test_unknown_metric_and_bad_declaration_fail_with_names(digits_class):
    b = digits_class
    with pytest.raises(UnknownNameError, match="Did you mean 'forget_acc'"):
        evaluate(b.original, forget=b.forget, retain=b.retain, test=b.test, task=b.task, metrics=["forget_accuracy"])
    with pytest.raises(InvalidConfigError, match="metric 'bad'.*'logit'.*Did you mean 'logits'"):
        register_metric("bad", requires={"logit"}, splits=("forget",))(lambda ctx: 0.0)
    with pytest.raises(InvalidConfigError, match="mink_q"):
        evaluate(b.original, forget=b.forget, retain=b.retain, test=b.test, task=b.task, mink_q=0.1)
    assert "bad" not in METRICS


def test_requirement_mismatch_names_metric_task_and_capability(digits_class):
    b = digits_class
    with pytest.raises(CapabilityError) as err:
        evaluate(b.original, forget=b.forget, retain=b.retain, test=b.test, task=b.task, metrics=["forget_rougeL"])
    msg = str(err.value)
    assert "metric 'forget_rougeL'" in msg and "'classification'" in msg and "'generation'" in msg and "'tokens'" in msg
    assert "causal_lm" in msg  # what would provide it


# ----------------------------------------------------------------------------------------------------------------------
# a loss-only task: the default suite follows from the requirements
# ----------------------------------------------------------------------------------------------------------------------
class MSETask(Task):
    """A regression adapter with nothing but a per-sample objective (no logits): items are ``(x, y)``."""

    name = "toy_mse"  # not registered: it stays out of the registry other tests walk
    capabilities = frozenset({"loss"})

    def collate(self, items):
        return tuple(default_collate(items))

    def model_inputs(self, data):
        return (data[0],), {}

    def read_output(self, raw, data, *, features=None):
        return TaskOutput(losses=self.dense_sample_loss(raw, data), batch_size=raw.shape[0])

    def dense_sample_loss(self, raw, data):
        return ((raw - data[1].to(raw.device)) ** 2).mean(1)


def _regression_data(n: int = 48):
    """Forget, retain and test row ranges of random inputs with noise targets (only memorisation fits them)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3 * n, 4, generator=g), torch.randn(3 * n, 2, generator=g)
    full = as_id_dataset(TensorDataset(x, y))
    parts = (slice(0, n), slice(n, 2 * n), slice(2 * n, 3 * n))
    return x, y, [full.subset(full.ids[p]) for p in parts], parts


def _fit(x: torch.Tensor, y: torch.Tensor, steps: int = 400, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return model


def test_loss_only_task_default_suite_and_mia_direction():
    task = MSETask()
    assert metric_names_for(task) == ("forget_loss", "retain_loss", "test_loss", "mia_loss_auc")
    assert gap_names_for(task) == ("mia_loss_auc",)
    x, y, (forget, retain, test), (_, r, _) = _regression_data()
    original = _fit(x[: r.stop], y[: r.stop])  # memorised forget and retain (rows 0 .. end of retain)
    gold = _fit(x[r], y[r])  # retrained without forget: forget looks like test data
    calls = count_forwards(original)
    m = evaluate(original, forget=forget, retain=retain, test=test, task=task, gold=gold)
    assert calls[0] == n_batches(forget, retain, test, batch_size=task.eval_batch_size)
    assert all(math.isfinite(m[k]) for k in ("forget_loss", "retain_loss", "test_loss", "mia_loss_auc", "avg_gap"))
    assert m["forget_loss"] < 0.5 * m["test_loss"] and m["mia_loss_auc"] > 0.9
    assert abs(m["gold_mia_loss_auc"] - 0.5) < 0.2 and m["gap_mia_loss_auc"] > 0.3
    with pytest.raises(CapabilityError, match="metric 'forget_acc'.*'logits'.*task 'toy_mse'"):
        evaluate(original, forget=forget, retain=retain, test=test, task=task, metrics=["forget_acc"])


# ----------------------------------------------------------------------------------------------------------------------
# the shared pass: one forward per split per evaluation, one generation per split
# ----------------------------------------------------------------------------------------------------------------------
def test_one_forward_per_split_and_one_generation_per_split(qa, monkeypatch):
    model, task = _tiny_gpt2(0), qa["task"]
    sets = {k: qa[k] for k in ("forget", "retain", "test")}
    calls = count_forwards(model)
    generate_forwards = []  # forwards made inside each generate call
    original_generate = model.generate

    def counted_generate(*args, **kwargs):
        before = calls[0]
        try:
            return original_generate(*args, **kwargs)
        finally:
            generate_forwards.append(calls[0] - before)

    monkeypatch.setattr(model, "generate", counted_generate)
    batches = n_batches(*sets.values(), batch_size=4)
    scoring = [n for n in metric_names_for(task) if not n.endswith("rougeL")]
    run_metrics(model, task, sets, scoring, batch_size=4)
    assert calls[0] == batches and not generate_forwards
    calls[0] = 0
    run_metrics(model, task, sets, batch_size=4)  # the whole suite: 11 metrics, three of them ROUGE
    assert len(generate_forwards) == batches  # each split generated once (one generate per batch), not per metric
    assert calls[0] - sum(generate_forwards) == batches  # and scored once
