"""Property-based fuzzing of the public entry points (issue 24): ``ErasusUnlearner(...).fit`` arguments and data, and
job configs (dicts and YAML text).

The property, for every generated case: either a valid result, or an erasus-ray error (:class:`ErasusError`) whose
message names the argument or key at fault; never another exception; the caller's model and data unchanged.

Profiles: ``ci`` (the default here; bounded examples, derandomized so every run tries the same cases, no deadline,
no example database written into the repository) and ``dev`` (more examples, random). Choose with
``HYPOTHESIS_PROFILE=dev``.
"""

from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import Subset, TensorDataset

from erasus_ray import ErasusUnlearner
from erasus_ray.config_files import parse_yaml_mapping
from erasus_ray.errors import ErasusError
from erasus_ray.experiment import JobConfig
from erasus_ray.strategies import get_strategy
from erasus_ray.utils import model_hash

settings.register_profile(
    "ci", max_examples=40, derandomize=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=400, deadline=None, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# ---- fit: each argument's values, each marked valid or not -------------------------------------------------------
NAN, INF = float("nan"), float("inf")
#: argument -> (valid values, invalid values); the constructor gets a draw from their union.
ARGUMENTS: dict[str, tuple[list, list]] = {
    "lr": ([1e-3, 0.05, None], [0, -1.0, NAN, INF, "0.1", True]),
    "epochs": ([1, 2, None], [0, -1, 1.5, "2", True]),
    "batch_size": ([1, 4, 32, None], [0, -3, 2.5, "4", True]),
    "retain_batch_size": ([None, 3], [0, 1.5]),
    "grad_clip": ([None, 0.5, 10.0], [0, -1.0, NAN, INF, "1"]),
    "max_steps": ([None, 1, 3], [0, -5, 2.0, "3"]),
    "optimizer": ([None, "sgd", "adamw"], ["adagrad", 3]),
    "forget_target": ([None, 0.0, 0.5], [-0.1, 2, NAN]),
    "seed": ([0, 7, 2**32 - 1], [-1, 2**32, 2**70, 1.5, "0", None]),
    "fraction": ([None, 0.25, 1.0], [0, 1.5, -0.5, NAN, "0.5", True]),
    "k": ([None, 1, 4, 8], [0, -1, 9, 2.0, "3", True]),
    "strategy": (["grad_diff", "gradient_ascent", "npo"], ["gradient_descent", 3]),
    "selector": ([None, "random", "el2n", "loss"], ["el3n", 1]),
}
#: how the forget / retain data are damaged, and the argument an error must then name
DATA_CASES = {
    "ok": None, "nan_forget": "forget_data", "inf_retain": "retain_data", "float64": "forget_data",
    "wide": "forget_data", "overlap": "forget_data", "out_of_range": "forget_data", "empty_forget": "forget_data",
    "no_retain": "retain_data",
}
N, N_FORGET = 24, 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _data(case: str) -> tuple[object, object, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)
    if case == "nan_forget":
        x[2, 1] = NAN
    elif case == "inf_retain":
        x[N - 1, 0] = INF
    elif case == "float64":
        x = x.double()
    elif case == "wide":
        x = torch.randn(N, 5, generator=g)
    data = TensorDataset(x, y)
    forget_rows = {"overlap": range(N_FORGET + 1), "out_of_range": [0, 1, N + 3], "empty_forget": []}.get(case, range(N_FORGET))
    forget = Subset(data, list(forget_rows))
    retain = None if case == "no_retain" else Subset(data, list(range(N_FORGET, N)))
    return forget, retain, [x, y]


def _invalid(kwargs: dict) -> set[str]:
    """The names of the arguments drawn from their invalid values (fraction only counts without k)."""
    bad = {name for name, value in kwargs.items() if not any(_same(value, v) for v in ARGUMENTS[name][0])}
    if kwargs.get("k") is not None:
        bad.discard("fraction")  # k given: fraction is not used
    return bad


def _same(a: object, b: object) -> bool:
    return type(a) is type(b) and a == b


def _draw_arguments() -> st.SearchStrategy[dict]:
    """Half the cases only valid values (so valid runs are checked too), half any value."""
    valid_only = {name: st.sampled_from(valid) for name, (valid, _) in ARGUMENTS.items()}
    anything = {name: st.sampled_from(valid + invalid) for name, (valid, invalid) in ARGUMENTS.items()}
    return st.one_of(st.fixed_dictionaries({}, optional=valid_only), st.fixed_dictionaries({}, optional=anything))


@given(kwargs=_draw_arguments(), case=st.one_of(st.just("ok"), st.sampled_from(sorted(DATA_CASES))),
       caller_no_grad=st.booleans())
def test_fuzzed_fit_arguments_give_a_result_or_a_named_error(kwargs, case, caller_no_grad):
    model = _model()
    hash_before = model_hash(model)
    forget, retain, tensors = _data(case)
    copies = [t.clone() for t in tensors]
    expected = _invalid(kwargs) | ({DATA_CASES[case]} - {None})
    if case == "no_retain" and "strategy" not in expected and not get_strategy(kwargs.get("strategy", "grad_diff")).needs_retain:
        expected.discard("retain_data")  # e.g. gradient ascent: no retain set needed
    result = error = None
    try:
        with torch.no_grad() if caller_no_grad else contextlib.nullcontext():  # fit enables gradients itself
            result = ErasusUnlearner(model, progress=False, **kwargs).fit(forget, retain)
    except ErasusError as err:
        error = err
    # any other exception fails the test with its traceback: that is the bug being looked for
    event("fit: result" if error is None else f"fit: {type(error).__name__}")
    if error is not None:
        assert expected, f"valid arguments {kwargs} / data {case!r} were refused: {error}"
        assert any(name in str(error) for name in expected), f"{error!r} names none of {sorted(expected)}"
    else:
        assert not expected, f"accepted invalid {sorted(expected)}: {kwargs} / {case!r}"
        assert set(result.coreset.ids.tolist()) <= set(range(N_FORGET))
        assert all(bool(torch.isfinite(p).all()) for p in result.model.parameters())
        assert result.report.stopped, "a run says why it stopped"
    assert model_hash(model) == hash_before, "the caller's model changed"
    for t, c in zip(tensors, copies):
        assert torch.equal(t, c) or (t.isnan() == c.isnan()).all() and torch.equal(t.nan_to_num(), c.nan_to_num())


# ---- job configs: dicts and YAML text ----------------------------------------------------------------------------
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
VALUES = {
    "benchmark": st.one_of(st.sampled_from(["digits", "mnist5k", "authors", "cifar10"]), JUNK),
    "scenario": st.one_of(st.sampled_from([None, "class", "random10", "forget10", "nope"]), JUNK),
    "seed": st.one_of(st.sampled_from([0, 1, -1, 2**32, 2**70]), JUNK),
    "benchmark_options": st.one_of(st.sampled_from([{}, {"variant": "ci"}, {"variant": ["ci"]}, {"test_size": 0.3}]), JUNK),
    "strategy": st.one_of(st.sampled_from([None, "grad_diff", "npo", "scrub", "scrubb"]), JUNK),
    "strategy_params": st.one_of(st.sampled_from([{}, {"beta": 0.2}, {"beta": "x"}, {"betaa": 1}, {"alpha": NAN}]), JUNK),
    "selector": st.one_of(st.sampled_from([None, "el2n", "random", "influence", "el3n"]), JUNK),
    "selector_params": st.one_of(st.sampled_from([{}, {"batch_size": 8}, {"foo": 1}, {"batch_size": "8"}]), JUNK),
    "fraction": st.one_of(st.sampled_from([None, 0.1, 1.0, 0, 1.5, "0.5", True]), JUNK),
    "k": st.one_of(st.sampled_from([None, 1, 5, 0, -1, "3"]), JUNK),
    "runner": st.one_of(st.fixed_dictionaries({}, optional={
        "lr": st.sampled_from([1e-3, 0, "x", NAN]), "epochs": st.sampled_from([1, 0, 2.5]),
        "batch_size": st.sampled_from([8, 2.5, True]), "max_steps": st.sampled_from([None, 0, 3]),
        "grad_clip": st.sampled_from([None, 1.0, NAN, -1]), "gradient_checkpointing": st.sampled_from([False, "yes"]),
        "learning_rate": st.just(1),
    }), JUNK),
    "execution": st.one_of(st.sampled_from([{}, {"distributed": "ray"}, {"backend": "spark"}, {"num_workers": 0},
                                            {"use_gpu": "no"}, {"workers": 2}]), JUNK),
    "output": st.one_of(st.sampled_from([None, "out"]), JUNK),
    "strateg": JUNK,  # an unknown key
}


def _all_keys(cfg: dict) -> set[str]:
    keys = {str(k) for k in cfg}
    for value in cfg.values():
        if isinstance(value, dict):
            keys |= {str(k) for k in value}
    return keys


@given(cfg=st.fixed_dictionaries({}, optional=VALUES))
def test_fuzzed_job_configs_are_accepted_or_refused_naming_a_key(cfg):
    before = repr(cfg)
    try:
        JobConfig.from_dict(copy.copy(cfg))
        event("config: accepted")
    except ErasusError as err:
        event("config: refused")
        message = str(err)
        assert any(key in message for key in _all_keys(cfg)), f"{message!r} names no key of {cfg!r}"
    assert repr(cfg) == before, "the caller's config dict changed"


YAML_TEXT = st.one_of(
    st.text(alphabet=st.sampled_from(list("abdfkrs:{}[]-!&*|>'\"#%@ \n\t\x00~01.")), max_size=40),
    st.sampled_from(["", "null", "~", "benchmark: digits\nbenchmark: digits\n", "!!python/object:os.system {}",
                     "runner: {lr: x}", "[1, 2]", "{1: 2}", "? [a]\n: 1\n", "a: &x 1\nb: *x\n"]),
)


@given(text=YAML_TEXT)
def test_fuzzed_yaml_text_is_a_config_or_an_invalid_config_error(text):
    try:
        JobConfig.from_dict(parse_yaml_mapping(text, "config fuzz.yaml"))
    except ErasusError as err:
        assert str(err), "an error says what is wrong"


def test_the_ci_profile_is_bounded_reproducible_and_writes_no_database():
    profile = settings.get_profile("ci")
    assert profile.max_examples <= 100 and profile.derandomize and profile.database is None
    assert profile.deadline is None
    if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci":
        assert settings.default.database is None
