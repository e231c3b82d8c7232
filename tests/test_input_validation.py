"""Bad input to ``ErasusUnlearner`` ends in one project error naming the argument, before any work; never a stray
traceback, a silent no-op, or NaN weights reported as a completed run (issue 24, items 4, 5 and 8)."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from erasus_ray import ErasusUnlearner
from erasus_ray.data import as_id_dataset, make_loader
from erasus_ray.errors import InvalidConfigError, InvalidDataError, NonFiniteWeightsError
from erasus_ray.runners import RunnerConfig
from erasus_ray.runners.local import StepExecutor
from erasus_ray.selectors.base import resolve_budget
from erasus_ray.strategies import GradDiff, UnlearnContext, get_strategy
from erasus_ray.tasks import ClassificationTask
from erasus_ray.utils import model_hash


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _data(x: torch.Tensor | None = None) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g) if x is None else x
    return TensorDataset(x, torch.randint(0, 3, (40,), generator=g))


def _fit(model=None, forget=None, retain=None, **kw):
    data = _data()
    kw.setdefault("progress", False)
    kw.setdefault("epochs", 1)
    forget = Subset(data, range(8)) if forget is None else forget
    retain = Subset(data, range(8, 40)) if retain is None else retain
    return ErasusUnlearner(_model() if model is None else model, **kw).fit(forget, retain)


@pytest.mark.parametrize("kw, name", [
    ({"grad_clip": float("nan")}, "grad_clip"), ({"grad_clip": -1}, "grad_clip"), ({"grad_clip": 0}, "grad_clip"),
    ({"grad_clip": "1"}, "grad_clip"), ({"max_steps": 0}, "max_steps"), ({"max_steps": -5}, "max_steps"),
    ({"max_steps": 2.0}, "max_steps"), ({"batch_size": 2.5}, "batch_size"), ({"batch_size": True}, "batch_size"),
    ({"retain_batch_size": 0}, "retain_batch_size"), ({"epochs": 1.5}, "epochs"), ({"lr": float("inf")}, "lr"),
    ({"lr": "0.1"}, "lr"), ({"optimizer": "adagrad"}, "optimizer"), ({"optimizer": 3}, "optimizer"),
    ({"forget_target": float("nan")}, "forget_target"), ({"precision": 32}, "precision"), ({"progress": "no"}, "progress"),
    ({"fraction": "0.5"}, "fraction"), ({"fraction": True}, "fraction"), ({"fraction": float("nan")}, "fraction"),
    ({"k": -1}, "k"), ({"k": "3"}, "k"), ({"k": True}, "k"), ({"seed": -1}, "seed"), ({"seed": 2**70}, "seed"),
    ({"seed": 1.0}, "seed"), ({"inplace": 1}, "inplace"), ({"selector_kwargs": [1]}, "selector_kwargs"),
])
def test_runner_and_budget_settings_are_checked_at_construction(kw, name):
    with pytest.raises(InvalidConfigError, match=name):
        ErasusUnlearner(_model(), progress=kw.pop("progress", False), **kw)


def test_a_coreset_larger_than_the_forget_set_is_refused_before_work():
    with pytest.raises(InvalidConfigError, match=r"k=9 is larger than the forget set \(8"):
        _fit(k=9, selector=None)  # even where no selector would have used k


def test_fit_epochs_argument_is_checked():
    with pytest.raises(InvalidConfigError, match="epochs"):
        ErasusUnlearner(_model(), progress=False).fit(Subset(_data(), range(8)), epochs=0)


def test_resolve_budget_refuses_strings_and_bools():
    for bad in ("0.5", True):
        with pytest.raises(InvalidConfigError, match="fraction"):
            resolve_budget(10, fraction=bad)
    assert resolve_budget(10, fraction=np.float32(0.5)) == 5 and resolve_budget(10, k=np.int64(3)) == 3


def test_weights_that_turn_nan_after_a_step_stop_the_run_with_an_error():
    """The loss and gradient-norm guards run before the step; grad_clip=nan (which validation now refuses) made the
    step itself write NaN into the weights and the run still reported 'completed'."""
    data = as_id_dataset(_data())
    task = ClassificationTask()
    model = _model()
    ctx = UnlearnContext(model=model, task=task, forget=data.subset(range(8)), retain=data.subset(range(8, 40)),
                         device=torch.device("cpu"))
    config = RunnerConfig(epochs=1, batch_size=8).validate()
    config.grad_clip = float("nan")  # as a strategy's own bad update would: past validation
    executor = StepExecutor(GradDiff(), ctx, config)
    batch = next(iter(make_loader(ctx.forget, task.collate, batch_size=8)))
    retain = next(iter(make_loader(ctx.retain, task.collate, batch_size=8)))
    with pytest.raises(NonFiniteWeightsError, match="lr=.*grad_clip=nan"):
        executor.step(batch, retain)


@pytest.mark.parametrize("where", ["forget", "retain"])
def test_nan_features_are_an_invalid_data_error_naming_the_set_and_ids(where):
    x = _data().tensors[0].clone()
    row = 3 if where == "forget" else 30
    x[row, 1] = float("nan")
    data = _data(x)
    with pytest.raises(InvalidDataError, match=rf"{where}_data: 1 sample\(s\) have NaN/inf features, ids \[{row}\]"):
        _fit(forget=Subset(data, range(8)), retain=Subset(data, range(8, 40)), selector=None, epochs=3)


def test_overlap_is_found_across_different_dataset_objects():
    data = _data()
    forget = TensorDataset(*data[0:8])  # ids 0..7 of a new object
    retain = TensorDataset(*data[8:40])  # ids 0..31 of another
    with pytest.raises(InvalidDataError, match="8 id\\(s\\) are in both forget_data and retain_data"):
        _fit(forget=forget, retain=retain)


@pytest.mark.parametrize("model", [None, "model", nn.Linear])
def test_model_must_be_a_module(model):
    with pytest.raises(InvalidConfigError, match="model must be a torch.nn.Module"):
        ErasusUnlearner(model)


def test_fit_enables_gradients_itself_under_no_grad():
    before = model_hash(_model())
    with torch.no_grad():
        result = _fit(selector=None, epochs=2)
    assert result.report.stopped == "completed" and result.report.steps == 2
    assert result.model_hash_after != before


@pytest.mark.parametrize("x, match", [
    (torch.randn(40, 4, dtype=torch.float64), "float64.*parameters are torch.float32"),
    (torch.randint(0, 5, (40, 4)), "int64.*parameters are torch.float32"),
    (torch.randn(40, 5), r"forget_data: the model cannot run.*\(2, 5\)"),
])
def test_features_of_the_wrong_dtype_or_width_are_named(x, match):
    data = _data(x)
    with pytest.raises(InvalidDataError, match=match):
        _fit(forget=Subset(data, range(8)), retain=Subset(data, range(8, 40)))


def test_retain_data_the_model_cannot_run_on_is_named():
    retain = _data(torch.randn(40, 5))
    with pytest.raises(InvalidDataError, match="retain_data: the model cannot run"):
        _fit(retain=Subset(retain, range(8, 40)))


def test_subset_indices_out_of_range_are_named():
    with pytest.raises(InvalidDataError, match=r"out of range for a dataset of 40 samples: \[99\]"):
        as_id_dataset(Subset(_data(), [1, 2, 99]))
    assert as_id_dataset(Subset(_data(), [-1])).ids.tolist() == [39], "negative indices count from the end, as Subset's"
    with pytest.raises(InvalidDataError, match="out of range"):
        _fit(forget=DataLoader(Subset(_data(), [0, -41])))


def test_unknown_strategy_and_selector_parameters_are_named():
    with pytest.raises(InvalidConfigError, match="strategy 'npo'.*'betaa'.*accepted parameters"):
        ErasusUnlearner(_model(), strategy="npo", betaa=1.0)
    with pytest.raises(InvalidConfigError, match="selector 'el2n'.*'foo'"):
        ErasusUnlearner(_model(), selector_kwargs={"foo": 1})
    with pytest.raises(InvalidConfigError, match="npo: beta"):
        get_strategy("npo", beta="0.1")
    with pytest.raises(InvalidConfigError, match="hyperparameters"):
        get_strategy(GradDiff(), alpha=1.0)


def test_valid_numpy_numbers_are_accepted():
    result = _fit(selector="random", k=np.int64(3), seed=np.int32(1), lr=np.float32(1e-3), batch_size=np.int64(4))
    assert len(result.coreset) == 3 and math.isfinite(result.timings["total"])


# ---- job configs (experiment.JobConfig, erasus-ray unlearn) and the ledger CLI ---------------------------------------
from erasus_ray.cli import main  # noqa: E402
from erasus_ray.experiment import JobConfig  # noqa: E402


@pytest.mark.parametrize("text, match", [
    (b"benchmark: [digits\n", "(?s)not valid YAML.*line 1"),
    (b"benchmark: !!python/object:os.system {}\n", "(?s)not valid YAML.*python/object"),
    (b"benchmark: digits\x00\n", "NUL byte"),
    (b"\xff\xfe", "not UTF-8"),
    (b"", "empty"),
    (b"null\n", "empty"),
    (b"~\n", "empty"),
    (b"- digits\n", "mapping"),
    (b"fraction: 0.1\nfraction: 0.5\n", "duplicate key 'fraction'"),
    (b"runner: {lr: 1, lr: 2}\n", "duplicate key 'lr'"),
    (b"1: x\n", "keys must be strings"),
])
def test_unreadable_job_files_are_named_and_exit_2(tmp_path, capsys, text, match):
    path = tmp_path / "job.yaml"
    path.write_bytes(text)
    with pytest.raises(InvalidConfigError, match=match):
        JobConfig.from_yaml(path)
    assert main(["unlearn", "--config", str(path), "--no-progress"]) == 2
    assert str(path) in capsys.readouterr().err


@pytest.mark.parametrize("cfg, match", [
    ({"benchmark": ["digits"]}, "benchmark"),
    ({"benchmark": None}, "benchmark"),
    ({"runner": 5}, "runner: must be a mapping"),
    ({"runner": None}, "runner: must be a mapping"),
    ({"runner": {"lr": "x"}}, r"runner\.lr"),
    ({"runner": {"batch_size": 2.5}}, r"runner\.batch_size"),
    ({"runner": {"max_steps": 0}}, r"runner\.max_steps"),
    ({"runner": {"gradient_checkpointing": "yes"}}, r"runner\.gradient_checkpointing"),
    ({"strategy": "npo", "strategy_params": {"betaa": 1}}, "strategy_params.*betaa"),
    ({"strategy": "npo", "strategy_params": {"beta": "x"}}, "strategy_params.*beta"),
    ({"strategy_params": [1]}, "strategy_params: must be a mapping"),
    ({"selector_params": {"foo": 1}}, "selector_params.*foo"),
    ({"fraction": "0.5"}, "fraction"),
    ({"fraction": True}, "fraction"),
    ({"k": 0}, "k must be"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**70}, "seed"),
    ({"scenario": "nope"}, "scenario"),
    ({"scenario": 3}, "scenario"),
    ({"strategy": 5}, "strategy"),
    ({"output": ["x"]}, "output"),
    ({"execution": {"num_workers": 0}}, "execution.num_workers"),
    ({"execution": {"use_gpu": "no"}}, "execution.use_gpu"),
])
def test_bad_job_values_are_named_before_any_work(cfg, match):
    with pytest.raises(InvalidConfigError, match=match):
        JobConfig.from_dict(cfg)


@pytest.mark.parametrize("content", [b"junk junk junk", b"", None])
def test_ledger_cli_on_a_file_that_is_not_a_ledger_exits_2(tmp_path, capsys, content):
    import sqlite3

    db = tmp_path / "junk.db"
    if content is None:  # a SQLite database of something else: refused, and no ledger tables get created in it
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE other (x)")
    else:
        db.write_bytes(content)
    before = db.read_bytes()
    assert main(["ledger", "--db", str(db), "list"]) == 2
    err = capsys.readouterr().err
    assert "--db" in err and str(db) in err and "Traceback" not in err
    assert db.read_bytes() == before, "a read command must not write into the file"
