"""Meta strategies (auto, pipeline, ensemble), the user-extensible trainer, and hyperparameter range checks."""

from __future__ import annotations

import copy
import inspect
import math

import numpy as np
import pytest
import torch

from erasus_ray import Callback, ErasusUnlearner, StrategyPipeline, UnlearningModule, UnlearningTrainer
from erasus_ray.data import make_loader
from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.strategies import STRATEGIES, Strategy
from erasus_ray.strategies.auto import Auto, choose
from erasus_ray.strategies.ensemble import Ensemble, average_states
from erasus_ray.tasks import Capability, CapabilityError, CausalLMTask, ClassificationTask
from erasus_ray.utils import model_hash

#: What the auto rule reads of a task: its declared capabilities.
CLS, LM, LOSS_ONLY = ClassificationTask.capabilities, CausalLMTask.capabilities, {"loss"}


def _run(model, strategy, forget, retain, **kw):
    kw.setdefault("progress", False)
    return ErasusUnlearner(model, strategy=strategy, selector=None, fraction=None, seed=0, **kw).fit(
        forget_data=forget, retain_data=retain
    )


@torch.no_grad()
def _acc(model, task, ds):
    batch = next(iter(make_loader(ds, task.collate, batch_size=len(ds))))
    return float(task.forward(model, batch.data).sample_accuracy().mean())


@torch.no_grad()
def _loss(model, task, ds):
    batch = next(iter(make_loader(ds, task.collate, batch_size=len(ds))))
    return float(task.forward(model, batch.data).sample_loss().mean())


# --- auto -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "task, n_forget, n_retain, kw, strategy, rule",
    [
        (CLS, 100, 0, {}, "gradient_ascent", "no_retain"),
        (LM, 100, 0, {}, "gradient_ascent", "no_retain"),
        (CLS, 100, 80, {"can_retrain": True}, "retrain", "small_retain"),
        (CLS, 100, 80, {"can_retrain": False}, "grad_diff", "classifier"),  # no recipe: cannot retrain
        (CLS, 100, 500, {"can_retrain": True}, "grad_diff", "classifier"),  # retain too big to retrain
        (CLS, 100, 500, {"can_retrain": True, "retrain_ratio": 10.0}, "retrain", "small_retain"),
        (CLS, 100, 500, {"budget": "exact"}, "retrain", "exact"),
        (LM, 8, 24, {}, "npo", "lm"),
        (LOSS_ONLY, 8, 24, {}, "grad_diff", "other_task"),
    ],
)
def test_auto_rule_branches(task, n_forget, n_retain, kw, strategy, rule):
    choice = choose(task, n_forget, n_retain, **kw)
    assert (choice.strategy, choice.rule) == (strategy, rule)
    assert choice.reason
    STRATEGIES.create(choice.strategy, **choice.params)  # the chosen hyperparameters are valid


def test_auto_budget_scales_epochs_or_caps_steps():
    assert choose(CLS, 10, 100, budget="low").runner == {"epochs": 5}  # grad_diff default 20 / 4
    assert choose(CLS, 10, 100, budget="high").runner == {"epochs": 40}
    assert choose(CLS, 10, 100).runner == {}
    assert choose(LM, 10, 100, budget=7).runner == {"max_steps": 7}
    with pytest.raises(InvalidConfigError, match="budget"):
        choose(CLS, 10, 0, budget="exact")
    with pytest.raises(InvalidConfigError, match="budget"):
        Auto(budget="cheap")
    with pytest.raises(InvalidConfigError, match="budget"):
        Auto(budget=0)


def test_auto_runs_its_choice_bit_for_bit_and_reports_it(digits_class):
    b = digits_class
    auto = _run(b.original, "auto", b.forget, b.retain, model_factory=b.model_factory, recipe=b.recipe)
    # auto runs its choice with the chosen strategy's default epochs (a meta strategy is not closed-loop): the same
    # open-loop run as naming grad_diff with its 20 default epochs
    named = _run(b.original, "grad_diff", b.forget, b.retain, epochs=20)
    assert auto.report.choice["strategy"] == "grad_diff" and auto.report.choice["rule"] == "classifier"
    assert model_hash(auto.model) == model_hash(named.model)
    assert auto.report.steps == named.report.steps and auto.report.stages[0]["runner"]["epochs"] == 20
    assert "choice" in auto.to_dict()["report"]
    # budget "low" runs a quarter of the epochs; an explicit epochs on the unlearner wins over the budget
    low = _run(b.original, Auto(budget="low"), b.forget, b.retain)
    assert low.report.stages[0]["runner"]["epochs"] == 5 and low.report.steps == named.report.steps // 4
    explicit = _run(b.original, Auto(budget="low"), b.forget, b.retain, epochs=3)
    assert explicit.report.stages[0]["runner"]["epochs"] == 3 and "overridden" in explicit.report.choice["reason"]


def test_auto_without_retain_uses_gradient_ascent(digits_class):
    b = digits_class
    auto = _run(b.original, "auto", b.forget, None)
    named = _run(b.original, "gradient_ascent", b.forget, None)
    assert auto.report.choice["rule"] == "no_retain"
    assert model_hash(auto.model) == model_hash(named.model)


# --- pipeline ---------------------------------------------------------------------------------------------------
def test_pipeline_equals_stages_run_by_hand(digits_class):
    b = digits_class
    stages = [("neggrad_plus", {"beta": 0.5, "lr": 2e-3, "epochs": 2}), ("fine_tune", {"lr": 5e-4, "epochs": 3, "batch_size": 16})]
    piped = _run(b.original, StrategyPipeline(stages), b.forget, b.retain)
    first = _run(b.original, "neggrad_plus", b.forget, b.retain, beta=0.5, lr=2e-3, epochs=2)
    by_hand = _run(first.model, "fine_tune", b.forget, b.retain, lr=5e-4, epochs=3, batch_size=16)
    assert model_hash(piped.model) == model_hash(by_hand.model)
    assert model_hash(piped.model) != model_hash(first.model)
    # every kwarg reached its stage: strategy hyperparameters and runner settings
    s0, s1 = piped.report.stages
    assert (s0["strategy"], s0["runner"]["lr"], s0["runner"]["epochs"]) == ("neggrad_plus", 2e-3, 2)
    assert (s1["strategy"], s1["runner"]["lr"], s1["runner"]["epochs"], s1["runner"]["batch_size"]) == ("fine_tune", 5e-4, 3, 16)
    assert piped.config["strategy_params"]["stages"][0]["params"]["beta"] == 0.5
    # the combined report sums the stages and keeps their logs
    assert piped.report.steps == first.report.steps + by_hand.report.steps
    assert piped.report.retain_samples == first.report.retain_samples + by_hand.report.retain_samples
    assert len(piped.report.history) == 2 + 3 and [h["stage"] for h in piped.report.history] == [0, 0, 1, 1, 1]
    assert piped.report.seconds == pytest.approx(s0["seconds"] + s1["seconds"])


def test_pipeline_takes_instances_and_the_callers_settings(digits_class):
    from erasus_ray.strategies import FineTune, GradDiff

    b = digits_class
    pipe = StrategyPipeline([(GradDiff(alpha=0.5), {"epochs": 1}), FineTune()])
    res = _run(b.original, pipe, b.forget, b.retain, lr=3e-4)
    s0, s1 = res.report.stages
    assert s0["runner"]["lr"] == 3e-4 and s0["runner"]["epochs"] == 1  # caller's lr, stage's epochs
    assert s1["runner"]["lr"] == 3e-4 and s1["runner"]["epochs"] == FineTune.default_epochs
    # without caller settings a stage falls back to its strategy's defaults
    res = _run(b.original, StrategyPipeline([(GradDiff(), {"epochs": 1})]), b.forget, b.retain)
    assert res.report.stages[0]["runner"]["lr"] == GradDiff.default_lr


def test_pipeline_default_forgets_and_repairs(digits_class):
    b = digits_class
    res = _run(b.original, "pipeline", b.forget, b.retain)
    assert _acc(res.model, b.task, b.forget) <= 0.02  # gold: 0.00
    assert _acc(res.model, b.task, b.retain) >= 0.98  # gold: 0.998
    assert res.report.stages[0]["stopped"].startswith("forget_target reached")


def test_pipeline_default_does_not_collapse_on_random_forgetting(digits_random10):
    """On a random 10% the stop is never reached; the capped ascent must still leave a usable model."""
    b = digits_random10
    res = _run(b.original, "pipeline", b.forget, b.retain)
    assert _acc(res.model, b.task, b.retain) >= 0.95  # gold 0.998; uncapped ascent collapsed to 0.10
    assert _acc(res.model, b.task, b.forget) < _acc(b.original, b.task, b.forget)


def test_pipeline_and_ensemble_bad_stages():
    with pytest.raises(InvalidConfigError, match="at least one"):
        StrategyPipeline([])
    with pytest.raises(InvalidConfigError, match="stage 'fine_tune'.*lr"):
        StrategyPipeline([("fine_tune", {"lr": -1.0})])
    with pytest.raises(InvalidConfigError, match="unknown hyperparameters"):
        StrategyPipeline([("grad_diff", {"gama": 1.0})])
    with pytest.raises(InvalidConfigError, match="a stage is"):
        StrategyPipeline([("grad_diff", 1.0, 2.0)])
    with pytest.raises(InvalidConfigError, match="mode"):
        Ensemble(mode="vote")
    with pytest.raises(InvalidConfigError, match="weights"):
        Ensemble(members=["grad_diff", "npo"], weights=[1.0])


# --- ensemble ---------------------------------------------------------------------------------------------------
def test_ensemble_average_is_the_mean_of_the_members(digits_class):
    b = digits_class
    members = [("grad_diff", {"epochs": 2}), ("npo", {"epochs": 2, "beta": 0.2})]
    ens = _run(b.original, Ensemble(members=members, weights=[1.0, 3.0]), b.forget, b.retain)
    m1 = _run(b.original, "grad_diff", b.forget, b.retain, epochs=2).model.state_dict()
    m2 = _run(b.original, "npo", b.forget, b.retain, epochs=2, beta=0.2).model.state_dict()
    got = ens.model.state_dict()
    for key in m1:
        assert torch.allclose(got[key], 0.25 * m1[key] + 0.75 * m2[key], atol=1e-6), key
    assert ens.report.steps == 2 * 2 * int(np.ceil(len(b.forget) / 32))
    assert ens.report.choice == {"mode": "average", "weights": [1.0, 3.0]}
    # the helper itself on a hand example
    avg = average_states([{"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(5)}, {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor(9)}], [1, 1])
    assert avg["w"].tolist() == [2.0, 4.0] and int(avg["n"]) == 5


def test_ensemble_select_keeps_the_best_member(digits_class):
    b = digits_class
    members = [("fine_tune", {"epochs": 1}), ("grad_diff", {"epochs": 3})]
    ens = _run(b.original, Ensemble(members=members, mode="select"), b.forget, b.retain)
    gd = _run(b.original, "grad_diff", b.forget, b.retain, epochs=3)
    # fine-tuning alone keeps the forget class (retain - forget ~ 0); grad_diff forgets it (~ 1)
    assert ens.report.choice["selected_strategy"] == "grad_diff"
    assert model_hash(ens.model) == model_hash(gd.model)
    scores = ens.report.choice["scores"]
    assert scores["1:grad_diff"] > scores["0:fine_tune"] + 0.5
    # a callable metric that prefers the first member
    first = _run(b.original, Ensemble(members=members, mode="select", metric=lambda m, ctx: -_loss(m, b.task, b.retain)), b.forget, b.retain)
    assert first.report.choice["selected_strategy"] == "fine_tune"


def test_ensemble_refuses_members_that_wrap_the_model(digits_class):
    b = digits_class
    if "dexperts" not in STRATEGIES:
        pytest.skip("no inference-time strategy registered")
    with pytest.raises(InvalidConfigError, match="'dexperts'.*wrapper"):
        _run(b.original, Ensemble(members=[("grad_diff", {"epochs": 1}), ("dexperts", {"epochs": 1})]), b.forget, b.retain)


# --- UnlearningModule / UnlearningTrainer -----------------------------------------------------------------------
class AscentModule(UnlearningModule):
    """Gradient ascent on the forget batch, descent on the retain batch (grad_diff written by a user)."""

    def __init__(self, model, lr=1e-3, with_retain=True):
        super().__init__(model)
        self.save_hyperparameters(ignore=["model"])
        self.seen_ids: list[int] = []

    def forget_step(self, batch, batch_idx):
        self.seen_ids.extend(batch.ids.tolist())
        x, y = batch.data
        loss = torch.nn.functional.cross_entropy(self.model(x), y).clamp(max=float(np.log(10)))
        self.log("forget_loss", loss)
        return -loss

    def retain_step(self, batch, batch_idx):
        return self.sample_loss(batch).mean()


def test_module_gradient_ascent_lowers_forget_fit_keeps_retain(digits_class):
    b = digits_class
    model = copy.deepcopy(b.original)
    module = AscentModule(model, lr=1e-3)
    assert module.hparams == {"lr": 1e-3, "with_retain": True}
    before_f, before_r = _acc(model, b.task, b.forget), _acc(model, b.task, b.retain)
    res = UnlearningTrainer(epochs=10, validate_every=5).fit(module, b.forget, b.retain)
    assert before_f == 1.0 and _acc(model, b.task, b.forget) <= 0.05
    assert _acc(model, b.task, b.retain) >= before_r - 0.02
    assert res.history[4]["val_forget_acc"] <= 0.05 and "val_forget_acc" not in res.history[3]  # validates every 5 epochs
    assert "forget_loss" in res.history[0] and res.report.steps == 10 * int(np.ceil(len(b.forget) / 32))
    assert res.model_hash_before != res.model_hash_after and res.to_dict()["history"]


def test_trainer_iterates_exactly_the_coreset(digits_class):
    b = digits_class
    module = AscentModule(copy.deepcopy(b.original))
    res = UnlearningTrainer(epochs=1, validate_every=None, selector="random", fraction=0.3, seed=1).fit(module, b.forget, b.retain)
    assert len(res.coreset.ids) == int(np.ceil(0.3 * len(b.forget)))
    assert sorted(module.seen_ids) == sorted(res.coreset.ids.tolist())  # each coreset id once per epoch, nothing else


class ScriptedModule(UnlearningModule):
    """A module whose validation metric follows a script (one value per validation)."""

    def __init__(self, model, script):
        super().__init__(model)
        self.script = list(script)
        self.validations = 0

    def forget_step(self, batch, batch_idx):
        return 0.0 * self.sample_loss(batch).mean()

    def validation_step(self, batch, batch_idx):
        value = self.script[self.validations]
        self.validations += 1
        return {"score": value}


@pytest.mark.parametrize(
    "script, every, patience, mode, stop_epoch, best_epoch",
    [
        ([5, 4, 3, 3.5, 3.2, 3.1, 1, 1], 1, 3, "min", 6, 3),  # 3 validations without a new minimum after epoch 3
        ([5, 4, 3, 3.5, 3.2, 2.0, 2.5, 2.6, 2.7, 9], 1, 3, "min", 9, 6),
        ([1, 2, 2, 2, 9], 2, 2, "max", 8, 4),  # validations at epochs 2, 4, 6, 8 -> 1, 2, 2 (no gain), 2 (no gain)
        (list(range(10)), 1, 3, "max", None, 10),  # keeps improving: runs all epochs
    ],
)
def test_early_stopping_stops_at_the_right_epoch(digits_class, script, every, patience, mode, stop_epoch, best_epoch):
    b = digits_class
    module = ScriptedModule(copy.deepcopy(b.original), script)
    trainer = UnlearningTrainer(epochs=10, validate_every=every, early_stopping_patience=patience, monitor="score", mode=mode)
    # one validation batch per validation: val_data of 4 samples, batch size 32
    res = trainer.fit(module, b.forget, b.retain, val_data=b.forget.subset(b.forget.ids[:4]))
    if stop_epoch is None:
        assert res.report.stopped == "completed" and res.report.epochs == 10
    else:
        assert res.report.epochs == stop_epoch and res.report.stopped.startswith(f"early stopping at epoch {stop_epoch}")
    assert res.best["epoch"] == best_epoch


class Recorder(Callback):
    def __init__(self, log, tag=""):
        self.log, self.tag = log, tag

    def on_fit_start(self, trainer, module):
        self.log.append(("fit_start" + self.tag,))

    def on_epoch_start(self, trainer, module, epoch):
        self.log.append(("epoch_start" + self.tag, epoch))

    def on_step_end(self, trainer, module, step, logs):
        self.log.append(("step_end" + self.tag, step))

    def on_validation_end(self, trainer, module, metrics):
        self.log.append(("validation_end" + self.tag, trainer.current_epoch, round(metrics["val_forget_acc"], 6) >= 0))

    def on_epoch_end(self, trainer, module, epoch, logs):
        self.log.append(("epoch_end" + self.tag, epoch))

    def on_fit_end(self, trainer, module, result):
        self.log.append(("fit_end" + self.tag, result.report.epochs))


def test_callbacks_fire_in_the_documented_order(digits_class):
    b = digits_class
    forget = b.forget.subset(b.forget.ids[:40])  # 2 steps per epoch at batch size 32
    log: list[tuple] = []
    trainer = UnlearningTrainer(epochs=2, validate_every=2, callbacks=[Recorder(log), Recorder(log, "'")])
    trainer.fit(AscentModule(copy.deepcopy(b.original)), forget, b.retain)
    expected = [("fit_start",), ("fit_start'",)]
    step = 0
    for epoch in (1, 2):
        expected += [("epoch_start", epoch), ("epoch_start'", epoch)]
        for _ in range(2):
            step += 1
            expected += [("step_end", step), ("step_end'", step)]
        if epoch == 2:
            expected += [("validation_end", 2, True), ("validation_end'", 2, True)]
        expected += [("epoch_end", epoch), ("epoch_end'", epoch)]
    expected += [("fit_end", 2), ("fit_end'", 2)]
    assert log == expected


class LogsItsOwnForgetLoss(UnlearningModule):
    """The seed README's module: logs its own ``forget_loss`` (the ascent objective, here a fixed marker value)."""

    def forget_step(self, batch, batch_idx):
        self.log("forget_loss", 123.0)
        return -self.sample_loss(batch).mean()


def test_validation_metrics_do_not_overwrite_what_the_module_logs():
    """Issue 19: on validation epochs the trainer's own forget loss used to replace the module's ``forget_loss``."""
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(40, 4, generator=g), torch.arange(40) % 3)
    forget, retain = torch.utils.data.Subset(data, range(10)), torch.utils.data.Subset(data, range(10, 40))
    res = UnlearningTrainer(epochs=2, validate_every=1, early_stopping_patience=5).fit(
        LogsItsOwnForgetLoss(torch.nn.Linear(4, 3)), forget, retain)
    for entry in res.history:  # every epoch validated: the module's value and the trainer's, side by side
        assert entry["forget_loss"] == 123.0
        assert 0 < entry["val_forget_loss"] < 10 and {"val_forget_acc", "val_retain_acc", "val_retain_loss"} <= set(entry)
    assert res.best["value"] == min(e["val_forget_acc"] for e in res.history)  # default monitor: val_forget_acc
    # the built-in metrics' former names still work as monitor
    old = UnlearningTrainer(epochs=2, validate_every=1, early_stopping_patience=5, monitor="forget_loss", mode="max").fit(
        LogsItsOwnForgetLoss(torch.nn.Linear(4, 3)), forget, retain)
    assert old.best["value"] == max(e["val_forget_loss"] for e in old.history) != 123.0


def test_callback_can_stop_and_bad_trainer_input(digits_class):
    b = digits_class

    class StopAfterOne(Callback):
        def on_epoch_end(self, trainer, module, epoch, logs):
            trainer.should_stop = True

    res = UnlearningTrainer(epochs=5, validate_every=None, callbacks=[StopAfterOne()]).fit(
        AscentModule(copy.deepcopy(b.original)), b.forget, b.retain)
    assert res.report.epochs == 1 and "callback" in res.report.stopped
    with pytest.raises(InvalidConfigError, match="early_stopping_patience"):
        UnlearningTrainer(early_stopping_patience=0)
    with pytest.raises(InvalidConfigError, match="validate_every"):
        UnlearningTrainer(early_stopping_patience=2, validate_every=None)
    with pytest.raises(InvalidConfigError, match="mode"):
        UnlearningTrainer(mode="up")
    with pytest.raises(InvalidDataError, match="retain_step"):
        UnlearningTrainer(epochs=1).fit(AscentModule(copy.deepcopy(b.original)), b.forget)
    with pytest.raises(InvalidConfigError, match="monitor 'nope'"):
        UnlearningTrainer(epochs=1, early_stopping_patience=1, monitor="nope").fit(
            AscentModule(copy.deepcopy(b.original)), b.forget, b.retain)


# --- hyperparameter ranges and task checks ----------------------------------------------------------------------
def _positive_numeric_hparams():
    cases = []
    for name in STRATEGIES.names():
        for p in inspect.signature(STRATEGIES.get(name).__init__).parameters.values():
            d = p.default
            if isinstance(d, bool) or not isinstance(d, (int, float)) or d <= 0:
                continue
            cases.append(pytest.param(name, p.name, -1 if isinstance(d, int) else -(abs(d) + 1.0), id=f"{name}-{p.name}"))
    return cases


@pytest.mark.parametrize("name, hparam, bad", _positive_numeric_hparams())
def test_negative_hyperparameters_are_refused(name, hparam, bad):
    """Every positive numeric constructor default of every registered strategy refuses a negative value, by name."""
    with pytest.raises(InvalidConfigError) as err:
        STRATEGIES.create(name, **{hparam: bad})
    assert hparam in str(err.value)


def _declared_upper_bounds():
    """``(strategy, argument, high, default)`` for every range a strategy's constructor declares through
    :meth:`Strategy.check_range` (recorded while constructing it with its defaults) with a finite upper bound."""
    from unittest import mock

    cases = []
    for name in STRATEGIES.names():
        cls = STRATEGIES.get(name)
        params = inspect.signature(cls.__init__).parameters
        seen: list[tuple[str, float]] = []
        real = Strategy.check_range

        def spy(self, arg, value, low, high, **kw):
            if type(self) is cls:  # not an inner objective's own ranges
                seen.append((arg, high))
            return real(self, arg, value, low, high, **kw)

        with mock.patch.object(Strategy, "check_range", spy):
            cls()
        for arg, high in dict(seen).items():
            if arg in params and math.isfinite(high):
                default = params[arg].default
                cases.append(pytest.param(name, arg, high, default, id=f"{name}-{arg}"))
    return cases


UPPER_BOUNDS = _declared_upper_bounds()


def test_upper_bounds_are_discovered():
    found = {(c.values[0], c.values[1]) for c in UPPER_BOUNDS}
    # the ranges that are fractions or probabilities, among the many sanity caps
    for case in [("saliency_unlearning", "gamma"), ("neggrad_plus", "beta"), ("sparse_aware", "sparsity"),
                 ("token_masking", "token_fraction"), ("certified_removal", "delta"), ("altpo", "num_alternatives")]:
        assert case in found, case
    assert len(found) >= 40


@pytest.mark.parametrize("name, hparam, high, default", UPPER_BOUNDS)
def test_hyperparameters_above_their_range_are_refused(name, hparam, high, default):
    """Every declared upper bound of every registered strategy refuses a value above it, naming the argument and
    the allowed range."""
    bad = high + max(1.0, abs(high))
    if isinstance(default, int) and not isinstance(default, bool):
        bad = int(bad)
    with pytest.raises(InvalidConfigError) as err:
        STRATEGIES.create(name, **{hparam: bad})
    assert hparam in str(err.value) and name in str(err.value)
    assert f"{high}]" in str(err.value) or f"{float(high)}]" in str(err.value), str(err.value)


@pytest.mark.parametrize("setting, value", [("lr", -1e-3), ("lr", 0.0), ("epochs", 0), ("epochs", -2), ("batch_size", 0)])
def test_runner_settings_out_of_range_fail_at_construction(digits_class, setting, value):
    with pytest.raises(InvalidConfigError, match=setting):
        ErasusUnlearner(digits_class.original, strategy="grad_diff", **{setting: value})


def test_lm_only_strategies_refuse_a_classifier(digits_class):
    class LMOnly(Strategy):
        name = "lm_only_test"
        requires = {"tokens"}

    b = digits_class
    with pytest.raises(CapabilityError, match=r"'lm_only_test'.*'tokens'.*'classification'"):
        ErasusUnlearner(b.original, strategy=LMOnly(), task=b.task)
    with pytest.raises(CapabilityError, match=r"'pipeline'.*'tokens'.*'classification'"):
        ErasusUnlearner(b.original, strategy=StrategyPipeline(["grad_diff", LMOnly()]), task=b.task)
    refused = []
    for name in STRATEGIES.names():
        if Capability.TOKENS in STRATEGIES.get(name).requires:
            refused.append(name)
            with pytest.raises(CapabilityError, match=rf"'{name}'.*'tokens'.*'classification'"):
                ErasusUnlearner(b.original, strategy=name, task=b.task)
    assert refused == ["attention_surgery", "token_masking"]
