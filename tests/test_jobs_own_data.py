"""Jobs on the user's own model and data (``erasus-ray unlearn --config`` with ``model:`` / ``data:``): a torch
checkpoint + CSV / Parquet / npz, a Hugging Face folder, and the config checks that fail before any work."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from erasus_ray.cli import main
from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.jobs import UserJobConfig
from erasus_ray.jobs.rows import where_mask
from erasus_ray.jobs.tables import Table

FACTORY = textwrap.dedent('''
    from torch import nn

    def make_mlp(width=32):
        return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 4))
''')


def _blobs(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4 separable Gaussian classes in 6-D; ids non-contiguous (1000 + 7 i), so ids are never row positions."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    centres = rng.normal(0, 3, size=(4, 6))
    x = (centres[y] + rng.normal(0, 1, size=(n, 6))).astype(np.float32)
    return 1000 + 7 * np.arange(n), x, y


def _trained_mlp(x: np.ndarray, y: np.ndarray) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model


def _accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.as_tensor(x)).argmax(1).numpy() == y).mean())


@pytest.fixture
def mlp_job(tmp_path):
    """A trained MLP checkpoint, its factory module and the data as a CSV, all written to ``tmp_path``."""
    ids, x, y = _blobs()
    model = _trained_mlp(x, y)
    torch.save(model.state_dict(), tmp_path / "mlp.pt")
    (tmp_path / "own_mlp_models.py").write_text(FACTORY)
    import pandas as pd

    frame = pd.DataFrame({"sample_id": ids, **{f"f{j}": x[:, j] for j in range(6)}, "label": y})
    frame.to_csv(tmp_path / "samples.csv", index=False)
    job = {"model": {"path": "mlp.pt", "factory": "own_mlp_models:make_mlp"},
           "data": {"path": "samples.csv", "id_column": "sample_id", "label_column": "label", "forget": {"class": 2}},
           "strategy": "grad_diff", "selector": None, "fraction": 1.0, "output": "out",
           "runner": {"retain_batch_size": 128}}
    return tmp_path, job, (ids, x, y, model), frame


def _write(folder, job, name="job.yaml"):
    path = folder / name
    path.write_text(yaml.safe_dump(job))
    return path


def test_checkpoint_and_csv_forget_a_class_through_the_cli(mlp_job):
    folder, job, (ids, x, y, original), _ = mlp_job
    assert main(["unlearn", "--config", str(_write(folder, job)), "--no-progress"]) == 0
    doc = json.loads((folder / "out" / "results.json").read_text())
    reloaded = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4))
    reloaded.load_state_dict(torch.load(folder / "out" / "model.pt", weights_only=True))
    forget, retain = y == 2, y != 2
    # the saved model forgot class 2 (from near-perfect to near-zero) and kept the other classes
    assert _accuracy(original, x[forget], y[forget]) > 0.9
    assert _accuracy(reloaded, x[forget], y[forget]) <= 0.1
    assert _accuracy(reloaded, x[retain], y[retain]) > 0.85
    # the results speak in the CSV's ids, not row positions
    assert doc["data"]["forget_ids"] == ids[forget].tolist()
    assert sorted(doc["coreset"]["ids"]) == ids[forget].tolist()
    assert doc["verification"]["target"] == "class" and doc["verified"] is not False
    assert doc["metrics_before"]["forget_acc"] - doc["metrics_after"]["forget_acc"] > 0.8
    assert doc["model_file"] == "model.pt" and (folder / "out" / "metrics.png").stat().st_size > 5000


def test_parquet_npz_and_filter_forget_keep_the_data_ids(mlp_job):
    folder, job, (ids, x, y, _), frame = mlp_job
    frame.to_parquet(folder / "samples.parquet")
    np.savez(folder / "samples.npz", sample_id=ids, x=x, label=y)
    wanted = ids[(y == 1) & (x[:, 0] > 0)]
    for path, forget in (("samples.parquet", {"where": "label == 1 and f0 > 0"}), ("samples.npz", {"ids": wanted.tolist()})):
        job = {**job, "data": {**job["data"], "path": path, "forget": forget}, "output": f"out-{path}",
               "fraction": 0.5, "selector": "el2n", "runner": {"epochs": 2, "lr": 1e-3}}
        assert main(["unlearn", "--config", str(_write(folder, job)), "--no-progress"]) == 0
        doc = json.loads((folder / f"out-{path}" / "results.json").read_text())
        assert doc["data"]["forget_ids"] == wanted.tolist()
        assert set(doc["coreset"]["ids"]) < set(wanted.tolist()) and len(doc["coreset"]["ids"]) == (len(wanted) + 1) // 2


def test_coreset_flags_override_the_selector_and_k(mlp_job):
    folder, job, (ids, x, y, _), _ = mlp_job
    job = {**job, "runner": {"epochs": 1, "lr": 1e-3}}
    assert main(["unlearn", "--config", str(_write(folder, job)), "--no-progress", "--coreset-from", "loss",
                 "--coreset-k", "7"]) == 0
    doc = json.loads((folder / "out" / "results.json").read_text())
    assert doc["config"]["selector"] == "loss" and len(doc["coreset"]["ids"]) == 7
    assert set(doc["coreset"]["ids"]) <= set(ids[y == 2].tolist())


@pytest.mark.parametrize("change, message", [
    (lambda j: j.update(modle={}), r"unknown key\(s\) \['modle'\].*'model'"),
    (lambda j: j["data"].update(path="missing.csv"), r"data.path: .*missing.csv does not exist"),
    (lambda j: j["model"].update(factory="no_such_module_xyz:make"), r"model.factory: .*no_such_module_xyz"),
    (lambda j: j["model"].update(factory="own_mlp_models:nothing"), r"model.factory: .*no attribute 'nothing'"),
    (lambda j: j["data"].update(forget={"clas": 2}), r"data.forget: unknown key\(s\) \['clas'\]"),
    (lambda j: j["data"].pop("id_column"), r"data.id_column: required"),
    (lambda j: j.update(strategy_params={"bogus": 1}), r"strategy_params"),
])
def test_bad_configs_fail_before_work_naming_the_key_and_file(mlp_job, change, message):
    folder, job, _, _ = mlp_job
    change(job)
    path = _write(folder, job)
    with pytest.raises(InvalidConfigError, match=message) as err:
        UserJobConfig.from_yaml(path)
    assert "job.yaml" in str(err.value)
    assert main(["unlearn", "--config", str(path), "--no-progress"]) == 2 and not (folder / "out").exists()


@pytest.mark.parametrize("change, message", [
    (lambda j, f: (f.assign(sample_id=f["sample_id"] % 5).to_csv(j["_dir"] / "samples.csv", index=False)),
     r"data.id_column: column 'sample_id' is not unique"),
    (lambda j, f: j["data"].update(forget=[1000, 1001, 5]), r"data.forget.ids: 2 id\(s\) are not in the data: \[5, 1001\]"),
])
def test_data_errors_name_the_key(mlp_job, change, message, capsys):
    folder, job, _, frame = mlp_job
    change({**job, "_dir": folder}, frame)
    from erasus_ray.jobs import run_user_job

    with pytest.raises(InvalidDataError, match=message):
        run_user_job(UserJobConfig.from_yaml(_write(folder, job)), progress=False)
    assert main(["unlearn", "--config", str(folder / "job.yaml"), "--no-progress"]) == 2
    assert "erasus-ray: error: data." in capsys.readouterr().err and not (folder / "out").exists()


def test_filter_grammar_is_parsed_not_evaluated():
    table = Table({"age": np.array([10, 70, 80]), "site": np.array(["a", "b", "a"])}, "t")
    assert where_mask("age > 60 and site == 'a'", table, "k").tolist() == [False, False, True]
    assert where_mask("not (site in ['b'])", table, "k").tolist() == [True, False, True]
    assert where_mask("18 <= age < 75", table, "k").tolist() == [False, True, False]
    for bad in ("__import__('os').system('true')", "age.sum() > 0", "age + 1 > 3"):
        with pytest.raises(InvalidConfigError, match="not allowed in a filter"):
            where_mask(bad, table, "data.forget.where")


def _save_arrow_dataset(folder, columns):
    """A folder in the layout ``datasets.Dataset.save_to_disk`` writes (state.json + Arrow IPC stream files)."""
    import pyarrow as pa

    folder.mkdir()
    table = pa.table(columns)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (folder / "dataset_info.json").write_text("{}")


def test_hf_folder_and_saved_dataset_unlearn_and_reload(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=48, n_positions=32, bos_token_id=0, eos_token_id=0,
                     pad_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    rng = np.random.default_rng(0)
    ids = (50 + 3 * np.arange(24)).tolist()
    _save_arrow_dataset(tmp_path / "texts", {"doc_id": ids, "input_ids": [rng.integers(1, 48, 8).tolist() for _ in ids]})
    job = {"model": {"path": "gpt2"}, "data": {"path": "texts", "id_column": "doc_id", "forget": ids[:6]},
           "strategy": "gradient_ascent", "selector": None, "fraction": 1.0, "runner": {"epochs": 3, "lr": 5e-3},
           "output": "out"}
    assert main(["unlearn", "--config", str(_write(tmp_path, job)), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["config"]["task"] == "causal_lm" and doc["model_file"] == "model"
    assert doc["data"]["forget_ids"] == ids[:6] and sorted(doc["coreset"]["ids"]) == ids[:6]
    # gradient ascent raised the forget loss; the folder reloads as the same class with the unlearned weights
    assert doc["metrics_after"]["forget_loss"] > doc["metrics_before"]["forget_loss"] + 0.1
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "out" / "model", local_files_only=True)
    original = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2", local_files_only=True)
    assert not torch.equal(reloaded.lm_head.weight, original.lm_head.weight)


def test_t5_folder_and_jsonl_go_through_task_auto(tmp_path):
    """A saved tiny T5 is picked up by ``task: auto`` as seq2seq (encoder input_ids, decoder labels)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                                        num_heads=2, pad_token_id=0, decoder_start_token_id=0, eos_token_id=1)
                               ).save_pretrained(tmp_path / "t5")
    rng = np.random.default_rng(0)
    rows = [{"id": 10 + i, "input_ids": rng.integers(2, 40, 6).tolist(), "labels": rng.integers(2, 40, 4).tolist()}
            for i in range(20)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = {"model": {"path": "t5"}, "data": {"path": "pairs.jsonl", "id_column": "id", "forget": [10, 11, 12, 13]},
           "strategy": "gradient_ascent", "selector": None, "fraction": 1.0, "runner": {"epochs": 3, "lr": 5e-3},
           "output": "out"}
    assert main(["unlearn", "--config", str(_write(tmp_path, job)), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["config"]["task"] == "seq2seq" and (tmp_path / "out" / "model" / "config.json").is_file()
    assert doc["metrics_after"]["forget_loss"] > doc["metrics_before"]["forget_loss"] + 0.3
    assert abs(doc["metrics_after"]["retain_loss"] - doc["metrics_before"]["retain_loss"]) < 0.3
