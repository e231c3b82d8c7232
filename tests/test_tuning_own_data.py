"""Tune sweeps over the user's own job config (``job:`` in a sweep YAML): no gold model; each trial's ``avg_gap`` is
measured against the held-out reference (:mod:`erasus_ray.tuning.own_data`), and the sweep writes the same
leaderboard files as a benchmark sweep."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from erasus_ray.cli import main
from erasus_ray.errors import InvalidConfigError
from erasus_ray.tuning import SweepConfig
from erasus_ray.tuning.leaderboard import read_csv
from erasus_ray.tuning.own_data import loaded_job, own_reference_info
from erasus_ray.tuning.sweep import evaluate_trial

from test_jobs_own_data import mlp_job  # noqa: F401  (fixture: trained MLP checkpoint, factory module, CSV)

SWEEP = {"name": "own", "loop": "closed", "target": "auto", "budget_steps": 200, "strategies": ["grad_diff", "gradient_ascent"],
         "selectors": ["el2n"], "runner": {"retain_batch_size": 128}, "num_samples": 2, "max_concurrent": 2,
         "top_k": 1, "rerun_seeds": [1]}


@pytest.fixture
def own_sweep(mlp_job):
    """The MLP + CSV job (forget class 2) with held-out rows, and a sweep YAML beside it naming it by a relative path."""
    folder, job, data, frame = mlp_job
    job = {**job, "data": {**job["data"], "heldout": {"where": "label != 2 and sample_id >= 3400"}}}
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    (folder / "sweep.yaml").write_text(yaml.safe_dump({**SWEEP, "job": "job.yaml", "storage_path": str(folder / "sweeps")}))
    return folder, job, data


def test_sweep_config_names_a_job_and_checks_it_before_ray(own_sweep):
    folder, job, _ = own_sweep
    cfg = SweepConfig.from_yaml(folder / "sweep.yaml")
    assert cfg.own_data and cfg.job == str(folder / "job.yaml") and cfg.task_name() == "classification"
    assert cfg.strategy_names() == ["grad_diff", "gradient_ascent"]
    for change, message in ((lambda j: j["data"].pop("heldout"), r"job: .*no data.heldout"),
                            (lambda j: j.update(data={**j["data"], "streaming": True}, selector="loss", k=5), r"job: .*streams its data"),
                            (lambda j: j["data"].update(forget={"clas": 2}), r"job: .*data.forget: unknown key")):
        bad = json.loads(json.dumps(job))
        change(bad)
        (folder / "bad.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises(InvalidConfigError, match=message):
            SweepConfig.from_dict({**SWEEP, "job": str(folder / "bad.yaml")})
    with pytest.raises(InvalidConfigError, match=r"job: .*not a job config file"):
        SweepConfig.from_dict({**SWEEP, "job": str(folder / "missing.yaml")})


def test_a_trial_is_measured_against_the_held_out_reference_not_a_gold_model(own_sweep):
    folder, _, _ = own_sweep
    cfg = SweepConfig.from_yaml(folder / "sweep.yaml")
    reference, refs = own_reference_info(cfg.job, cfg.seed)
    original = refs[0]["metrics"]
    # a whole class is forgotten: its accuracy should go to 0; retain and held-out accuracy should stay the original's
    assert reference == {"forget_acc": 0.0, "retain_acc": original["retain_acc"], "test_acc": original["test_acc"]}
    assert original["forget_acc"] > 0.9 and refs[0]["avg_gap"] == pytest.approx(
        (original["forget_acc"] + 0 + 0) / 3, abs=1e-6)
    row = evaluate_trial({"strategy": "grad_diff", "selector": "el2n", "fraction": "auto", "seed": 0}, cfg.to_dict(), reference)
    assert row["mode"] == "closed_loop" and row["verified"] is True and row["n_forget"] == 100
    assert row["metrics"]["forget_acc"] <= 0.1 and row["avg_gap"] < refs[0]["avg_gap"] / 3
    assert row["avg_gap"] == pytest.approx(sum(row["metrics"][f"gap_{k}"] for k in reference) / 3)
    assert loaded_job(cfg.job)[1].model is not None  # the cached original is untouched: its forget accuracy stays
    again, _ = own_reference_info(cfg.job, cfg.seed)
    assert again == reference


@pytest.mark.slow
def test_cli_sweep_over_a_users_job_writes_the_leaderboard(own_sweep, ray_cluster):
    folder, _, _ = own_sweep
    assert main(["sweep", "--config", str(folder / "sweep.yaml"), "--name", "s"]) == 0
    sweep_dir = folder / "sweeps" / "s"
    for name in ("leaderboard.csv", "leaderboard.md", "pareto.png", "sweep.json", "reruns.json"):
        assert (sweep_dir / name).exists(), name
    rows = read_csv(sweep_dir / "leaderboard.csv")
    assert [r["label"] for r in rows if r["kind"] == "reference"] == ["original"]  # no retrain row: there is no gold
    trials = [r for r in rows if r["kind"] == "trial"]
    assert len(trials) == 2 and {r["strategy"] for r in trials} <= {"grad_diff", "gradient_ascent"}
    original = next(r for r in rows if r["kind"] == "reference")
    for r in trials:
        assert r["status"] == "ok" and r["mode"] == "closed_loop" and math.isfinite(r["avg_gap_pts"])
        assert r["avg_gap_pts"] < original["avg_gap_pts"]  # every trial forgot class 2 better than doing nothing
    assert trials[0]["rerun_seeds"] == "1"
    md = (sweep_dir / "leaderboard.md").read_text()
    assert "job `" in md and "held-out reference" in md and "retrained model's metric" not in md


def test_the_example_sweep_names_the_example_job(tmp_path):
    from test_examples import own_data_job

    folder, _ = own_data_job(tmp_path)
    cfg = SweepConfig.from_yaml(folder / "sweep.yaml")
    assert cfg.job == str(folder / "job.yaml") and cfg.closed_loop and cfg.task_name() == "classification"
    reference, refs = own_reference_info(cfg.job, cfg.seed)
    assert reference["forget_acc"] == 0.0 and refs[0]["metrics"]["forget_acc"] > 0.5  # class 2 is the example's forget set
