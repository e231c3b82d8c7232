"""Ray Tune sweeps and leaderboards: configs fail before Ray starts, the space is conditional and built from the
registries, leaderboards rank and mark the Pareto front correctly, a 4-trial CLI sweep re-runs to its metrics, a
single-objective ASHA sweep stops trials through a real Tuner, seeded search repeats, a killed sweep resumes, trials
get the gold reference through the object store, logger callbacks are wired, and the sweep runs on a joined cluster
and under ``ray job submit`` (slow)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
import types
import warnings
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
BIN = Path(sys.executable).parent


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
        ({"callbacks": {"mlflow": {"trackin_uri": "file:/tmp/x"}}}, "callbacks.mlflow"),
        ({"callbacks": {"wandb": "offline"}}, "callbacks.wandb"),
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
        "strategies": ["npo", "gradient_ascent", "ssd"], "selectors": ["el2n", "random"], "loop": "open",
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
    _write_trial(root, "run_trial_d_4", p("gradient_ascent", "el2n", 0.05), [_result("4e12", 0.30, 0.5, 0.5)])  # a Tune id that looks like a float
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
    # ranked by Avg.Gap: b (2 pts), a (5), c (10), 4e12 (30); Pareto: b, a, 4e12 (c has more gap and seconds than a)
    assert [r["trial_id"] for r in ok] == ["b", "a", "c", "4e12"] and [r["rank"] for r in ok] == [1, 2, 3, 4]
    assert {r["trial_id"]: r["pareto"] for r in ok} == {"b": True, "a": True, "c": False, "4e12": True}
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


def test_pareto_plot_is_one_marker_per_strategy_and_one_colour_per_selector(tmp_path):
    """40 strategies x 30 selectors (more than the shipped digits sweeps' 35 x 27): the styles read back from the
    plotted artists are one per strategy and one per selector, never shared."""
    import itertools

    from erasus_ray.tuning.leaderboard import plot_pareto, selector_colours, strategy_styles

    rng = np.random.default_rng(0)
    strategies, selectors = [f"s{i:02d}" for i in range(40)], [f"c{i:02d}" for i in range(30)]
    rows = [{"kind": "reference", "label": "original", "avg_gap_pts": 40.0, "seconds": 5.0},
            {"kind": "reference", "label": "retrain (gold)", "avg_gap_pts": 0.0, "seconds": 4.0}]
    for i in range(120):  # every strategy 3 times, every selector 4 times, in varying pairs
        s, c = strategies[i % 40], selectors[(7 * i) % 30]
        rows.append({"kind": "trial", "status": "ok", "strategy": s, "selector": c, "label": f"{s}/{c}", "trial_id": str(i),
                     "avg_gap_pts": float(rng.uniform(1, 40)), "seconds": float(10 ** rng.uniform(-1, 1)), "pareto": i % 17 == 0})
    drawn = plot_pareto(rows, tmp_path / "p.png", "40 x 30")
    points = drawn["points"]
    assert len(points) == 120
    style_of, colour_of = {}, {}
    for p in points:  # same strategy -> same (marker, fill); same selector -> same colour
        assert style_of.setdefault(p["strategy"], (p["marker"], p["fillstyle"])) == (p["marker"], p["fillstyle"])
        assert colour_of.setdefault(p["selector"], p["colour"]) == p["colour"]
        assert (p["marker"], p["fillstyle"]) == drawn["strategy_style"][p["strategy"]]
    assert len(style_of) == 40 and len(set(style_of.values())) == 40  # injective: no two strategies share a style
    assert len(colour_of) == 30 and len(set(colour_of.values())) == 30
    rgb = np.array([c[:3] for c in colour_of.values()])
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(rgb, 2)) > 0.15  # distinct, not just unequal floats
    assert (tmp_path / "p.png").stat().st_size > 20_000
    # the mappings stay one-to-one past the (marker x fill) pairs and the qualitative palette
    many = strategy_styles([f"s{i}" for i in range(200)])
    assert len(set(many.values())) == 200 and many["s72"] == ("$73$", "full")
    assert len(set(selector_colours([f"c{i}" for i in range(200)]).values())) == 200
    assert len(set(selector_colours([f"c{i}" for i in range(7)]).values())) == 7


# ----------------------------------------------------------------------------------------------------------------------
# a committed real Tune experiment (3 trials of tune_configs/ci_digits.yaml; see tests/data/README.md)
# ----------------------------------------------------------------------------------------------------------------
FIXTURE_SWEEP = ROOT / "tests" / "data" / "sweep_ci_digits"


def test_leaderboard_from_the_committed_tune_experiment(tmp_path, capsys):
    """Restored from a copy at another absolute path (as in a fresh clone): Tuner.restore(...).get_results() and
    `erasus-ray leaderboard <dir>` give one row per stored trial, with the stored metrics; no sweep runs."""
    from ray import tune

    from erasus_ray.tuning.sweep import run_trial

    copy = tmp_path / "elsewhere" / "sweep"
    import shutil

    shutil.copytree(FIXTURE_SWEEP, copy)
    stored = {}
    for path in copy.glob("*/result.json"):
        last = json.loads(path.read_text().splitlines()[-1])
        stored[last["trial_id"]] = {**last, "params": json.loads((path.parent / "params.json").read_text())}
    assert len(stored) == 3
    grid = tune.Tuner.restore(str(copy), trainable=run_trial).get_results()
    assert Path(grid.experiment_path) == copy and len(grid) == 3 and grid.num_errors == 0
    for r in grid:
        s = stored[r.metrics["trial_id"]]
        assert Path(r.path).parent == copy
        assert (r.metrics["avg_gap"], r.metrics["seconds"], r.metrics["metrics"]) == (s["avg_gap"], s["seconds"], s["metrics"])
        assert r.config == s["params"]
        assert (r.metrics["threads"], r.metrics["device"]) == (1, "cpu")  # resources: {cpu: 1}, no GPU
    # the ResultGrid and the CLI build the same table from it
    board = build_leaderboard(grid, rerun=False, out=tmp_path / "board", log=lambda m: None)
    assert main(["leaderboard", str(copy), "--no-rerun"]) == 0
    best = min(stored.values(), key=lambda s: s["avg_gap"])
    assert f"best: {best['params']['strategy']}/{best['params']['selector']}@{best['params']['fraction']:.3g}" in capsys.readouterr().out
    rows = read_csv(copy / "leaderboard.csv")
    assert rows == read_csv(board / "leaderboard.csv")
    meta = json.loads((copy / "sweep.json").read_text())
    refs = [r for r in rows if r["kind"] == "reference"]
    assert [(r["label"], r["avg_gap_pts"], r["seconds"]) for r in refs] == [
        (m["label"], pytest.approx(100 * m["avg_gap"], rel=1e-5), pytest.approx(m["seconds"], rel=1e-5)) for m in meta["references"]]
    trials = [r for r in rows if r["kind"] == "trial"]
    assert sorted(r["trial_id"] for r in trials) == sorted(stored)
    ids = sorted(stored)
    front = dict(zip(ids, pareto_mask([stored[t]["avg_gap"] for t in ids], [stored[t]["seconds"] for t in ids]).tolist()))
    for rank, r in enumerate(trials, 1):  # ranked by Avg.Gap, the stored values in points (CSV: 6 significant digits)
        s = stored[r["trial_id"]]
        assert r["rank"] == rank and r["status"] == "ok" and r["pareto"] == front[r["trial_id"]]
        assert r["avg_gap_pts"] == pytest.approx(100 * s["avg_gap"], rel=1e-5) and r["seconds"] == pytest.approx(s["seconds"], rel=1e-5)
        for k in ("forget_acc", "retain_acc", "test_acc"):
            assert r[k] == pytest.approx(100 * s["metrics"][k], rel=1e-5)
        assert (r["lr"], r["epochs"], r["coreset_size"], r["n_forget"]) == pytest.approx((s["lr"], s["epochs"], s["coreset_size"], s["n_forget"]), rel=1e-5)
        assert json.loads(r["params"]) == {k: v for k, v in s["params"].items()}
    assert [r["avg_gap_pts"] for r in trials] == sorted(r["avg_gap_pts"] for r in trials)
    assert sorted(p.name for p in FIXTURE_SWEEP.iterdir()) == sorted(p.name for p in copy.iterdir() if p.suffix not in (".csv", ".md", ".png"))


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
    assert best["rerun_seeds"] == "0 1 2" and best["rerun_same_seed_gap_diff_pts"] < 1e-4
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


def test_epoch_reports_keep_setup_before_the_optimizer(digits_class):
    """Under ASHA's per-epoch runner, strategies whose setup adds the trainable parameters (LoRA adapters) still
    train them: the run equals the unwatched one and unlearns."""
    from erasus_ray.evaluation import evaluate
    from erasus_ray.tuning.sweep import evaluate_trial

    b = digits_class
    gold = evaluate(b.gold, forget=b.forget, retain=b.retain, test=b.test, task=b.task, seed=0)
    cfg = SweepConfig.from_dict({"strategies": ["lora_unlearning"], "selectors": ["el2n"], "objective": "single",
                                 "scheduler": {"type": "asha", "grace_period": 1}, "runner": {"retain_batch_size": 128}})
    params = {"strategy": "lora_unlearning", "selector": "el2n", "fraction": 0.2, "lora_unlearning.lr": 3e-3,
              "lora_unlearning.epochs": 3, "seed": 0}
    reports: list[dict] = []
    final = evaluate_trial(params, cfg.to_dict(), gold, report_epochs=reports.append)
    plain = evaluate_trial(params, cfg.to_dict(), gold)
    assert [r["epoch"] for r in reports] == [1, 2, 3]
    assert final["metrics"] == pytest.approx(plain["metrics"], abs=1e-6)
    original = evaluate(b.original, forget=b.forget, retain=b.retain, test=b.test, task=b.task, gold_metrics=gold, seed=0)
    assert final["metrics"]["forget_acc"] < original["forget_acc"] - 0.1  # the adapters trained (3 epochs on a 20% coreset: 1.00 -> 0.79)


# ----------------------------------------------------------------------------------------------------------------------
# the leaderboard from a real ResultGrid, with the seed re-runs' mean +- std
# ----------------------------------------------------------------------------------------------------------------------
def test_leaderboard_from_a_real_result_grid_shows_rerun_mean_std(ci_sweep, tmp_path):
    from ray import tune

    from erasus_ray.tuning.sweep import run_trial

    grid = tune.Tuner.restore(str(ci_sweep), trainable=run_trial).get_results()
    assert len(grid) == 4 and grid.num_errors == 0
    out = build_leaderboard(grid, out=tmp_path / "board", log=lambda m: None)  # re-runs come from reruns.json
    rows = [r for r in read_csv(out / "leaderboard.csv") if r["kind"] == "trial"]
    df = grid.get_dataframe()
    assert sorted(r["trial_id"] for r in rows) == sorted(df["trial_id"])
    # (the CSV keeps 6 significant digits)
    assert {r["trial_id"]: r["avg_gap_pts"] for r in rows} == pytest.approx({t: 100 * g for t, g in zip(df["trial_id"], df["avg_gap"])},
                                                                             rel=1e-5)
    best = rows[0]
    reruns = json.loads((ci_sweep / "reruns.json").read_text())
    runs = [reruns[f"{json.dumps(json.loads(best['params']), sort_keys=True, default=str)}|{s}"] for s in (0, 1, 2)]
    gaps, secs = np.array([100 * r["avg_gap"] for r in runs]), np.array([r["seconds"] for r in runs])
    close = lambda x: pytest.approx(x, rel=1e-5)  # noqa: E731
    assert best["rerun_avg_gap_pts_mean"] == close(gaps.mean()) and best["rerun_avg_gap_pts_std"] == close(gaps.std(ddof=1))
    assert best["rerun_seconds_mean"] == close(secs.mean()) and best["rerun_seconds_std"] == close(secs.std(ddof=1))
    assert len(set(gaps.round(6))) > 1  # other seeds are other models: the std is not a constant 0
    md = (out / "leaderboard.md").read_text()
    assert "## Top 1 configurations re-run with seeds 0 1 2 (mean +- std)" in md
    line = next(x for x in md.splitlines() if x.startswith(f"| 1 | {best['label']} |") and "+-" in x)
    assert f"{gaps.mean():.2f} +- {gaps.std(ddof=1):.2f}" in line and f"{secs.mean():.2f} +- {secs.std(ddof=1):.2f}" in line


# ----------------------------------------------------------------------------------------------------------------------
# seeded search: the same config and seed sample the same trials
# ----------------------------------------------------------------------------------------------------------------------
def _drive_searcher(cfg: SweepConfig, n: int) -> list[dict]:
    """Ask the sweep's searcher for ``n`` trials one at a time (as max_concurrent 1 does) and report a result that
    depends only on the params, so TPE's model (after its 10 random start-up trials) sees the same history."""
    from erasus_ray.tuning.sweep import build_searcher

    searcher = build_searcher(cfg)
    out = []
    for i in range(n):
        params = searcher.suggest(f"t{i}")
        assert params is not None
        out.append(params)
        gap = abs(math.log(params["fraction"]) + 2) + (0.1 if params["selector"] == "random" else 0.0)
        searcher.on_trial_complete(f"t{i}", {"avg_gap": gap, "seconds": 1 / params["fraction"]})
    return out


def test_seeded_searcher_samples_the_same_trials():
    pytest.importorskip("optuna")
    base = yaml.safe_load(CI_CONFIG.read_text())
    cfg = SweepConfig.from_dict({**base, "max_concurrent": 1})
    first, second = _drive_searcher(cfg, 14), _drive_searcher(cfg, 14)
    assert first == second
    assert len({json.dumps(p, sort_keys=True) for p in first}) == 14  # really sampled, not one point repeated
    other = _drive_searcher(SweepConfig.from_dict({**base, "max_concurrent": 1, "seed": 1}), 14)
    assert other != first
    single = SweepConfig.from_dict({**base, "max_concurrent": 1, "objective": "single"})
    assert _drive_searcher(single, 12) == _drive_searcher(single, 12)


# ----------------------------------------------------------------------------------------------------------------------
# what trials get from the driver: gold metrics and model files through the object store, not a driver path
# ----------------------------------------------------------------------------------------------------------------------
def test_trial_on_a_node_without_the_driver_cache_loads_the_shipped_models(digits_class, tmp_path, monkeypatch):
    import erasus_ray.benchmarks.base as base_mod
    from erasus_ray.benchmarks import load_benchmark
    from erasus_ray.tuning.sweep import benchmark_cache_files, trial_cache_dir

    files = benchmark_cache_files(digits_class, os.environ["ERASUS_RAY_CACHE"])
    assert sorted(n.rsplit("-", 1)[1] for n in files) == ["gold.json", "gold.pt", "original.json", "original.pt"]
    # the driver's folder is used when it holds the files (same node / shared file system)
    assert trial_cache_dir(os.environ["ERASUS_RAY_CACHE"], files) == os.environ["ERASUS_RAY_CACHE"]
    # another node: the driver's path does not exist there
    monkeypatch.setenv("ERASUS_RAY_TRIAL_CACHE", str(tmp_path / "node-local"))
    local = trial_cache_dir(str(tmp_path / "driver-only" / "cache"), files)
    assert local == str(tmp_path / "node-local") and not (tmp_path / "driver-only").exists()
    assert {p.name: p.read_bytes() for p in Path(local).glob("digits-*")} == files

    def no_training(*a, **k):
        raise AssertionError("the trial retrained a model the driver shipped")

    monkeypatch.setattr(base_mod, "train_model", no_training)
    bench = load_benchmark("digits", "class", 0, cache_dir=local)
    for a, b in zip(bench.original.state_dict().values(), digits_class.original.state_dict().values()):
        assert torch_equal(a, b)
    assert trial_cache_dir(str(tmp_path / "driver-only" / "cache"), files) == local  # second trial: files already there


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_run_sweep_ships_gold_metrics_and_model_files_to_trials(tmp_path, monkeypatch, digits_class):
    """run_sweep puts the gold metrics and the cached model files into tune.with_parameters (the object store),
    and no driver-local path is needed to read them; stopped right before the Tuner starts."""
    from ray import tune

    import erasus_ray.tuning.sweep as sweep

    captured = {}

    class Stop(Exception):
        pass

    def capture(trainable, **params):
        captured.update(params)
        raise Stop

    monkeypatch.setattr(tune, "with_parameters", capture)
    monkeypatch.setattr(sweep, "_init_ray", lambda cfg: False)
    cfg = SweepConfig.from_yaml(CI_CONFIG)
    with pytest.raises(Stop):
        sweep.run_sweep(cfg, storage_path=str(tmp_path), name="ship")
    from erasus_ray.evaluation import evaluate

    b = digits_class
    gold = evaluate(b.gold, forget=b.forget, retain=b.retain, test=b.test, task=b.task, seed=0)
    assert captured["gold_metrics"] == pytest.approx(gold)
    assert set(captured["cache_files"]) == set(sweep.benchmark_cache_files(b, os.environ["ERASUS_RAY_CACHE"]))
    assert all(isinstance(v, bytes) and v for v in captured["cache_files"].values())
    assert json.loads((tmp_path / "ship" / "sweep.json").read_text())["gold_metrics"] == pytest.approx(gold)


# ----------------------------------------------------------------------------------------------------------------------
# per-trial resources: torch threads = the reserved CPUs, the model on CUDA when the trial holds a GPU
# ----------------------------------------------------------------------------------------------------------------------
def test_trial_placement_from_reserved_resources():
    from erasus_ray.tuning.sweep import trial_placement

    assert trial_placement({"CPU": 2.0}, {}, cuda_available=False) == {"threads": 2, "device": "cpu", "cpus": 2.0, "gpus": 0.0}
    assert trial_placement({"CPU": 0.5}, {}, cuda_available=True)["threads"] == 1  # fractional CPU: one thread
    assert trial_placement({"CPU": 3.0, "GPU": 1.0}, {}, cuda_available=True)["device"] == "cuda"
    assert trial_placement({"CPU": 1.0, "GPU": 0.25}, {}, cuda_available=True)["device"] == "cuda"  # a shared GPU
    fallback = trial_placement({"CPU": 1.0, "GPU": 1.0}, {}, cuda_available=False)
    assert fallback["device"] == "cpu" and "reserved 1 GPU(s) but torch.cuda.is_available() is False" in fallback["device_note"]
    assert "device_note" not in trial_placement({"CPU": 1.0}, {}, cuda_available=False)
    # outside a Ray worker: the config's resources stand in
    assert trial_placement(None, {"cpu": 3, "gpu": 1}, cuda_available=True) == {"threads": 3, "device": "cuda", "cpus": 3.0, "gpus": 1.0}
    assert trial_placement(None, {}, cuda_available=False)["threads"] == 1


def test_run_trial_uses_the_resources_ray_assigned_it(monkeypatch):
    """run_trial called as Tune calls it, under a fake runtime context: a {cpu: 2} trial runs with 2 torch threads;
    a GPU trial gets device cuda when torch sees CUDA, else cpu with a note in its result."""
    import ray
    import torch
    from ray import tune

    import erasus_ray.tuning.sweep as sweep

    seen, reports = [], []

    def fake_evaluate(config, sweep_cfg, gold, report_epochs=None, device=None):
        seen.append({"threads": torch.get_num_threads(), "device": device})
        return {"avg_gap": 0.1, "seconds": 1.0}

    def context(assigned):
        return lambda: types.SimpleNamespace(get_assigned_resources=lambda: dict(assigned))

    monkeypatch.setattr(sweep, "evaluate_trial", fake_evaluate)
    monkeypatch.setattr(tune, "report", reports.append)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setenv("ERASUS_RAY_CACHE", os.environ.get("ERASUS_RAY_CACHE", "/tmp"))
    before = torch.get_num_threads()
    kwargs = {"sweep": {"resources": {"cpu": 1}}, "gold_metrics": {}, "cache_dir": os.environ["ERASUS_RAY_CACHE"]}
    try:
        torch.set_num_threads(1)
        monkeypatch.setattr(ray, "get_runtime_context", context({"CPU": 2.0}))
        sweep.run_trial({}, **kwargs)
        assert seen[-1] == {"threads": 2, "device": None} and reports[-1]["threads"] == 2 and reports[-1]["device"] == "cpu"
        monkeypatch.setattr(ray, "get_runtime_context", context({"CPU": 1.0, "GPU": 1.0}))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        sweep.run_trial({}, **kwargs)
        assert seen[-1] == {"threads": 1, "device": "cuda"} and reports[-1]["device"] == "cuda" and "device_note" not in reports[-1]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.warns(RuntimeWarning, match="reserved 1 GPU"):
            sweep.run_trial({}, **kwargs)
        assert seen[-1] == {"threads": 1, "device": "cpu"}
        assert reports[-1]["device"] == "cpu" and "ran on cpu" in reports[-1]["device_note"] and reports[-1]["avg_gap"] == 0.1
    finally:
        torch.set_num_threads(before)


def test_evaluate_trial_runs_the_unlearner_on_the_given_device(digits_class, monkeypatch):
    """The device reaches ErasusUnlearner(device=...) (here cpu; the same path puts a GPU trial's model on cuda)."""
    from erasus_ray.evaluation import evaluate
    from erasus_ray.tuning.sweep import evaluate_trial
    from erasus_ray.unlearner import ErasusUnlearner

    devices = []
    init = ErasusUnlearner.__init__

    def spy(self, *args, **kwargs):
        devices.append(kwargs.get("device"))
        init(self, *args, **kwargs)

    monkeypatch.setattr(ErasusUnlearner, "__init__", spy)
    b = digits_class
    gold = evaluate(b.gold, forget=b.forget, retain=b.retain, test=b.test, task=b.task, seed=0)
    cfg = SweepConfig.from_yaml(CI_CONFIG).to_dict()
    params = {"strategy": "grad_diff", "selector": "random", "fraction": 0.1, "grad_diff.lr": 1e-3, "grad_diff.epochs": 2, "seed": 0}
    on_cpu = evaluate_trial(params, cfg, gold, device="cpu")
    plain = evaluate_trial(params, cfg, gold)
    assert devices == ["cpu", None]
    assert on_cpu["metrics"] == pytest.approx(plain["metrics"], abs=1e-9)


# ----------------------------------------------------------------------------------------------------------------------
# storage_path: the config's default, relative to the working directory, overridden by --storage-path
# ----------------------------------------------------------------------------------------------------------------------
def test_storage_path_default_and_resolution(tmp_path, monkeypatch):
    import re

    import erasus_ray.tuning.sweep as sweep

    assert SweepConfig().storage_path == SweepConfig.from_dict({}).storage_path == "results/sweeps"
    base = yaml.safe_load(CI_CONFIG.read_text())
    assert SweepConfig.from_dict({k: v for k, v in base.items() if k != "storage_path"}).storage_path == "results/sweeps"
    for bad in ("", None, 3):
        with pytest.raises(InvalidConfigError, match="storage_path"):
            SweepConfig.from_dict({**base, "storage_path": bad})
    cfg = SweepConfig.from_yaml(CI_CONFIG)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # relative to the working directory; default name <config name>-<date>-<time>
    d = sweep.sweep_directory(cfg)
    assert d.parent == tmp_path / "results" / "sweeps" and re.fullmatch(r"ci_digits-\d{8}-\d{6}", d.name)
    assert sweep.sweep_directory(cfg, name="x") == tmp_path / "results" / "sweeps" / "x"
    assert sweep.sweep_directory(SweepConfig.from_dict({**base, "storage_path": "~/sw"}), name="x") == tmp_path / "home" / "sw" / "x"
    assert sweep.sweep_directory(cfg, name="x", storage_path=str(tmp_path / "other")) == tmp_path / "other" / "x"
    (tmp_path / "results" / "sweeps" / "x").mkdir(parents=True)
    with pytest.raises(InvalidConfigError, match="name: .* already exists"):
        sweep.sweep_directory(cfg, name="x")
    with pytest.raises(InvalidConfigError, match="resume: .* is not a Tune sweep directory"):
        sweep.sweep_directory(cfg, resume=tmp_path / "results" / "sweeps" / "x")
    assert not list(tmp_path.glob("results/sweeps/ci_digits-*"))  # resolving creates nothing


def test_cli_sweep_without_storage_path_writes_under_the_configs_default(tmp_path, monkeypatch):
    """`erasus-ray sweep --config ...` with no --storage-path: the sweep folder is <cwd>/results/sweeps/<name>
    (stopped before the benchmark is built or Ray starts)."""
    import erasus_ray.tuning.sweep as sweep

    class Stop(Exception):
        pass

    resolved = []
    real = sweep.sweep_directory
    monkeypatch.setattr(sweep, "sweep_directory", lambda *a, **k: resolved.append(real(*a, **k)) or resolved[-1])

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(sweep, "reference_info", stop)
    monkeypatch.setattr(sweep, "_init_ray", stop)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Stop):
        main(["sweep", "--config", str(CI_CONFIG), "--name", "here"])
    assert resolved == [tmp_path / "results" / "sweeps" / "here"]
    with pytest.raises(Stop):
        main(["sweep", "--config", str(CI_CONFIG), "--name", "there", "--storage-path", "elsewhere"])
    assert resolved[-1] == tmp_path / "elsewhere" / "there"


# ----------------------------------------------------------------------------------------------------------------------
# _init_ray: join RAY_ADDRESS, else the embedded local Ray; never a runtime_env that would clash with a job's
# ----------------------------------------------------------------------------------------------------------------------
def test_init_ray_branches(monkeypatch, capsys):
    import ray

    import erasus_ray.tuning.sweep as sweep

    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        return types.SimpleNamespace(address_info={"gcs_address": "127.0.0.1:6399"})

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    cfg = SweepConfig.from_yaml(CI_CONFIG)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert sweep._init_ray(cfg) is True
    assert calls[-1] == {"address": "local", "include_dashboard": False, "log_to_driver": False}
    assert "started an embedded local Ray" in capsys.readouterr().out
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6399")
    assert sweep._init_ray(cfg) is True
    assert calls[-1] == {"address": "127.0.0.1:6399", "log_to_driver": False}
    assert "joined the cluster at 127.0.0.1:6399" in capsys.readouterr().out
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(gcs_address="127.0.0.1:1"))
    assert sweep._init_ray(cfg) is False and len(calls) == 2  # an initialised Ray is used, not started again


# ----------------------------------------------------------------------------------------------------------------------
# MLflow / W&B: neither is installed here; fake modules stand in for them
# ----------------------------------------------------------------------------------------------------------------------
def _fake_mlflow(calls: list) -> dict[str, types.ModuleType]:
    """A stand-in ``mlflow`` (real module objects, so Tune can pickle the callback) recording what Ray's
    ``MLflowLoggerCallback`` calls."""
    mlflow = types.ModuleType("mlflow")
    mlflow.__version__ = "2.9.0"
    state: dict = {"uri": None}

    class Run:
        def __init__(self, run_id: str) -> None:
            self.info = types.SimpleNamespace(run_id=run_id)

    class MlflowClient:
        def __init__(self, tracking_uri=None, registry_uri=None) -> None:
            pass

        def create_run(self, experiment_id, run_name=None, tags=None):
            calls.append(("create_run", experiment_id, run_name))
            return Run(f"run-{len(calls)}")

        def log_param(self, run_id, key, value):
            calls.append(("param", run_id, key, value))

        def log_metric(self, run_id, key, value, step=None):
            calls.append(("metric", run_id, key, value, step))

        def set_terminated(self, run_id, status=None):
            calls.append(("end", run_id, status))

    def set_tracking_uri(uri):
        state["uri"] = uri
        calls.append(("tracking_uri", uri))

    def create_experiment(name, artifact_location=None):
        calls.append(("create_experiment", name))
        return "exp-1"

    mlflow.set_tracking_uri = set_tracking_uri
    mlflow.set_registry_uri = lambda uri: None
    mlflow.get_tracking_uri = lambda: state["uri"]
    mlflow.get_registry_uri = lambda: None
    mlflow.get_experiment_by_name = lambda name=None: None
    mlflow.create_experiment = create_experiment
    mlflow.get_run = lambda run_id=None: Run(run_id)
    mlflow.active_run = lambda: None
    tracking = types.ModuleType("mlflow.tracking")
    tracking.MlflowClient = MlflowClient
    exceptions = types.ModuleType("mlflow.exceptions")
    exceptions.MlflowException = type("MlflowException", (Exception,), {})
    utils = types.ModuleType("mlflow.utils")
    tags = types.ModuleType("mlflow.utils.mlflow_tags")
    tags.MLFLOW_RUN_NAME = "mlflow.runName"
    mlflow.tracking, mlflow.exceptions, mlflow.utils, utils.mlflow_tags = tracking, exceptions, utils, tags
    return {"mlflow": mlflow, "mlflow.tracking": tracking, "mlflow.exceptions": exceptions, "mlflow.utils": utils,
            "mlflow.utils.mlflow_tags": tags}


def test_logger_callbacks_are_rays_classes_with_the_config_settings(monkeypatch):
    import ray.air.integrations.wandb as ray_wandb
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.air.integrations.wandb import WandbLoggerCallback

    from erasus_ray.tuning.sweep import _callbacks

    for name, module in _fake_mlflow([]).items():
        monkeypatch.setitem(sys.modules, name, module)
    fake_wandb = types.ModuleType("wandb")
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    monkeypatch.setattr(ray_wandb, "wandb", fake_wandb)  # Ray read `import wandb` when it was first imported
    base = yaml.safe_load(CI_CONFIG.read_text())
    cfg = SweepConfig.from_dict({**base, "callbacks": {
        "mlflow": {"tracking_uri": "file:///tmp/erasus-mlruns", "tags": {"team": "privacy"}, "save_artifact": True},
        "wandb": {"project": "erasus", "group": "digits", "mode": "offline"}}})
    mlf, wb = _callbacks(cfg, "ci-sweep-dir")
    assert type(mlf) is MLflowLoggerCallback and type(wb) is WandbLoggerCallback
    assert (mlf.tracking_uri, mlf.experiment_name, mlf.tags, mlf.should_save_artifact) == (
        "file:///tmp/erasus-mlruns", "ci-sweep-dir", {"team": "privacy"}, True)
    assert (wb.project, wb.group, wb.kwargs) == ("erasus", "digits", {"mode": "offline"})
    # the list form: Ray's defaults, named after the sweep folder
    mlf, wb = _callbacks(SweepConfig.from_dict({**base, "callbacks": ["mlflow", "wandb"]}), "ci-sweep-dir")
    assert mlf.experiment_name == "ci-sweep-dir" and mlf.tracking_uri is None and wb.project == "ci-sweep-dir"


def test_logger_callbacks_missing_packages_warn_and_are_skipped(monkeypatch):
    from erasus_ray.tuning.sweep import _callbacks

    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = SweepConfig.from_dict({**yaml.safe_load(CI_CONFIG.read_text()), "callbacks": ["mlflow", "wandb"]})
    with pytest.warns(RuntimeWarning) as record:
        assert _callbacks(cfg, "x") == []
    assert sorted(str(w.message).split()[1] for w in record) == ["mlflow", "wandb"]


# ----------------------------------------------------------------------------------------------------------------------
# single objective + ASHA through a real Tuner, with the MLflow callback wired (fake mlflow in this process)
# ----------------------------------------------------------------------------------------------------------------------
SINGLE = {
    "name": "single_asha", "benchmark": "digits", "scenario": "class", "seed": 0,
    "strategies": ["grad_diff"], "selectors": ["el2n", "random"], "fraction": {"low": 0.05, "high": 0.5, "log": True},
    "lr": {"low": 1.0e-4, "high": 3.0e-3, "log": True}, "epochs": 4, "runner": {"retain_batch_size": 128},
    "objective": "single", "metric": "avg_gap", "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    "num_samples": 5, "max_concurrent": 1, "top_k": 0,
}


def _trial_params_in_order(sweep_dir: Path) -> list[dict]:
    """Searched params of each trial in the order Tune created them (the counter in the trial folder name)."""
    trials = sorted(sweep_dir.glob("*/params.json"), key=lambda p: int(p.parent.name.split("_")[3]))
    return [json.loads(p.read_text()) for p in trials]


@pytest.fixture(scope="module")
def single_sweep(tmp_path_factory, ray_cluster, digits_class):
    from erasus_ray.tuning.sweep import run_sweep

    calls: list = []
    saved = {k: sys.modules.get(k) for k in _fake_mlflow([])}
    sys.modules.update(_fake_mlflow(calls))
    try:
        cfg = SweepConfig.from_dict({**SINGLE, "callbacks": {"mlflow": {"tracking_uri": "file:///tmp/erasus-fake-mlruns"}}})
        storage = tmp_path_factory.mktemp("single")
        sweep_dir = run_sweep(cfg, storage_path=str(storage), name="asha", leaderboard=False)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return sweep_dir, calls


def test_single_objective_asha_sweep_through_a_real_tuner(single_sweep, tmp_path):
    sweep_dir, calls = single_sweep
    out = build_leaderboard(sweep_dir, out=tmp_path / "board", log=lambda m: None)
    trials = [r for r in read_csv(out / "leaderboard.csv") if r["kind"] == "trial"]
    assert len(trials) == SINGLE["num_samples"]
    by_id = {t["trial_id"]: t for t in load_trials(sweep_dir)}
    early = [t for t in trials if t["status"] == "early_stopped"]
    done = [t for t in trials if t["status"] == "ok"]
    assert early and done, "ASHA (grace 1, factor 2, trials one at a time) must stop at least one of 5 trials"
    for t in trials:
        lines = [json.loads(x) for x in (sweep_dir / by_id[t["trial_id"]]["trial_dir"] / "result.json").read_text().splitlines()]
        epochs = [x["epoch"] for x in lines if "epoch" in x]
        if t["status"] == "ok":  # one report per epoch, then the final result
            assert epochs == [1, 2, 3, 4] and len(lines) == 5 and lines[-1]["stopped"] != "running (epoch 4)"
        else:  # stopped by ASHA at a rung (1 or 2 epochs), never reached the final report
            assert epochs == list(range(1, len(lines) + 1)) and len(lines) in (1, 2)
            assert lines[-1]["stopped"].startswith("running")
    # single objective: ranked by Avg.Gap alone; stopped trials are not ranked
    assert [t["avg_gap_pts"] for t in done] == sorted(t["avg_gap_pts"] for t in done)
    assert [t["rank"] for t in done] == list(range(1, len(done) + 1)) and all(t["rank"] is None for t in early)
    md = (out / "leaderboard.md").read_text()
    assert "objective `single` (`avg_gap`)" in md and "Stopped early by ASHA" in md
    # the MLflow logger callback ran in the driver with the config's tracking URI and the sweep folder as experiment
    assert ("tracking_uri", "file:///tmp/erasus-fake-mlruns") in calls and ("create_experiment", "asha") in calls
    runs = [c for c in calls if c[0] == "create_run"]
    assert len(runs) == SINGLE["num_samples"]
    gap_logs = [c for c in calls if c[0] == "metric" and c[2] == "avg_gap"]
    assert len(gap_logs) == sum(len((sweep_dir / t["trial_dir"] / "result.json").read_text().splitlines()) for t in by_id.values())
    assert len([c for c in calls if c[0] == "end"]) == SINGLE["num_samples"]


@pytest.mark.slow
def test_seeded_sweep_through_a_real_tuner_samples_the_same_trials(single_sweep, tmp_path):
    from erasus_ray.tuning.sweep import run_sweep

    first = _trial_params_in_order(single_sweep[0])
    again = run_sweep(SweepConfig.from_dict(SINGLE), storage_path=str(tmp_path), name="again", leaderboard=False)
    assert _trial_params_in_order(again) == first
    assert len({json.dumps(p, sort_keys=True) for p in first}) == len(first)


# ----------------------------------------------------------------------------------------------------------------------
# an interrupted sweep: the CLI killed by PID mid-sweep, then `erasus-ray sweep --resume` completes it (slow)
# ----------------------------------------------------------------------------------------------------------------------
def _persisted_trials(sweep_dir: Path) -> dict[str, str]:
    """Trial id -> status in Tune's last saved experiment state ({} while none is readable yet). Reads the state
    file directly (``ExperimentAnalysis`` also loads every result and is too slow to poll)."""
    try:
        # newest by the session time in the name, as Tune picks it (a resumed run re-copies the older files too)
        newest = max(sweep_dir.glob("experiment_state-*.json"), key=lambda p: p.name)
        trials = [json.loads(t[0]) for t in json.loads(newest.read_text())["trial_data"]]
        return {t["trial_id"]: t["status"] for t in trials}
    except (ValueError, OSError, KeyError, IndexError, TypeError):  # not written yet, or caught mid-write
        return {}


@pytest.mark.slow
def test_resume_of_a_killed_sweep_keeps_finished_trials_and_completes_the_rest(tmp_path, ray_cluster, digits_class):
    import tempfile
    import threading

    import psutil
    from test_cluster_job import _end_processes_mentioning

    n = 6
    config = tmp_path / "sweep.yaml"
    # trials of ~2.5 s (the full forget set, 30 epochs of batch 8), one at a time: time to kill the sweep mid-way
    config.write_text(yaml.safe_dump({**yaml.safe_load(CI_CONFIG.read_text()), "num_samples": n, "max_concurrent": 1, "top_k": 0,
                                      "fraction": 1.0, "epochs": 30, "runner": {"retain_batch_size": 128, "batch_size": 8}}))
    sweep_dir = tmp_path / "sweeps" / "killed"
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # the CLI's embedded Ray lives here; short socket paths
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([str(BIN / "erasus-ray"), "sweep", "--config", str(config), "--storage-path", str(sweep_dir.parent),
                             "--name", "killed", "--no-leaderboard"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 400
        while True:  # kill once Tune has saved >= 2 finished trials (its state is written every ~1 s)
            persisted = _persisted_trials(sweep_dir) if sweep_dir.exists() else {}
            if sum(s == "TERMINATED" for s in persisted.values()) >= 2:
                break
            assert proc.poll() is None, "the sweep ended before it could be killed:\n" + "".join(output)[-3000:]
            assert time.time() < deadline, "no 2 finished trials in time:\n" + "".join(output)[-3000:]
            time.sleep(0.2)
        children = psutil.Process(proc.pid).children(recursive=True)  # its embedded Ray, ended by PID below
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        for child in locals().get("children", []):
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        _end_processes_mentioning(ray_tmp)
    persisted = _persisted_trials(sweep_dir)
    kept = {t: s for t, s in persisted.items() if s == "TERMINATED"}
    assert 2 <= len(kept) < n, persisted
    before = {t["trial_dir"]: t for t in load_trials(sweep_dir)}  # Tune's folder names carry the trial ids
    assert len(before) < n
    kept_dirs = {d: t for d, t in before.items() if t["trial_id"] in kept}
    assert len(kept_dirs) == len(kept)
    kept_results = {d: (sweep_dir / d / "result.json").read_bytes() for d in kept_dirs}

    assert main(["sweep", "--resume", str(sweep_dir), "--no-rerun"]) == 0
    after = {t["trial_dir"]: t for t in load_trials(sweep_dir)}
    assert len(after) == n and len(list(sweep_dir.glob("*/params.json"))) == n  # the search went on to num_samples
    assert all(t["status"] == "ok" for t in after.values())
    assert set(before) <= set(after)  # the unfinished trial re-ran under its own id and folder, not as a new trial
    assert {after[d]["trial_id"] for d in kept_dirs} == set(kept)
    for d, raw in kept_results.items():  # finished trials were kept, not re-run
        assert (sweep_dir / d / "result.json").read_bytes() == raw
    assert set(_persisted_trials(sweep_dir).values()) == {"TERMINATED"}
    assert (sweep_dir / "leaderboard.md").exists()
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    assert meta["n_trials"] == n and meta["n_errors"] == 0


# ----------------------------------------------------------------------------------------------------------------------
# on a cluster: RAY_ADDRESS joins a running head; `ray job submit -- erasus-ray sweep` writes the leaderboard (slow)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sweep_joins_ray_address_and_runs_under_ray_job_submit(tmp_path):
    pytest.importorskip("ray")
    from test_cluster_job import local_ray_head, ray_job_submit

    with local_ray_head() as (gcs, dashboard, env):
        joined = subprocess.run(
            [str(BIN / "erasus-ray"), "sweep", "--config", str(CI_CONFIG), "--storage-path", str(tmp_path / "joined"), "--name", "j",
             "--num-samples", "2", "--no-rerun"],
            env={**env, "RAY_ADDRESS": gcs}, capture_output=True, text=True, timeout=600, cwd=ROOT,
        )
        assert joined.returncode == 0, joined.stdout[-3000:] + joined.stderr[-3000:]
        assert f"Ray: joined the cluster at {gcs}" in joined.stdout
        assert len([r for r in read_csv(tmp_path / "joined" / "j" / "leaderboard.csv") if r["kind"] == "trial"]) == 2
        job = ray_job_submit(dashboard, env, [str(BIN / "erasus-ray"), "sweep", "--config", "tune_configs/ci_digits.yaml",
                                              "--storage-path", str(tmp_path / "job"), "--name", "ci"])
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert f"Ray: joined the cluster at {gcs}" in job.stdout  # the job's RAY_ADDRESS, not a second Ray
    board = tmp_path / "job" / "ci"
    for f in ("leaderboard.csv", "leaderboard.md", "pareto.png", "sweep.json", "reruns.json"):
        assert (board / f).exists(), f
    rows = read_csv(board / "leaderboard.csv")
    assert len([r for r in rows if r["kind"] == "trial" and r["status"] == "ok"]) == 4
    assert "re-run with seeds 0 1 2 (mean +- std)" in (board / "leaderboard.md").read_text()


# ----------------------------------------------------------------------------------------------------------------------
# benchmarks/coreset_ablation/run.py: the quick smoke run, then a --merge run of another task (~20 s)
# ----------------------------------------------------------------------------------------------------------------------
def _ablation_module():
    spec = importlib.util.spec_from_file_location("coreset_ablation_run", ROOT / "benchmarks" / "coreset_ablation" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_coreset_ablation_quick_then_merge(tmp_path, digits_class):
    ablation = _ablation_module()
    out = tmp_path / "ablation"
    assert ablation.main(["--quick", "--out", str(out)]) == 0
    rows = ablation.base.read_csv(out / "results.csv")
    assert [r["config"] for r in rows] == ["retrain", "grad_diff:full@1", "grad_diff:random@0.2", "grad_diff:el2n@0.2",
                                           "grad_diff:random@0.05", "grad_diff:el2n@0.05"]
    full, retrain = rows[1], rows[0]
    assert full["ratio_to_full"] == pytest.approx(1.0) and retrain["ratio_to_retrain"] == pytest.approx(1.0)
    for r in rows[2:]:
        assert r["ratio_to_full"] == pytest.approx(r["total_s"] / full["total_s"], rel=1e-4)
        assert r["ratio_to_retrain"] == pytest.approx(r["total_s"] / retrain["total_s"], rel=1e-4)
        assert r["coreset_size"] == round(r["fraction"] * r["n_forget"]) or abs(r["coreset_size"] - r["fraction"] * r["n_forget"]) <= 1
    md = (out / "RESULTS.md").read_text()
    assert "run.py --quick --out" in md and '## Verdict on the claim: "5-10% coresets match' in md
    assert next(x for x in md.splitlines() if x.startswith("| digits/class | **")).split("**")[1] in ("holds", "partly", "does not hold")
    assert (out / "ablation.png").stat().st_size > 20_000
    # --merge: another task's rows are added, the first run's rows and command kept
    merge = ["--tasks", "digits:random10", "--seeds", "0", "--fractions", "0.1,1.0", "--selectors", "random", "--strategies", "grad_diff",
             "--out", str(out), "--merge"]
    assert ablation.main(merge) == 0
    merged = ablation.base.read_csv(out / "results.csv")
    cols = lambda rs: [(r["scenario"], r["config"], r["total_s"], r["avg_gap_pts"]) for r in rs]  # noqa: E731  (NaNs elsewhere)
    assert cols(merged[:6]) == cols(rows)
    assert [(r["scenario"], r["config"]) for r in merged[6:]] == [("random10", "retrain"), ("random10", "grad_diff:full@1"),
                                                                   ("random10", "grad_diff:random@0.1")]
    runs = json.loads((out / "run_meta.json").read_text())["runs"]
    assert [r["tasks"] for r in runs] == [["digits:class"], ["digits:random10"]]
    md = (out / "RESULTS.md").read_text()
    assert "1. `" in md and "2. `" in md and "--merge" in md and "| digits/random10 | **" in md
    # merge_rows replaces a task's rows in place
    old = [{"task": "a", "scenario": "x", "v": 1}, {"task": "b", "scenario": "y", "v": 2}]
    assert ablation.merge_rows(old, [{"task": "a", "scenario": "x", "v": 3}]) == [{"task": "a", "scenario": "x", "v": 3}, old[1]]


# ----------------------------------------------------------------------------------------------------------------------
# closed-loop sweeps (issue 14)
# ----------------------------------------------------------------------------------------------------------------------
def test_closed_loop_is_the_default_without_lr_epochs_and_searches_neither():
    optuna = pytest.importorskip("optuna")
    assert SweepConfig.from_dict({"strategies": ["grad_diff"]}).loop == "closed"
    assert SweepConfig.from_dict({"strategies": ["grad_diff"], "lr": 1e-3}).loop == "open"  # explicit lr x epochs search
    with pytest.raises(InvalidConfigError, match="epochs: a closed-loop sweep does not search it"):
        SweepConfig.from_dict({"loop": "closed", "epochs": 3})
    for bad, key in (({"target": "nope"}, "target"), ({"budget_steps": 0}, "budget_steps"), ({"loop": "half"}, "loop")):
        with pytest.raises(InvalidConfigError, match=key):
            SweepConfig.from_dict({"strategies": ["grad_diff"], **bad})
    cfg = SweepConfig.from_dict({"strategies": ["npo", "ssd"], "selectors": ["el2n"], "strategy_params": {"npo": {"beta": 0.2}}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(6):
        trial = study.ask()
        constants = SearchSpace(cfg)(trial)
        params = {**trial.params, **constants}
        assert not any(k.endswith((".lr", ".epochs")) for k in params) and params["fraction"] == "auto"
        job = job_config(cfg, params)
        assert job.fraction == "auto" and "lr" not in job.runner and "epochs" not in job.runner
        study.tell(trial, 0.0)


@pytest.fixture(scope="module")
def closed_sweep(tmp_path_factory, ray_cluster, digits_class):
    from erasus_ray.tuning.sweep import run_sweep

    storage = tmp_path_factory.mktemp("closed")
    return run_sweep(SweepConfig.from_yaml(ROOT / "tune_configs" / "ci_digits_closed.yaml"), storage_path=str(storage), name="closed")


@pytest.mark.slow
def test_closed_loop_sweep_trials_run_under_the_controller_and_rank_verified_first(closed_sweep, digits_class):
    """Each trial is a controller run: its verification's mode is ``closed_loop`` (only the controller writes it; an
    open-loop trial says ``open_loop``), nothing of lr / epochs was searched, and the leaderboard carries verified,
    steps, seconds and the final coreset fraction of the adaptive coreset, verified trials first."""
    rows = [r for r in read_csv(closed_sweep / "leaderboard.csv") if r["kind"] == "trial"]
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    n_forget = rows[0]["n_forget"]
    for r in rows:
        assert r["mode"] == "closed_loop" and r["verified"] in (True, False)
        assert r["steps"] > 0 and r["seconds"] > 0 and 0 < r["final_fraction"] <= 1
        assert r["final_fraction"] == pytest.approx(r["coreset_size"] / n_forget, abs=1e-6)
        assert not any(k.endswith((".lr", ".epochs")) for k in json.loads(r["params"]))
    order = [r["verified"] is not True for r in rows]
    assert order == sorted(order)  # verified trials first
    md = (closed_sweep / "leaderboard.md").read_text()
    assert "| verified | steps | final coreset |" in md
