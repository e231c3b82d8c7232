"""Unlearn one digit class from your own model and data with ErasusUnlearner, then check it against retraining.

    python examples/quickstart.py

Everything is offline: scikit-learn's digits, a small MLP trained here in ~2 s.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from erasus_ray import ErasusUnlearner, evaluate
from erasus_ray.data import as_id_dataset
from erasus_ray.tasks import ClassificationTask
from erasus_ray.training import TrainRecipe, train_model

torch.set_num_threads(1)
digits = load_digits()
data = TensorDataset(torch.tensor(digits.data / 16.0, dtype=torch.float32), torch.tensor(digits.target))
rng = np.random.default_rng(0)
test_ids = rng.choice(len(data), 360, replace=False)
train_ids = np.setdiff1d(np.arange(len(data)), test_ids)
forget_ids = train_ids[digits.target[train_ids] == 7]  # "forget every 7"
retain_ids = np.setdiff1d(train_ids, forget_ids)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


task = ClassificationTask()
recipe = TrainRecipe(epochs=30, lr=1e-3, batch_size=64)
model = train_model(make_model(), as_id_dataset(Subset(data, train_ids)), task, recipe)
gold = train_model(make_model(), as_id_dataset(Subset(data, retain_ids)), task, recipe)  # retrained without the 7s

# Sample ids are indices into `data`, whatever order the loaders use.
forget_loader = DataLoader(Subset(data, forget_ids), batch_size=32, shuffle=True)
retain_loader = DataLoader(Subset(data, retain_ids), batch_size=32, shuffle=True)
# Defaults: grad_diff on an adaptive EL2N coreset, run until the class is forgotten on the whole forget set (closed loop).
result = ErasusUnlearner(model, retain_batch_size=128).fit(forget_data=forget_loader, retain_data=retain_loader)
v = result.verification
print(f"verified: {result.verified} ({v['target']} target: {v['why']}); {v['steps']} steps, lr {v['lr']:.2g}")
print(f"coreset: {len(result.coreset)} of {len(forget_ids)} forget ids (grew {v['coreset_growth']}), e.g. {result.coreset.ids[:5].tolist()}")
print(f"seconds: {result.timings}")
for name, m in [("original", model), ("unlearned", result.model), ("retrained", gold)]:
    metrics = evaluate(m, forget=Subset(data, forget_ids), retain=Subset(data, retain_ids), test=Subset(data, test_ids), gold=gold)
    print(f"{name:>9}: forget acc {metrics['forget_acc']:.3f}  retain acc {metrics['retain_acc']:.3f}  "
          f"test acc {metrics['test_acc']:.3f}  MIA-efficacy {metrics['mia_svc_efficacy']:.3f}  Avg.Gap {100 * metrics['avg_gap']:.1f} pts")
