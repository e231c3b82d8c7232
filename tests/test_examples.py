"""The runnable example works end to end and unlearns what it says."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_example_runs():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(l for l in out.stdout.splitlines() if l.strip().startswith("unlearned:"))
    assert "forget acc 0.0" in line


#: each example folder: its script (which writes the job's files next to job.yaml) and what that script and the job write
EXAMPLES = {"own_data": ("own_data_model", ("mlp.pt", "samples.parquet")),
            "own_hf": ("own_hf_model", ("bert", "tokenizer", "texts"))}


def example_job(tmp_path: Path, name: str):
    """A copy of ``examples/<name>`` (its sources only) with the job's files written by the example's own script;
    returns ``(folder, module)``."""
    import importlib.util
    import shutil

    script, writes = EXAMPLES[name]
    folder = tmp_path / name
    shutil.copytree(ROOT / "examples" / name, folder, ignore=shutil.ignore_patterns(*writes, "out", "__pycache__"))
    spec = importlib.util.spec_from_file_location(script, folder / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_job_files(folder)
    return folder, module


def own_data_job(tmp_path: Path):
    """A copy of examples/own_data with its checkpoint and Parquet table written by the example's own module."""
    return example_job(tmp_path, "own_data")


def check_own_data_output(folder: Path, out: Path, module) -> None:
    """The unlearned checkpoint in ``out`` reloads into the example's module and forgot the class-2 training rows
    (in the table's ids), keeping the other training rows."""
    import json

    import pandas as pd
    import torch

    frame = pd.read_parquet(folder / "samples.parquet")
    doc = json.loads((out / "results.json").read_text())
    forget = (frame["label"] == 2) & (frame["split"] == "train")
    retain = (frame["label"] != 2) & (frame["split"] == "train")
    assert doc["data"]["forget_ids"] == frame.loc[forget, "sample_id"].tolist()  # the table's ids, not row positions
    assert set(doc["coreset"]["ids"]) <= set(frame.loc[forget, "sample_id"]) and doc["data"]["n_heldout"] == int(
        (frame["split"] == "test").sum())
    model = module.make_mlp()
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    x = torch.tensor(frame[[f"f{j}" for j in range(module.N_FEATURES)]].to_numpy(), dtype=torch.float32)
    with torch.no_grad():
        hit = (model(x).argmax(1).numpy() == frame["label"].to_numpy())
    assert doc["metrics_before"]["forget_acc"] > 0.9 and hit[forget.to_numpy()].mean() <= 0.05
    assert hit[retain.to_numpy()].mean() > 0.9 and doc["verified"] is True


def test_own_data_example_unlearns_its_checkpoint_and_parquet(tmp_path):
    from erasus_ray.cli import main

    folder, module = own_data_job(tmp_path)
    assert main(["unlearn", "--config", str(folder / "job.yaml"), "--no-progress"]) == 0
    check_own_data_output(folder, folder / "out", module)


@pytest.mark.parametrize("name, heading, unshown", [
    ("own_data", "Your own model and data, no Python", {"seed"}),
    ("own_hf", "A Hugging Face model and a `datasets` dataset", {"seed", "task", "strategy", "output"}),
])
def test_readme_example_yaml_is_the_example_job(name, heading, unshown):
    """The README's job YAML under ``heading`` says what examples/<name>/job.yaml does, key for key (the keys in
    ``unshown`` may be left out)."""
    import re

    import yaml

    text = (ROOT / "README.md").read_text()
    block = re.search(r"\*\*" + re.escape(heading) + r"\*\*.*?```yaml\n(.*?)```", text, re.S)
    assert block, f"README {name} YAML block not found"
    shown = yaml.safe_load(block.group(1))
    job = yaml.safe_load((ROOT / "examples" / name / "job.yaml").read_text())
    assert shown == {key: job[key] for key in shown} and set(job) - set(shown) <= unshown


def check_own_hf_output(folder: Path, out: Path) -> None:
    """The ``save_pretrained`` folder in ``out`` reloads with ``from_pretrained`` (model and tokenizer) and no longer
    predicts topic 2 on its sentences, train and test alike, while the other topics' train and held-out rows keep
    their accuracy; results.json speaks in the saved dataset's ``doc`` ids and says the class target held."""
    import json

    import numpy as np
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer, BertForSequenceClassification

    rows = load_from_disk(str(folder / "texts")).to_pandas()
    doc = json.loads((out / "results.json").read_text())
    forget = (rows["label"] == 2).to_numpy()
    heldout = ((rows["split"] == "test") & (rows["label"] != 2)).to_numpy()
    assert doc["config"]["task"] == "classification" and doc["model_file"] == "model"
    assert doc["data"]["forget_ids"] == rows.loc[forget, "doc"].tolist()  # the dataset's ids, not row positions
    assert set(doc["coreset"]["ids"]) <= set(doc["data"]["forget_ids"]) and doc["data"]["n_heldout"] == heldout.sum()
    before, after = doc["metrics_before"], doc["metrics_after"]
    # forget accuracy from the held-out level (the model knew topic 2) down to the rate other topics are called 2
    assert before["forget_acc"] > 0.9 and before["test_acc"] > 0.9 and after["forget_acc"] <= 0.1
    assert after["retain_acc"] >= before["retain_acc"] - 0.02 and after["test_acc"] >= before["test_acc"] - 0.02
    assert doc["verified"] is True and "class" in doc["verification"]["why"]
    model = BertForSequenceClassification.from_pretrained(out / "model", local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model", local_files_only=True)
    enc = tokenizer(rows["text"].tolist(), padding=True, return_tensors="pt")
    with torch.no_grad():
        hit = model(**enc).logits.argmax(1).numpy() == rows["label"].to_numpy()
    assert hit[forget].mean() <= 0.1 and hit[~forget].mean() >= 0.9
    assert np.isclose(hit[heldout].mean(), after["test_acc"])  # the reloaded folder is the model that was measured


def test_own_hf_example_unlearns_its_hf_folder_and_saved_dataset(tmp_path):
    from erasus_ray.cli import main

    folder, _ = example_job(tmp_path, "own_hf")
    assert main(["unlearn", "--config", str(folder / "job.yaml"), "--no-progress"]) == 0
    check_own_hf_output(folder, folder / "out")
