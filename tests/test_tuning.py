"""Ray Tune sweeps and leaderboards: configs fail before Ray starts, the space is conditional and built from the
registries, leaderboards rank and mark the Pareto front correctly, and a 4-trial CLI sweep re-runs to its metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from erasus_ray.cli import main
from erasus_ray.errors import InvalidConfigError
from erasus_ray.tuning import SearchSpace, SweepConfig, build_leaderboard, job_config, load_trials, pareto_mask
from erasus_ray.tuning.leaderboard import read_csv

ROOT = Path(__file__).resolve().parents[1]
CI_CONFIG = ROOT / "tune_configs" / "ci_digits.yaml"


# ----------------------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "patch, key",
    [
        ({"strategies": ["grad_diff", "not_a_strategy"]}, "strategies"),
        ({"selectors": ["el2m"]}, "selectors"),
        ({"strategies": ["grad_diff"], "exclude_strategies": ["grad_diff"]}, "strategies: the search space is empty"),
        ({"selectors": [], "exclude_selectors": []}, "selectors: the search space is empty"),
        ({"fraction": {"low": 0.1, "high": 1.5}}, "fraction.high"),
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": {"low": 0.5, "high": 0.1}}, "fraction"),
        ({"learning_rate": 0.1}, "learning_rate"),
        ({"epochs": {"low": 0, "high": 3}}, "epochs.low"),
        ({"runner": {"lr": 0.1}}, "runner"),
        ({"strategy_params": {"npo": {"gamma_not_a_param": 1.0}}}, "strategy_params.npo"),
        ({"objective": "pareto"}, "objective"),
        ({"scheduler": {"type": "asha"}}, "scheduler"),  # ASHA needs a single objective
        ({"callbacks": ["tensorboardx"]}, "callbacks"),
        ({"resources": {"cpu": -1}}, "resources.cpu"),
        ({"benchmark": "cifar"}, "benchmark"),
    ],
)
def test_bad_sweep_configs_fail_naming_the_key(patch, key):
    base = yaml.safe_load(CI_CONFIG.read_text())
    with pytest.raises(InvalidConfigError, match=key.replace(".", r"\.").replace("(", r"\(")):
        SweepConfig.from_dict({**base, **patch})


def test_cli_rejects_bad_config_before_ray_starts(tmp_path, monkeypatch, capsys):
    import erasus_ray.tuning.sweep as sweep

    def must_not_run(*a, **k):  # pragma: no cover - reached only if validation let the config through
        raise AssertionError("the sweep started with an invalid config")

    monkeypatch.setattr(sweep, "run_sweep", must_not_run)
    monkeypatch.setattr(sweep, "_init_ray", must_not_run)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load(CI_CONFIG.read_text()), "strategies": ["gradient_descent_typo"]}))
    assert main(["sweep", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "strategies" in err and "gradient_descent_typo" in err
    bad.write_text(yaml.safe_dump({**yaml.safe_load(CI_CONFIG.read_text()), "fractoin": 0.1}))
    assert main(["sweep", "--config", str(bad)]) == 2
    assert "fractoin" in capsys.readouterr().err


def test_shipped_configs_validate():
    for path in sorted((ROOT / "tune_configs").glob("*.yaml")):
        cfg = SweepConfig.from_yaml(path)
        assert cfg.strategy_names() and cfg.selector_names(), path


# ----------------------------------------------------------------------------------------------------------------------
# search space
# ----------------------------------------------------------------------------------------------------------------------
def test_space_is_conditional_and_maps_to_the_job():
    optuna = pytest.importorskip("optuna")
    cfg = SweepConfig.from_dict({
        "strategies": ["npo", "gradient_ascent", "ssd"], "selectors": ["el2n", "random"],
        "fraction": {"low": 0.05, "high": 0.5}, "strategy_params": {"npo": {"beta": {"low": 0.05, "high": 0.5}}},
    })
    space = SearchSpace(cfg)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        constants = space(trial)
        params = {**trial.params, **constants}
        s = params["strategy"]
        seen.add(s)
        # only the drawn strategy's own parameters; ssd is not optimiser-driven, so it has no lr/epochs
        assert {k.split(".")[0] for k in params if "." in k} <= {s}
        assert (f"{s}.lr" in params) == (s != "ssd")
        assert ("npo.beta" in params) == (s == "npo")
        # default lr range: the strategy's default lr / 10 .. x 10
        from erasus_ray.strategies import STRATEGIES

        if s != "ssd":
            d = STRATEGIES.get(s).default_lr
            assert d / 10 <= params[f"{s}.lr"] <= d * 10
        assert 0.05 <= params["fraction"] <= 0.5
        job = job_config(cfg, params)
        assert job.strategy == s and job.selector == params["selector"] and job.fraction == params["fraction"]
        if s != "ssd":
            assert job.runner["lr"] == params[f"{s}.lr"] and job.runner["epochs"] == params[f"{s}.epochs"]
        assert job.strategy_params == ({"beta": params["npo.beta"]} if s == "npo" else {})
        study.tell(trial, 0.0)
    assert seen == {"npo", "gradient_ascent", "ssd"}


def test_new_strategy_joins_all_and_deny_list_applies():
    from erasus_ray.strategies import STRATEGIES, Strategy

    @STRATEGIES.register("zz_tuning_probe")
    class Probe(Strategy):  # registered for this test only
        def loss(self, ctx, forget, retain):  # pragma: no cover
            raise NotImplementedError

    try:
        assert "zz_tuning_probe" in SweepConfig.from_dict({}).strategy_names()
        names = SweepConfig.from_dict({"exclude_strategies": ["zz_tuning_probe", "retrain"]}).strategy_names()
        assert "zz_tuning_probe" not in names and "grad_diff" in names
        assert "retrain" not in SweepConfig.from_dict({}).strategy_names()  # the gold reference, denied by default
    finally:
        STRATEGIES._entries.pop("zz_tuning_probe")


# ----------------------------------------------------------------------------------------------------------------------
# leaderboard from a stored sweep directory (no Ray)
# ----------------------------------------------------------------------------------------------------------------
def test_pareto_mask_matches_brute_force():
    rng = np.random.default_rng(0)
    g, s = rng.random(40), rng.random(40)
    g[5], s[5] = g[3], s[3]  # a duplicate point: neither dominates the other
    brute = [not any((g[j] <= g[i] and s[j] <= s[i]) and (g[j] < g[i] or s[j] < s[i]) for j in range(40)) for i in range(40)]
    assert pareto_mask(g, s).tolist() == brute
    assert pareto_mask([0.1, 0.2, 0.05], [3.0, 1.0, 5.0]).tolist() == [True, True, True]
    assert pareto_mask([0.1, 0.2], [1.0, 2.0]).tolist() == [True, False]


def _write_trial(root: Path, name: str, params: dict, results: list[dict] | None) -> None:
    d = root / name
    d.mkdir()
    (d / "params.json").write_text(json.dumps(params))
    if results is not None:
        (d / "result.json").write_text("\n".join(json.dumps(r) for r in results) + "\n")


def _result(trial_id: str, gap: float, seconds: float, forget_acc: float) -> dict:
    return {"trial_id": trial_id, "avg_gap": gap, "seconds": seconds, "select_s": 0.01, "unlearn_s": seconds - 0.01,
            "coreset_size": 10, "n_forget": 146, "steps": 5, "stopped": "completed", "seed": 0, "lr": 1e-3, "epochs": 5,
            "metrics": {"forget_acc": forget_acc, "retain_acc": 0.99, "test_acc": 0.9, "mia_svc_efficacy": 0.9,
                        "mia_loss_auc": 0.1, "avg_gap": gap}, "training_iteration": 1}


@pytest.fixture()
def stored_sweep(tmp_path):
    """A Tune-like sweep directory: 4 finished trials (one whose log has an earlier, worse line), 1 errored."""
    root = tmp_path / "sweep"
    root.mkdir()
    p = lambda s, sel, f: {"strategy": s, "selector": sel, "fraction": f, "seed": 0, f"{s}.lr": 1e-3, f"{s}.epochs": 5}  # noqa: E731
    _write_trial(root, "run_trial_a_1", p("grad_diff", "el2n", 0.1), [_result("a", 0.90, 9.0, 0.9), _result("a", 0.05, 2.0, 0.02)])
    _write_trial(root, "run_trial_b_2", p("npo", "random", 0.2), [_result("b", 0.02, 5.0, 0.01)])
    _write_trial(root, "run_trial_c_3", p("grad_diff", "random", 0.5), [_result("c", 0.10, 3.0, 0.2)])  # dominated by a
    _write_trial(root, "run_trial_d_4", p("gradient_ascent", "el2n", 0.05), [_result("d", 0.30, 0.5, 0.5)])
    _write_trial(root, "run_trial_e_5", p("npo", "el2n", 0.9), None)  # errored: no result
    cfg = SweepConfig.from_dict({"name": "stored", "strategies": ["grad_diff", "npo", "gradient_ascent"], "selectors": ["el2n", "random"]})
    refs = [{"label": "original", "avg_gap": 0.5, "seconds": 4.0, "metrics": {"forget_acc": 1.0, "avg_gap": 0.5}},
            {"label": "retrain (gold)", "avg_gap": 0.0, "seconds": 3.0, "metrics": {"forget_acc": 0.0, "avg_gap": 0.0}}]
    (root / "sweep.json").write_text(json.dumps({"config": cfg.to_dict(), "references": refs, "wall_s": 12.0}))
    return root


def test_leaderboard_from_stored_sweep_without_ray(stored_sweep, tmp_path):
    trials = load_trials(stored_sweep)
    assert len(trials) == 5 and sum(t["status"] == "error" for t in trials) == 1
    assert next(t for t in trials if t["trial_id"] == "a")["avg_gap"] == 0.05  # the last line of result.json
    out = build_leaderboard(stored_sweep, rerun=False, out=tmp_path / "board", log=lambda m: None)
    rows = read_csv(out / "leaderboard.csv")
    refs = [r for r in rows if r["kind"] == "reference"]
    trials = [r for r in rows if r["kind"] == "trial"]
    assert [r["label"] for r in refs] == ["original", "retrain (gold)"] and refs[0]["avg_gap_pts"] == pytest.approx(50)
    assert len(trials) == 5
    ok = [r for r in trials if r["status"] == "ok"]
    # ranked by Avg.Gap: b (2 pts), a (5), c (10), d (30); Pareto: b, a, d (c has more gap and seconds than a)
    assert [r["trial_id"] for r in ok] == ["b", "a", "c", "d"] and [r["rank"] for r in ok] == [1, 2, 3, 4]
    assert {r["trial_id"]: r["pareto"] for r in ok} == {"b": True, "a": True, "c": False, "d": True}
    assert [r["avg_gap_pts"] for r in ok] == pytest.approx([2, 5, 10, 30])
    assert ok[0]["forget_acc"] == pytest.approx(1.0)  # metrics in points
    assert json.loads(ok[0]["params"])["npo.lr"] == 1e-3
    assert trials[-1]["status"] == "error" and trials[-1]["rank"] is None
    md = (out / "leaderboard.md").read_text()
    assert "| 1 | npo/random@0.2 |" in md and "retrain (gold)" in md and "Errored trials" in md and "e" in md
    assert (out / "pareto.png").stat().st_size > 10_000


def test_leaderboard_cli_rebuilds(stored_sweep, capsys):
    assert main(["leaderboard", str(stored_sweep), "--no-rerun"]) == 0
    assert (stored_sweep / "leaderboard.csv").exists() and "best: npo/random@0.2" in capsys.readouterr().out
    assert main(["leaderboard", str(stored_sweep.parent / "nope")]) == 2


# ----------------------------------------------------------------------------------------------------------------------
# a real 4-trial sweep through the CLI on the session's Ray cluster
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ci_sweep(tmp_path_factory, ray_cluster, digits_class):
    storage = tmp_path_factory.mktemp("sweeps")
    assert main(["sweep", "--config", str(CI_CONFIG), "--storage-path", str(storage), "--name", "ci"]) == 0
    return storage / "ci"


def test_cli_sweep_writes_a_sane_leaderboard(ci_sweep):
    cfg = SweepConfig.from_yaml(CI_CONFIG)
    for f in ("leaderboard.csv", "leaderboard.md", "pareto.png", "sweep.json", "reruns.json"):
        assert (ci_sweep / f).exists(), f
    rows = read_csv(ci_sweep / "leaderboard.csv")
    trials = [r for r in rows if r["kind"] == "trial"]
    assert len(trials) == cfg.num_samples == 4
    assert [r["label"] for r in rows if r["kind"] == "reference"] == ["original", "retrain (gold)"]
    for r in trials:
        assert r["status"] == "ok"
        assert r["strategy"] in cfg.strategy_names() and r["selector"] in cfg.selector_names()
        assert 0.05 <= r["fraction"] <= 0.5 and 2 <= r["epochs"] <= 8 and 1e-4 <= r["lr"] <= 3e-3
        assert math.isfinite(r["avg_gap_pts"]) and 0 <= r["avg_gap_pts"] <= 100
        assert math.isfinite(r["seconds"]) and r["seconds"] > 0
        assert abs(r["coreset_size"] - r["fraction"] * r["n_forget"]) <= 1
    assert sorted(r["avg_gap_pts"] for r in trials) == [r["avg_gap_pts"] for r in trials]  # ranked by gap
    assert any(r["pareto"] for r in trials)
    best = trials[0]
    assert best["rerun_seeds"] == "0 1" and best["rerun_same_seed_gap_diff_pts"] < 1e-4
    assert (ci_sweep / "pareto.png").stat().st_size > 10_000


def test_best_trial_reruns_to_its_metrics(ci_sweep, digits_class):
    from erasus_ray.evaluation import evaluate
    from erasus_ray.experiment import run_job

    cfg = SweepConfig.from_yaml(CI_CONFIG)
    best = next(r for r in read_csv(ci_sweep / "leaderboard.csv") if r["kind"] == "trial")
    job = job_config(cfg, json.loads(best["params"]), seed=best["seed"])
    b = digits_class
    gold = evaluate(b.gold, forget=b.forget, retain=b.retain, test=b.test, task=b.task, seed=job.seed)
    row = run_job(job, bench=b, gold_metrics=gold, progress=False)
    assert 100 * row["metrics"]["avg_gap"] == pytest.approx(best["avg_gap_pts"], abs=1e-3)
    assert 100 * row["metrics"]["forget_acc"] == pytest.approx(best["forget_acc"], abs=1e-3)
    assert row["coreset_size"] == best["coreset_size"] and row["report"]["steps"] == best["steps"]


def test_resume_of_a_finished_sweep_keeps_its_trials(ci_sweep, capsys):
    before = {t["trial_id"]: t["avg_gap"] for t in load_trials(ci_sweep)}
    assert main(["sweep", "--resume", str(ci_sweep), "--no-rerun"]) == 0
    after = {t["trial_id"]: t["avg_gap"] for t in load_trials(ci_sweep)}
    assert after == before


# ----------------------------------------------------------------------------------------------------------------------
# ASHA: per-epoch reports
# ----------------------------------------------------------------------------------------------------------------------
def test_epoch_reports_for_asha_do_not_change_the_run(digits_class):
    from erasus_ray.evaluation import evaluate
    from erasus_ray.tuning.sweep import evaluate_trial

    b = digits_class
    gold = evaluate(b.gold, forget=b.forget, retain=b.retain, test=b.test, task=b.task, seed=0)
    cfg = SweepConfig.from_dict({"strategies": ["grad_diff"], "selectors": ["el2n"], "objective": "single",
                                 "scheduler": {"type": "asha", "grace_period": 1}, "runner": {"retain_batch_size": 128}})
    params = {"strategy": "grad_diff", "selector": "el2n", "fraction": 0.2, "grad_diff.lr": 1e-3, "grad_diff.epochs": 4, "seed": 0}
    reports: list[dict] = []
    final = evaluate_trial(params, cfg.to_dict(), gold, report_epochs=reports.append)
    plain = evaluate_trial(params, cfg.to_dict(), gold)
    assert [r["epoch"] for r in reports] == [1, 2, 3, 4]
    # the last epoch's model is the final model (grad_diff has no finish step): same gap; and watching did not
    # change the run
    assert reports[-1]["avg_gap"] == pytest.approx(final["avg_gap"], abs=1e-9)
    assert final["metrics"] == pytest.approx(plain["metrics"], abs=1e-9)
    assert reports[0]["avg_gap"] > reports[-1]["avg_gap"]  # unlearning progresses towards the gold model
    # evaluation time is not charged to the unlearning
    assert final["epoch_eval_s"] > 0 and 0 < final["seconds"] < plain["seconds"] + final["epoch_eval_s"]
