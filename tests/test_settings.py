"""Typed settings (issue 23 item 5): the dataclass fields are the one spelling list of runner / execution settings,
the flat keywords (of ErasusUnlearner and UnlearningTrainer) and the YAML keys; each path reaches the runner with the same values; solver dataclasses change
what the influence solver does."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from erasus_ray import ErasusUnlearner, UnlearningModule, UnlearningTrainer
from erasus_ray.errors import InvalidConfigError
from erasus_ray.experiment import RUNNER_KEYS, JobConfig, run_job
from erasus_ray.module import NOT_TRAINER_SETTINGS, TRAINER_KEYWORDS
from erasus_ray.runners import LocalRunner, RunnerConfig
from erasus_ray.selectors import CGSettings, DenseSettings, InfluenceSelector, KFACSettings, LissaSettings
from erasus_ray.selectors._solver_settings import SOLVER_KEYWORDS, keyword_map
from erasus_ray.settings import FLAT_KEYWORDS, ExecutionConfig
from erasus_ray.tasks import ClassificationTask
from erasus_ray.tuning.config import SweepConfig

SETTINGS = {"lr": 0.05, "epochs": 2, "optimizer": "sgd", "batch_size": 4, "retain_batch_size": 8, "grad_clip": 0.5,
            "max_steps": 3, "progress": False}


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.arange(n) % 3)


class CheckpointedNet(nn.Module):
    """A classifier with a Hugging Face-style activation checkpointing switch that records its state."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 3)
        self.checkpointing = False

    def forward(self, x):
        return self.net(x)

    def gradient_checkpointing_enable(self, **kwargs):
        self.checkpointing = True

    def gradient_checkpointing_disable(self):
        self.checkpointing = False


class Captured(Exception):
    def __init__(self, config, checkpointing):
        super().__init__("captured")
        self.config, self.checkpointing = config, checkpointing


class SpyUnlearner(ErasusUnlearner):
    """Stops the run where the runner starts, with the RunnerConfig it got and whether checkpointing was on."""

    def make_runner(self, config):
        class Runner:
            def run(_, strategy, ctx):
                raise Captured(config, ctx.model.checkpointing)

        return Runner()


def _runner_sees(**kwargs):
    with pytest.raises(Captured) as got:
        data = _data()
        forget, retain = torch.utils.data.Subset(data, range(8)), torch.utils.data.Subset(data, range(8, 40))
        SpyUnlearner(CheckpointedNet(), selector=None, **kwargs).fit(forget, retain)
    return got.value


# ---------------------------------------------------------------------------------------------------------------------
# one spelling list
# ---------------------------------------------------------------------------------------------------------------------
def test_flat_keywords_yaml_keys_and_stage_keys_are_the_dataclass_fields():
    from erasus_ray.strategies._meta import STAGE_RUNNER_KEYS

    assert set(FLAT_KEYWORDS) == (_fields(RunnerConfig) | _fields(ExecutionConfig)) - {"seed"}
    assert RUNNER_KEYS == _fields(RunnerConfig) - {"seed", "progress"}
    assert set(STAGE_RUNNER_KEYS) == _fields(RunnerConfig) - {"seed", "progress", "gradient_checkpointing"}
    # every field (at its default) is accepted as a flat keyword and as a YAML key of its section
    for name in set(FLAT_KEYWORDS) - {"progress"}:
        section = FLAT_KEYWORDS[name]
        default = next(f.default for f in dataclasses.fields(RunnerConfig if section == "runner" else ExecutionConfig)
                       if f.name == name)
        JobConfig.from_dict({section: {name: default}})
        ErasusUnlearner(nn.Linear(4, 3), **{name: default})


def test_a_flat_keyword_and_its_dataclass_field_reach_the_runner_with_the_same_value(tmp_path):
    flat = _runner_sees(**SETTINGS).config
    mapping = _runner_sees(runner=dict(SETTINGS)).config
    dataclass_form = _runner_sees(runner=RunnerConfig(**SETTINGS)).config
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"benchmark": "digits", "strategy": "grad_diff", "selector": None,
                                    "runner": {k: v for k, v in SETTINGS.items() if k != "progress"}}))
    from_yaml = _run_job_sees(JobConfig.from_yaml(path)).config
    for config in (flat, mapping, dataclass_form, from_yaml):
        assert {k: getattr(config, k) for k in SETTINGS} == SETTINGS
    assert dataclasses.asdict(flat) == dataclasses.asdict(mapping) == dataclasses.asdict(dataclass_form) == dataclasses.asdict(from_yaml)


def _run_job_sees(cfg: JobConfig) -> Captured:
    """``run_job`` (the path of ``erasus-ray unlearn --config``) on a tiny stand-in benchmark, stopped at the runner."""
    from types import SimpleNamespace

    data = _data()
    bench = SimpleNamespace(original=CheckpointedNet(), task=ClassificationTask(), model_factory=None, recipe=None,
                            forget=torch.utils.data.Subset(data, range(8)), retain=torch.utils.data.Subset(data, range(8, 40)))
    with pytest.raises(Captured) as got:
        run_job(cfg, bench=bench, gold_metrics={}, progress=False, unlearner_cls=SpyUnlearner)
    return got.value


def test_gradient_checkpointing_is_the_same_setting_in_every_path(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("benchmark: digits\nselector: null\nrunner: {epochs: 1, gradient_checkpointing: true}\n")
    seen = [
        _runner_sees(epochs=1, gradient_checkpointing=True, progress=False),
        _runner_sees(runner=RunnerConfig(epochs=1, gradient_checkpointing=True, progress=False)),
        _run_job_sees(JobConfig.from_yaml(path)),
    ]
    assert all(s.checkpointing and s.config.gradient_checkpointing for s in seen)
    assert not _runner_sees(epochs=1, progress=False).checkpointing
    # a model without the switch is refused the same way whichever path asked for it
    for kwargs in ({"gradient_checkpointing": True}, {"runner": RunnerConfig(gradient_checkpointing=True)},
                   {"runner": {"gradient_checkpointing": True}}):
        with pytest.raises(InvalidConfigError, match="gradient_checkpointing=True needs"):
            ErasusUnlearner(nn.Linear(4, 3), **kwargs)


def test_execution_settings_flat_and_dataclass_agree():
    flat = ErasusUnlearner(nn.Linear(4, 3), backend="local", num_workers=3, max_failures=2, distributed="none", device="cpu")
    typed = ErasusUnlearner(nn.Linear(4, 3), execution=ExecutionConfig(num_workers=3, max_failures=2, device="cpu"))
    assert flat.execution == typed.execution and flat.distributed is None and flat.train_scaling["num_workers"] == 3


# ---------------------------------------------------------------------------------------------------------------------
# named errors
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"lrr": 0.1}, r"unknown keyword\(s\) \['lrr'\]. Did you mean 'lr'\?.*accepted parameters"),
    ({"epoch": 2}, "Did you mean 'epochs'"),
    ({"lr": "0.1"}, r"runner\.lr must be float"),
    ({"gradient_checkpointing": "yes"}, r"runner\.gradient_checkpointing must be bool"),
    ({"backend": "spark"}, r"execution\.backend must be one of \['local', 'ray_train'\]"),
    ({"num_workers": 0}, r"execution\.num_workers must be an integer >= 1"),
    ({"device": "gpu7"}, "device must name a torch device"),
    ({"runner": {"lr": 0.1}, "lr": 0.2}, r"\['lr'\] given both"),
    ({"runner": RunnerConfig(), "epochs": 2}, r"\['epochs'\] given both"),
    ({"runner": {"seed": 3}}, "seed= argument"),
    ({"runner": 5}, "runner: must be a mapping or a RunnerConfig"),
])
def test_bad_settings_give_named_errors(kwargs, match):
    with pytest.raises(InvalidConfigError, match=match):
        ErasusUnlearner(nn.Linear(4, 3), **kwargs)


def test_runner_config_checks_itself_on_construction():
    with pytest.raises(InvalidConfigError, match="batch_size must be int"):
        RunnerConfig(batch_size="8")
    with pytest.raises(InvalidConfigError, match="lr must be a finite number"):
        RunnerConfig(lr=0)


@pytest.mark.parametrize("text, match", [
    ("runner: {lrr: 0.1}\n", r"config .*job\.yaml: runner: unknown key\(s\) \['lrr'\]. Did you mean 'lr'\?"),
    ("fractoin: 0.1\n", r"job\.yaml: config: unknown key\(s\) \['fractoin'\]. Did you mean 'fraction'\?"),
    ("runner: {batch_size: '8'}\n", r"job\.yaml: runner\.batch_size must be int, got '8'"),
    ("execution: {use_gpu: 1}\n", r"job\.yaml: execution\.use_gpu must be bool, got 1"),
    ("runner: {seed: 1}\n", "seed is the job's top-level seed"),
])
def test_job_yaml_errors_name_the_key_the_type_and_the_file(tmp_path, text, match):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(InvalidConfigError, match=match):
        JobConfig.from_yaml(path)


def test_sweep_yaml_uses_the_same_loader_and_runner_section(tmp_path):
    from pathlib import Path

    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "tune_configs" / "ci_digits.yaml").read_text())
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**base, "runner": {"gradient_checkpointing": "no"}}))
    with pytest.raises(InvalidConfigError, match=r"sweep config .*sweep\.yaml: runner\.gradient_checkpointing must be bool"):
        SweepConfig.from_yaml(path)
    path.write_text(yaml.safe_dump({**base, "num_sampels": 3}))
    with pytest.raises(InvalidConfigError, match=r"sweep\.yaml: .*\['num_sampels'\]. Did you mean 'num_samples'\?"):
        SweepConfig.from_yaml(path)
    path.write_text(yaml.safe_dump({**base, "runner": {"epochs": 3}}))
    with pytest.raises(InvalidConfigError, match="epochs are searched"):
        SweepConfig.from_yaml(path)


# ---------------------------------------------------------------------------------------------------------------------
# influence solver settings
# ---------------------------------------------------------------------------------------------------------------------
def test_solver_keyword_defaults_are_the_dataclass_defaults():
    import inspect

    params = inspect.signature(InfluenceSelector).parameters
    assert set(SOLVER_KEYWORDS) <= set(params)
    assert {kw: params[kw].default for kw in SOLVER_KEYWORDS} == SOLVER_KEYWORDS
    assert keyword_map(CGSettings) == {"max_iter": "cg_iters", "tol": "cg_tol"}


def _influence(**kwargs):
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()  # convex loss: H + damping is positive definite, as CG needs
    data = TensorDataset(torch.randn(40, 4, dtype=torch.float64), torch.arange(40) % 3)
    forget, retain = torch.utils.data.Subset(data, range(8)), torch.utils.data.Subset(data, range(8, 40))
    sel = InfluenceSelector(scope="all", target="forget", damping=0.1, hessian_samples=None, **kwargs)
    core = sel.select(model, forget, task=ClassificationTask(), k=3, seed=0, retain=retain)
    return np.array([core.scores[i] for i in range(8)]), core.info


def test_cg_settings_change_what_the_solver_does_and_match_the_flat_keywords():
    one, info_one = _influence(solver=CGSettings(max_iter=1))
    many, info_many = _influence(solver=CGSettings(max_iter=50, tol=1e-12))
    assert info_one["ihvp"] == info_many["ihvp"] == "cg"
    assert info_one["cg_iters"] == 1 < info_many["cg_iters"]
    assert info_one["cg_max_rel_residual"] > 100 * info_many["cg_max_rel_residual"]
    assert not np.allclose(one, many)
    flat, _ = _influence(ihvp="cg", cg_iters=1)
    np.testing.assert_array_equal(flat, one)


@pytest.mark.parametrize("solver, attrs", [
    (DenseSettings(curvature="ggn", max_params=100), {"ihvp": "ggn", "max_exact_params": 100}),
    (LissaSettings(depth=7, repeat=2, scale=5.0, tol=1e-3), {"ihvp": "lissa", "lissa_depth": 7, "lissa_repeat": 2,
                                                           "lissa_scale": 5.0, "cg_tol": 1e-3}),
    (KFACSettings(correction=False, cg_iters=0, fisher="mc"), {"ihvp": "kfac", "kfac_correction": False,
                                                             "kfac_cg_iters": 0, "fisher": "mc"}),
])
def test_each_solver_dataclass_sets_the_selector_knobs(solver, attrs):
    sel = InfluenceSelector(solver=solver)
    assert {k: getattr(sel, k) for k in attrs} == attrs


@pytest.mark.parametrize("make, match", [
    (lambda: CGSettings(max_iter=0), "max_iter must be an integer >= 1"),
    (lambda: LissaSettings(depth="deep"), "depth must be int or one of"),
    (lambda: KFACSettings(fisher="true"), "fisher must be one of"),
    (lambda: InfluenceSelector(cg_iters=0), r"cg_iters: CGSettings\.max_iter"),
    (lambda: InfluenceSelector(solver=CGSettings(), cg_iters=5), r"\['cg_iters'\] given both"),
    (lambda: InfluenceSelector(solver=CGSettings(), ihvp="lissa"), "contradicts solver=CGSettings"),
])
def test_bad_solver_settings_are_named(make, match):
    with pytest.raises(InvalidConfigError, match=match):
        make()


# ---------------------------------------------------------------------------------------------------------------------
# UnlearningTrainer: the same spelling list as ErasusUnlearner
# ---------------------------------------------------------------------------------------------------------------------
class Ascent(UnlearningModule):
    """Gradient ascent on the forget batch; records each forget batch's size and whether checkpointing was on."""

    def __init__(self, model):
        super().__init__(model)
        self.batch_sizes: list[int] = []
        self.checkpointing: list[bool] = []

    def forget_step(self, batch, batch_idx):
        self.batch_sizes.append(len(batch))
        self.checkpointing.append(getattr(self.model, "checkpointing", False))
        return -self.sample_loss(batch).mean()


def _trainer_fit(trainer, model=None):
    data = _data()
    module = Ascent(model if model is not None else CheckpointedNet())
    res = trainer.fit(module, torch.utils.data.Subset(data, range(12)), torch.utils.data.Subset(data, range(12, 40)))
    return module, res


def test_the_trainers_keywords_are_the_unlearners_from_the_same_fields():
    assert set(TRAINER_KEYWORDS) | set(NOT_TRAINER_SETTINGS) == set(FLAT_KEYWORDS)
    assert all(FLAT_KEYWORDS[k] == section for k, section in TRAINER_KEYWORDS.items())
    assert not set(TRAINER_KEYWORDS) & set(NOT_TRAINER_SETTINGS)
    # the trainer spells no setting itself: epochs is its one positional settings parameter, the rest is **settings
    params = set(inspect.signature(UnlearningTrainer).parameters)
    assert params & set(FLAT_KEYWORDS) == {"epochs"}
    for name in TRAINER_KEYWORDS:  # every field at its default is a trainer keyword and a runner= / execution= key
        section = FLAT_KEYWORDS[name]
        default = next(f.default for f in dataclasses.fields(RunnerConfig if section == "runner" else ExecutionConfig)
                       if f.name == name)
        assert getattr(UnlearningTrainer(**{name: default}), "config" if section == "runner" else "execution") is not None
        UnlearningTrainer(**{section: {name: default}})
    for name, where in NOT_TRAINER_SETTINGS.items():  # the others are refused with where they are set instead
        with pytest.raises(InvalidConfigError, match=rf"\['{name}'\] are not the trainer's; {name} is"):
            UnlearningTrainer(**{name: "x"})


class SpyRunner(LocalRunner):
    seen: list[RunnerConfig] = []

    def __init__(self, config):
        super().__init__(config)
        SpyRunner.seen.append(config)


TRAINER_SETTINGS = {"epochs": 3, "batch_size": 4, "max_steps": 5, "grad_clip": 0.5, "retain_batch_size": 8, "progress": False}


@pytest.mark.parametrize("form", ["flat", "mapping", "dataclass"])
def test_a_trainer_keyword_reaches_its_runner_with_the_value(form, monkeypatch):
    import erasus_ray.module as module_mod

    monkeypatch.setattr(module_mod, "LocalRunner", SpyRunner)
    SpyRunner.seen = []
    kwargs = {"flat": dict(TRAINER_SETTINGS), "mapping": {"runner": dict(TRAINER_SETTINGS)},
              "dataclass": {"runner": RunnerConfig(**TRAINER_SETTINGS)}}[form]
    module, res = _trainer_fit(UnlearningTrainer(validate_every=None, **kwargs))
    loop = {k: v for k, v in TRAINER_SETTINGS.items() if k != "epochs"}  # the per-epoch runners count their own epochs
    assert SpyRunner.seen[0].epochs == 3 and all({k: getattr(c, k) for k in loop} == loop for c in SpyRunner.seen)
    assert module.batch_sizes == [4, 4, 4, 4, 4] and res.report.steps == 5  # 12 forget ids, batches of 4, capped at 5 steps
    assert res.to_dict()["config"]["runner"]["grad_clip"] == 0.5


def test_trainer_gradient_checkpointing_and_device_are_settings():
    model = CheckpointedNet()
    module, _ = _trainer_fit(UnlearningTrainer(1, validate_every=None, gradient_checkpointing=True, device="cpu"), model)
    assert module.checkpointing == [True] and not model.checkpointing  # on while it ran, off again after
    module, _ = _trainer_fit(UnlearningTrainer(1, validate_every=None, execution={"device": "cpu"}))
    assert module.checkpointing == [False]
    with pytest.raises(InvalidConfigError, match="gradient_checkpointing=True needs"):
        _trainer_fit(UnlearningTrainer(1, gradient_checkpointing=True), nn.Linear(4, 3))


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_sise": 4}, r"UnlearningTrainer: unknown keyword\(s\) \['batch_sise'\]. Did you mean 'batch_size'\?.*Accepted: \[.*'grad_clip'"),
    ({"epoch": 4}, "Did you mean 'epochs'"),
    ({"lr": 0.1}, r"\['lr'\] are not the trainer's; lr is the module's: configure_optimizers"),
    ({"runner": {"optimizer": "sgd"}}, r"\['optimizer'\] are not the trainer's"),
    ({"runner": RunnerConfig(lr=0.5)}, r"\['lr'\] are not the trainer's"),
    ({"execution": ExecutionConfig(backend="ray_train")}, r"\['backend'\] are not the trainer's; backend is ErasusUnlearner's"),
    ({"runner": {"batch_size": 4}, "batch_size": 8}, r"\['batch_size'\] given both"),
    ({"epochs": 2, "runner": RunnerConfig()}, r"\['epochs'\] given both"),
    ({"runner": {"seed": 1}}, "UnlearningTrainer's seed= argument"),
    ({"grad_clip": "big"}, r"runner\.grad_clip must be float"),
    ({"device": "gpu7"}, "device must name a torch device"),
])
def test_bad_trainer_settings_give_named_errors(kwargs, match):
    with pytest.raises(InvalidConfigError, match=match):
        UnlearningTrainer(**kwargs)
