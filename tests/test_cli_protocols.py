"""``erasus-ray benchmark`` / ``erasus-ray evaluate`` (issue 17): protocol runs on the offline stand-in write a JSON
report, a Markdown table and plots; a saved model is evaluated; a gold model of another architecture is refused."""

from __future__ import annotations

import json

import torch

from erasus_ray.cli import main


def test_benchmark_general_writes_reports_and_plots(tmp_path, digits_class, capsys):
    out = tmp_path / "bench"
    # token_masking needs tokens: it is refused on the digits MLP, reported, and the rest still runs
    argv = ["benchmark", "--protocol", "general", "--strategy", "gradient_ascent,token_masking", "--n-runs", "2", "--out",
            str(out), "--no-progress"]
    assert main(argv) == 0
    doc = json.loads((out / "report.json").read_text())
    assert list(doc) == ["original", "gold", "gradient_ascent", "errors"] and list(doc["errors"]) == ["token_masking"]
    assert "token_masking did not run" in (out / "report.md").read_text()
    assert doc["gold"]["verdict"] == "PASS" and doc["original"]["verdict"] == "FAIL"
    ga = doc["gradient_ascent"]
    # one model per unlearning seed, mean +- std over them; the verdict is taken on the mean
    assert [r["model"] for r in ga["runs"]] == [0, 1] and ga["settings"]["strategy"] == "gradient_ascent"
    assert ga["metrics"]["forget_acc"] == sum(r["forget_acc"] for r in ga["runs"]) / 2
    assert "mia_epsilon" in ga["metrics"] and ga["metrics"]["forget_acc"] < doc["original"]["metrics"]["forget_acc"]
    table = (out / "report.md").read_text()
    assert "| gold | PASS |" in table and "+-" in table
    for plot in ("mia_roc.png", "tradeoff.png"):
        assert (out / plot).stat().st_size > 5_000
    assert "gradient_ascent" in capsys.readouterr().out


def test_evaluate_a_saved_model_and_refuse_another_architecture(tmp_path, digits_class, capsys):
    b = digits_class
    path = tmp_path / "original.pt"
    torch.save(b.original.state_dict(), path)
    out = tmp_path / "eval"
    assert main(["evaluate", "--protocol", "general", "--model", str(path), "--include-privacy", "--out", str(out)]) == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["model"]["verdict"] == "FAIL" and doc["model"]["metrics"]["forget_acc"] > 0.9
    assert doc["model"]["include_privacy"] and "mia_epsilon" in doc["model"]["metrics"]
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), other)
    assert main(["evaluate", "--protocol", "general", "--model", str(path), "--gold-model", str(other),
                 "--out", str(out)]) == 2
    assert "--gold-model" in capsys.readouterr().err


def test_seeds_table_aggregates_verdicts_and_mean_std_over_seed_folders(tmp_path):
    """benchmarks/protocols/seeds_table.py (the committed 3-seed leaderboards): verdicts in seed order, mean +- std
    (population std) of each metric, unlearning CPU seconds from smollm.py's timing rows, '-' where a seed lacks it."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "protocols" / "seeds_table.py"
    spec = importlib.util.spec_from_file_location("seeds_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for seed, (fq, verdict) in enumerate([(0.2, "PASS"), (0.6, "FAIL")]):
        d = tmp_path / f"s{seed}"
        d.mkdir()
        report = {"npo": {"verdict": verdict, "metrics": {"forget_quality": fq, "model_utility": 0.5}}}
        if seed == 0:
            report["rmu"] = {"verdict": "PASS", "metrics": {"forget_quality": 1.0, "model_utility": 0.4}}
        (d / "report.json").write_text(json.dumps(report))
        (d / "timings.json").write_text(json.dumps({"rows": [f"| npo | {verdict} | {fq} | 0.5 | 0 | 9 | 9 | 9 | 1 | {10 + 20 * seed} | 5 | 1 | 1 |"]}))
    out = mod.table([tmp_path / "s0", tmp_path / "s1"], ("forget_quality", "model_utility"))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in out.splitlines()[2:]}
    assert rows["npo"] == ["PASS / FAIL", "0.400 +- 0.200", "0.500 +- 0.000", "20 +- 10"]
    assert rows["rmu"] == ["PASS / -", "1.000", "0.400", "-"]
