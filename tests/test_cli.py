"""The command line: the demo writes its table, JSON and plot; configs are validated before work starts."""

import json

import pytest
import yaml

from erasus_ray.cli import main
from erasus_ray.errors import InvalidConfigError, UnknownNameError
from erasus_ray.experiment import JobConfig


def test_demo_writes_results_and_plot(tmp_path, digits_class, capsys, ray_cluster):
    # The demo scores the coreset on the Ray actor pool by default (here: the session's local cluster).
    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    labels = [r["label"] for r in doc["rows"]]
    assert labels == ["original", "retrain (gold)", "grad_diff full", "grad_diff el2n auto"]
    full, core = doc["rows"][2], doc["rows"][3]
    # both closed-loop and verified on the class; the adaptive coreset starts at 5% (8 of 146) and stays small there
    assert full["verified"] is True and core["verified"] is True and core["verification"]["target"] == "class"
    assert core["verification"]["coreset_growth"][0] == 8 and core["coreset_size"] <= 30
    assert core["metrics"]["forget_acc"] <= 0.05 and full["metrics"]["forget_acc"] <= 0.05
    assert doc["rows"][1]["metrics"]["avg_gap"] == 0.0 and doc["rows"][0]["metrics"]["avg_gap"] > 0.3
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "Avg.Gap" in out and "verified" in out and "coreset end-to-end" in out and "on the warm Ray scoring pool" in out
    assert "cluster start-up: local Ray and" in out and doc["cluster_startup_s"] > 0  # on its own line, not in select s
    assert doc["config"]["execution"] == {"distributed": "ray"}


def test_demo_no_ray_scores_in_process(tmp_path, digits_class, capsys):
    assert main(["demo", "--out", str(tmp_path), "--no-progress", "--no-ray"]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["config"]["execution"] == {"distributed": "none"}
    assert doc["rows"][3]["metrics"]["forget_acc"] <= 0.05
    assert "in process" in capsys.readouterr().out


def test_execution_key_is_validated():
    with pytest.raises(InvalidConfigError, match="execution"):
        JobConfig.from_dict({"execution": {"workers": 2}})
    with pytest.raises(InvalidConfigError, match="execution.backend"):
        JobConfig.from_dict({"execution": {"backend": "spark"}})


def test_unlearn_config(tmp_path, digits_class):
    cfg = {"benchmark": "digits", "scenario": "class", "strategy": "npo", "selector": "random", "fraction": 0.2,
           "runner": {"epochs": 5}, "output": str(tmp_path / "out")}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["unlearn", "--config", str(path), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["config"]["strategy"] == "npo" and len(doc["coreset"]["ids"]) == 30
    assert "avg_gap" in doc["metrics"] and (tmp_path / "out" / "model.pt").exists()


@pytest.mark.parametrize(
    "cfg, match, exc",
    [
        ({"strategy": "scrubb"}, "scrub|Known strategy", UnknownNameError),
        ({"fraction": 1.5}, "fraction", InvalidConfigError),
        ({"benchmark": "cifar10"}, "benchmark", InvalidConfigError),
        ({"runner": {"learning_rate": 1}}, "runner", InvalidConfigError),
        ({"strateg": "npo"}, "strateg", InvalidConfigError),
    ],
)
def test_bad_configs_fail_naming_the_key(cfg, match, exc):
    with pytest.raises(exc, match=match):
        JobConfig.from_dict(cfg)


def test_cli_reports_errors_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("fraction: 0\n")
    assert main(["unlearn", "--config", str(path)]) == 2
    assert "fraction" in capsys.readouterr().err


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "grad_diff" in out and "el2n" in out and "digits" in out


def test_list_requires_shows_the_capability_contract(capsys):
    """One line per task (what it provides) and per algorithm / metric (what it needs), from the declarations."""
    import re

    assert main(["list", "--requires"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^task +denoising +provides independent, loss$", out, re.M)
    assert re.search(r"^strategy +npo +needs logits$", out, re.M)
    assert re.search(r"^strategy +dpo +needs logits labels\|tokens$", out, re.M)  # one of labels / tokens
    assert re.search(r"^selector +loss +needs loss$", out, re.M)
    assert re.search(r"^metric +forget_acc +needs logits$", out, re.M)


def test_demo_task_diffusion_runs_the_diffusion_benchmark_with_its_defaults(monkeypatch):
    """--task diffusion is the digits_diffusion benchmark with its demo defaults (a loss selector: el2n needs logits;
    target generation, so the job gives fit the gold model)."""
    import erasus_ray.cli.demo as demo
    from erasus_ray.experiment import GOLD_TARGETS

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kw: seen.update(kw))
    assert main(["demo", "--task", "diffusion", "--no-progress", "--no-ray"]) == 0
    assert seen["benchmark"] == "digits_diffusion" and seen["selector"] == "loss"
    cfg = JobConfig.from_dict({"benchmark": "digits_diffusion", "selector": "loss"})
    assert cfg.target == "generation" and cfg.target in GOLD_TARGETS and cfg.strategy == "grad_diff"
    assert JobConfig.from_dict({"benchmark": "digits"}).target == "auto"  # the other demos are unchanged
    with pytest.raises(InvalidConfigError, match="target"):
        JobConfig.from_dict({"benchmark": "digits", "target": "nonsense"})


def test_demo_task_clip_llava_and_their_task_family_names_run_the_vlm_benchmarks(monkeypatch):
    """--task clip is the clip benchmark (also reached by its adapter's name, contrastive), with contrastive
    unlearning and an el2n coreset by default."""
    import erasus_ray.cli.demo as demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kw: seen.update(kw))
    for name in ("clip", "contrastive"):
        assert main(["demo", "--task", name, "--no-progress", "--no-ray"]) == 0
        assert seen["benchmark"] == "clip" and seen["selector"] == "el2n"
    assert JobConfig.from_dict({"benchmark": "clip"}).strategy == "contrastive_unlearning"
    for name in ("llava", "vision_causal_lm"):  # the generative VLM: no class labels, so the loop runs against gold,
        assert main(["demo", "--task", name, "--no-progress", "--no-ray"]) == 0  # on whole answers
        assert seen["benchmark"] == "llava"
    assert JobConfig.from_dict({"benchmark": "llava"}).target == "gold_exact"


@pytest.mark.slow
def test_demo_clip_forgets_the_concept_close_to_the_gold_model(tmp_path):
    """The CLIP demo (class 3 of 1797 captioned digits, seed 0; ~40 s on one CPU core, measured Avg.Gap 0.4 pts full
    / 0.8 pts with 13 of 146 pairs, original 48.5): both runs verified, forget zero-shot accuracy at gold's 0."""
    assert main(["demo", "--task", "clip", "--out", str(tmp_path), "--no-progress", "--no-ray"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows][2:] == ["contrastive_unlearning full", "contrastive_unlearning el2n auto"]
    for row in rows[2:]:
        assert row["verified"] and row["metrics"]["forget_acc"] <= 0.05
        assert row["metrics"]["avg_gap"] < 0.05, row["metrics"]["avg_gap"]  # a fraction: 0.004 / 0.008 measured


@pytest.mark.slow
def test_demo_diffusion_stops_on_the_judged_rate(tmp_path):
    """The diffusion demo (digits_diffusion seed 0, cached under ERASUS_RAY_CACHE; ~5 min on one CPU core): both runs
    closed-loop on the generation target, and verified: the erased class's judged rate at the gold model's level
    while the other classes keep their judged accuracy (the open-loop grad_diff defaults take it to 0.08)."""
    assert main(["demo", "--task", "diffusion", "--out", str(tmp_path), "--no-progress", "--no-ray"]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [r["label"] for r in doc["rows"]] == ["original", "retrain (gold)", "grad_diff full", "grad_diff loss auto"]
    for row in doc["rows"][2:]:
        v = row["verification"]
        assert v["mode"] == "closed_loop" and v["target"] == "generation" and row["verified"] is True, v
        assert row["metrics"]["erased_generation_rate"] <= v["bound"]
        assert row["metrics"]["retained_generation_acc"] >= doc["rows"][0]["metrics"]["retained_generation_acc"] - 0.1


def test_demo_table_shows_frechet_distances_as_they_are(capsys):
    """A Frechet distance is not a rate: the demo's table must not print it x100 as 'points'."""
    from erasus_ray.cli.report import print_table

    rows = [{"label": "gold", "metrics": {"retained_frechet": 9.27, "retained_generation_acc": 0.979, "avg_gap": 0.0},
             "timings": {"total": 1.0}, "coreset_size": 0}]
    print_table(rows, ["retained_frechet", "retained_generation_acc"], "t")
    out = capsys.readouterr().out
    assert "9.270" in out and "97.9" in out and "927.0" not in out
