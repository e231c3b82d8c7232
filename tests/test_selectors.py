"""Selector contract (every registered selector, classifier and LM) and exactness of EL2N / GraNd."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from erasus_ray.data import as_id_dataset, make_loader
from erasus_ray.errors import InvalidConfigError, InvalidDataError, UnknownNameError
from erasus_ray.selectors import SELECTORS, get_selector, per_sample_grad_norms, trainable_params
from erasus_ray.tasks import CapabilityError

from _runs_on import runs_on
from _tolerances import assert_float32_close

ALL = SELECTORS.names()


def _shuffled_loader(ds, seed):
    ids = list(ds.ids)
    perm = np.random.default_rng(seed).permutation(len(ids))
    sub = Subset(ds.base, [int(ds.positions[i]) for i in perm])
    # ids of a Subset of the base are the base positions; bench ids equal positions for digits
    return DataLoader(sub, batch_size=7, shuffle=True)


@pytest.mark.parametrize("name", ALL)
def test_contract_classifier(name, digits_class):
    b = digits_class
    sel = get_selector(name)
    # retain= is what ErasusUnlearner passes to every selector (validation-set selectors default to it)
    core = sel.select(b.original, b.forget, task=b.task, fraction=0.1, seed=0, retain=b.retain)
    forget_ids = set(b.forget_ids.tolist())
    budget = len(b.forget_ids) if name == "full" else int(np.ceil(0.1 * len(b.forget_ids)))
    assert len(core.ids) == budget == len(core.weights)
    assert len(set(core.ids.tolist())) == len(core.ids), "ids must be unique"
    assert set(core.ids.tolist()) <= forget_ids, "ids must be forget ids, not positions"
    again = get_selector(name).select(b.original, b.forget, task=b.task, fraction=0.1, seed=0, retain=b.retain)
    assert core.ids.tolist() == again.ids.tolist(), "deterministic under a seed"
    shuffled = get_selector(name).select(b.original, _shuffled_loader(b.forget, 1), task=b.task, fraction=0.1, seed=0, retain=b.retain)
    assert sorted(core.ids.tolist()) == sorted(shuffled.ids.tolist()), "invariant to loader order"
    if core.scores is not None:
        assert set(core.scores) == forget_ids


@pytest.mark.parametrize("name", ALL)
def test_contract_lm(name, tiny_lm):
    forget = tiny_lm["forget"]
    if not runs_on(SELECTORS.get(name), tiny_lm["task"]):
        # selectors needing what an LM lacks (class labels: deepfool, data_shapley) refuse it, naming themselves
        # and the missing capability, before any forward pass
        with pytest.raises(CapabilityError, match=rf"'{name}'.*'labels'"):
            get_selector(name).select(tiny_lm["model"], forget, task=tiny_lm["task"], k=3, seed=0, retain=tiny_lm["retain"])
        return
    core = get_selector(name).select(tiny_lm["model"], forget, task=tiny_lm["task"], k=3, seed=0, retain=tiny_lm["retain"])
    expected = len(forget) if name == "full" else 3
    assert len(core.ids) == expected and set(core.ids.tolist()) <= set(forget.ids.tolist())
    rev = forget.subset(forget.ids[::-1])
    core2 = get_selector(name).select(tiny_lm["model"], rev, task=tiny_lm["task"], k=3, seed=0, retain=tiny_lm["retain"])
    assert sorted(core.ids.tolist()) == sorted(core2.ids.tolist())


def test_el2n_matches_definition_and_picks_largest(digits_class):
    b = digits_class
    core = get_selector("el2n").select(b.original, b.forget, task=b.task, k=5)
    x = torch.stack([b.forget[i][1][0] for i in range(len(b.forget))])
    y = torch.stack([b.forget[i][1][1] for i in range(len(b.forget))])
    with torch.no_grad():
        p = b.original(x).softmax(-1)
    manual = (p - torch.nn.functional.one_hot(y, 10)).norm(dim=1).numpy()
    ids = b.forget.ids
    got = np.array([core.scores[int(i)] for i in ids])
    assert_float32_close(got, manual)  # batches of 128 vs one of all rows: float32 rounding
    top = ids[np.lexsort((ids, -manual))[:5]]
    assert core.ids.tolist() == top.tolist()


def test_gradient_norm_matches_autograd_loop(digits_class, tiny_lm):
    for model, task, ds in [
        (digits_class.original, digits_class.task, digits_class.forget.subset(digits_class.forget_ids[:6])),
        (tiny_lm["model"], tiny_lm["task"], tiny_lm["forget"]),
    ]:
        batch = next(iter(make_loader(ds, task.collate, batch_size=len(ds))))
        fast = per_sample_grad_norms(model, task, batch.data, trainable_params(model))
        ref = []
        for row in range(len(ds)):
            one = next(iter(make_loader(ds.subset([int(ds.ids[row])]), task.collate, batch_size=1)))
            model.zero_grad()
            task.forward(model, one.data).sample_loss().sum().backward()
            ref.append(float(torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None))))
        model.zero_grad()
        assert_float32_close(fast, ref)  # one batch vs one sample at a time


def test_gradient_norm_last_scope_is_output_layer(digits_class):
    params = trainable_params(digits_class.original, "last")
    assert set(params) == {"net.5.weight", "net.5.bias"}
    assert set(trainable_params(torch.nn.Linear(3, 2), "last")) == {"weight", "bias"}


def test_random_depends_on_seed(digits_class):
    b = digits_class
    a = get_selector("random").select(b.original, b.forget, k=10, seed=0).ids
    c = get_selector("random").select(b.original, b.forget, k=10, seed=1).ids
    assert sorted(a.tolist()) != sorted(c.tolist())


@pytest.mark.parametrize("kwargs", [{"fraction": 0.0}, {"fraction": 1.5}, {"fraction": -0.1}, {"k": 0}, {"k": 10_000}, {"k": 2, "fraction": 0.5}])
def test_bad_budget(kwargs, digits_class):
    with pytest.raises(InvalidConfigError):
        get_selector("el2n").select(digits_class.original, digits_class.forget, **kwargs)


def test_empty_forget_set(digits_class):
    with pytest.raises(InvalidDataError, match="empty"):
        get_selector("el2n").select(digits_class.original, Subset(digits_class.forget, []), k=1)


def test_unknown_selector_lists_known_and_closest():
    with pytest.raises(UnknownNameError) as err:
        get_selector("el2m")
    assert "'el2n'" in str(err.value) and "gradient_norm" in str(err.value)
