"""Your own model and data, as files: this module is both the job's model factory and the script that writes them.

    python examples/own_data/own_data_model.py          # writes mlp.pt and samples.parquet here (~2 s)
    erasus-ray unlearn --config examples/own_data/job.yaml --no-progress

The data: scikit-learn's ``make_classification`` (4 classes, 10 features; none of the bundled benchmarks use it),
1200 rows with a ``sample_id`` column of non-contiguous ids (``50000 + 13 * i``) and a ``split`` column marking 20%
of the rows ``test`` (the job's held-out set). The model: a 10-64-4 MLP trained on the ``train`` rows. ``job.yaml``
forgets the training rows of class 2; ``erasus-ray`` imports :func:`make_mlp` from this file (it sits next to the YAML, so a folder
shipped with ``ray job submit --working-dir`` needs no install).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

N_FEATURES, N_CLASSES = 10, 4


def make_mlp(width: int = 64) -> nn.Module:
    """The module the checkpoint's state dict fits (the job's ``model.factory``)."""
    return nn.Sequential(nn.Linear(N_FEATURES, width), nn.ReLU(), nn.Linear(width, N_CLASSES))


def make_table(n: int = 1200, seed: int = 0):
    """The samples as a DataFrame: ``sample_id``, ``f0``..``f9``, ``label``, ``split`` (``train`` / ``test``)."""
    import pandas as pd
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=n, n_features=N_FEATURES, n_informative=6, n_redundant=2,
                               n_classes=N_CLASSES, n_clusters_per_class=1, class_sep=2.0, random_state=seed)
    split = np.where(np.random.default_rng(seed).random(n) < 0.2, "test", "train")
    return pd.DataFrame({"sample_id": 50000 + 13 * np.arange(n), **{f"f{j}": x[:, j].astype(np.float32)
                         for j in range(N_FEATURES)}, "label": y, "split": split})


def train(frame, epochs: int = 300, seed: int = 0) -> nn.Module:
    """Full-batch Adam on the ``train`` rows; cost: ~1 s on one CPU core."""
    torch.manual_seed(seed)
    rows = frame[frame["split"] == "train"]
    x = torch.tensor(rows[[f"f{j}" for j in range(N_FEATURES)]].to_numpy(), dtype=torch.float32)
    y = torch.tensor(rows["label"].to_numpy())
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def write_job_files(folder: str | Path) -> None:
    """Write ``mlp.pt`` (the trained model's state dict) and ``samples.parquet`` into ``folder``."""
    folder = Path(folder)
    frame = make_table()
    torch.save(train(frame).state_dict(), folder / "mlp.pt")
    frame.to_parquet(folder / "samples.parquet", index=False)


if __name__ == "__main__":
    write_job_files(Path(__file__).resolve().parent)
    print(f"wrote mlp.pt and samples.parquet to {Path(__file__).resolve().parent}")
