"""The runnable example works end to end and unlearns what it says."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_example_runs():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(l for l in out.stdout.splitlines() if l.strip().startswith("unlearned:"))
    assert "forget acc 0.0" in line


def own_data_job(tmp_path: Path):
    """A copy of examples/own_data with its checkpoint and CSV written by the example's own module."""
    import importlib.util
    import shutil

    folder = tmp_path / "own_data"
    shutil.copytree(ROOT / "examples" / "own_data", folder, ignore=shutil.ignore_patterns("mlp.pt", "samples.csv", "out"))
    spec = importlib.util.spec_from_file_location("own_data_model", folder / "own_data_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_job_files(folder)
    return folder, module


def check_own_data_output(folder: Path, out: Path, module) -> None:
    """The unlearned checkpoint in ``out`` reloads into the example's module and forgot the class-2 training rows
    (in the CSV's ids), keeping the other training rows."""
    import json

    import pandas as pd
    import torch

    frame = pd.read_csv(folder / "samples.csv")
    doc = json.loads((out / "results.json").read_text())
    forget = (frame["label"] == 2) & (frame["split"] == "train")
    retain = (frame["label"] != 2) & (frame["split"] == "train")
    assert doc["data"]["forget_ids"] == frame.loc[forget, "sample_id"].tolist()  # the CSV's ids, not row positions
    assert set(doc["coreset"]["ids"]) <= set(frame.loc[forget, "sample_id"]) and doc["data"]["n_heldout"] == int(
        (frame["split"] == "test").sum())
    model = module.make_mlp()
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    x = torch.tensor(frame[[f"f{j}" for j in range(module.N_FEATURES)]].to_numpy(), dtype=torch.float32)
    with torch.no_grad():
        hit = (model(x).argmax(1).numpy() == frame["label"].to_numpy())
    assert doc["metrics_before"]["forget_acc"] > 0.9 and hit[forget.to_numpy()].mean() <= 0.05
    assert hit[retain.to_numpy()].mean() > 0.9 and doc["verified"] is True


def test_own_data_example_unlearns_its_checkpoint_and_csv(tmp_path):
    from erasus_ray.cli import main

    folder, module = own_data_job(tmp_path)
    assert main(["unlearn", "--config", str(folder / "job.yaml"), "--no-progress"]) == 0
    check_own_data_output(folder, folder / "out", module)


def test_readme_own_data_yaml_is_the_example_job():
    """The README's job YAML ("Your own model and data") says what examples/own_data/job.yaml does, key for key."""
    import re

    import yaml

    text = (ROOT / "README.md").read_text()
    block = re.search(r"\*\*Your own model and data, no Python\*\*.*?```yaml\n(.*?)```", text, re.S)
    assert block, "README own-data YAML block not found"
    shown = yaml.safe_load(block.group(1))
    job = yaml.safe_load((ROOT / "examples" / "own_data" / "job.yaml").read_text())
    assert shown == {key: job[key] for key in shown} and set(job) - set(shown) <= {"seed"}
