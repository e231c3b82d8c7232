"""The erasus 0.2 README's snippets that users reach for first, each run as written there (adapted to our names)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from erasus_ray import ErasusUnlearner
from erasus_ray.errors import InvalidConfigError
from erasus_ray.fabric import compute_forgetting_quality, select_coreset

ROOT = Path(__file__).resolve().parents[1]


def _data(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return TensorDataset(x, y)


class Switchable(nn.Module):
    """A classifier with a Hugging Face-style checkpointing switch; records the switch's state at each forward."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4))
        self.checkpointing, self.seen = False, []

    def forward(self, x):
        self.seen.append(self.checkpointing)
        return self.net(x)

    def gradient_checkpointing_enable(self, **kwargs):
        self.checkpointing = True

    def gradient_checkpointing_disable(self):
        self.checkpointing = False


def test_fit_accepts_gradient_checkpointing_as_the_seed_passed_it():
    data = _data()
    model = Switchable()
    unlearner = ErasusUnlearner(model, strategy="gradient_ascent", selector=None, fraction=None, inplace=True, progress=False)
    result = unlearner.fit(forget_data=DataLoader(torch.utils.data.Subset(data, range(8))), retain_data=None, epochs=1,
                           gradient_checkpointing=True)
    assert True in model.seen and not model.checkpointing  # on while unlearning, handed back off
    assert result.config["gradient_checkpointing"] is True and result.config["runner"]["gradient_checkpointing"] is True
    plain = ErasusUnlearner(nn.Linear(4, 4), strategy="gradient_ascent", selector=None, fraction=None, progress=False)
    with pytest.raises(InvalidConfigError, match="gradient_checkpointing=True needs a model"):
        plain.fit(forget_data=torch.utils.data.Subset(data, range(8)), epochs=1, gradient_checkpointing=True)


def test_select_coreset_is_iterable_and_indexable_over_ids():
    data = _data()
    forget = torch.utils.data.Subset(data, [3, 9, 17, 21, 40, 41, 50, 63])
    indices = select_coreset("el2n", nn.Linear(4, 4), DataLoader(forget), k=3)
    assert len(indices) == 3 and list(indices) == indices.ids.tolist() and indices[0] == int(indices.ids[0])
    assert indices[-1] == int(indices.ids[-1]) and indices[:2] == indices.ids[:2].tolist()
    assert set(indices) <= {3, 9, 17, 21, 40, 41, 50, 63}  # dataset ids, not positions in the loader


def test_compute_forgetting_quality_is_our_evaluation():
    data = _data()
    model = nn.Linear(4, 4)
    forget, retain = torch.utils.data.Subset(data, range(16)), torch.utils.data.Subset(data, range(16, 64))
    quality = compute_forgetting_quality(model, DataLoader(forget))
    with torch.no_grad():
        x, y = data.tensors
        expected = float((model(x[:16]).argmax(1) == y[:16]).float().mean())
    assert quality["forget_acc"] == pytest.approx(expected) and "retain_acc" not in quality
    full = compute_forgetting_quality(model, forget, retain, retain, gold=nn.Linear(4, 4))
    assert {"retain_acc", "test_acc", "mia_loss_auc", "avg_gap", "gap_forget_acc"} <= set(full)


def test_full_extra_is_all():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["full"] == ["erasus-ray[all]"]


def test_fl_request_ledger_creates_its_folder(tmp_path, capsys):
    pytest.importorskip("sqlalchemy")
    from erasus_ray.cli import main
    from erasus_ray.federated.messages import FederationSpec
    from erasus_ray.federated.partition import load_federation

    own = load_federation(FederationSpec(n_clients=10)).partitions["client-2"].tolist()
    db = tmp_path / "new-dir" / "deeper" / "ledger.db"
    code = main(["fl", "request", "--client", "client-2", "--ledger", f"sqlite:///{db}", "--ids", str(own[0])])
    assert code == 0 and db.is_file()
    assert json.loads(capsys.readouterr().out.strip())["state"] == "validated"


def test_module_forget_step_indexes_the_batch_like_a_tuple():
    from erasus_ray import UnlearningModule, UnlearningTrainer

    class SeedModule(UnlearningModule):  # the seed README's module, verbatim but for the imports
        def __init__(self, model, lr=1e-2):
            super().__init__(model)
            self.save_hyperparameters(ignore=["model"])

        def forget_step(self, batch, batch_idx):
            return -F.cross_entropy(self.model(batch[0]), batch[1])

        def retain_step(self, batch, batch_idx):
            return F.cross_entropy(self.model(batch[0]), batch[1])

    data = _data()
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    forget = torch.utils.data.Subset(data, range(16))
    before = F.cross_entropy(model(data.tensors[0][:16]), data.tensors[1][:16]).item()
    result = UnlearningTrainer(epochs=3, validate_every=None).fit(
        SeedModule(model), DataLoader(forget, batch_size=8), DataLoader(torch.utils.data.Subset(data, range(16, 64)), batch_size=8))
    after = F.cross_entropy(result.model(data.tensors[0][:16]), data.tensors[1][:16]).item()
    assert after > before + 0.05  # the ascent on batch[0]/batch[1] ran


def test_batch_indexing_names_what_it_holds():
    from erasus_ray.data import Batch

    pair = Batch(ids=torch.tensor([7, 9]), data=(torch.zeros(2, 3), torch.tensor([1, 0])))
    x, y = pair
    assert pair[0] is x and pair[1].tolist() == [1, 0]
    tokens = Batch(ids=torch.tensor([7]), data={"input_ids": torch.ones(1, 4, dtype=torch.long)})
    assert tokens["input_ids"].shape == (1, 4)
    with pytest.raises(TypeError, match="dict data by key"):
        tokens[0]
