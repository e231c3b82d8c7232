"""TracInCP against a brute-force per-sample loop over checkpoints."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from erasus_ray.data import as_id_dataset
from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.selectors import get_selector
from erasus_ray.tasks import ClassificationTask

from _tolerances import assert_float32_close


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    ckpts = []
    for i, lr in enumerate([0.5, 0.1, 0.02]):
        state = {k: v + 0.3 * torch.randn_like(v) for k, v in model.state_dict().items()}
        ckpts.append((state, lr))
    full = as_id_dataset(TensorDataset(x, y))
    return {"model": model, "x": x, "y": y, "ckpts": ckpts, "forget": full.subset(range(8)), "retain": full.subset(range(8, 12))}


def _brute(s, names, target):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    total = np.zeros(8)
    for state, lr in s["ckpts"]:
        model.load_state_dict(state)

        def g(rows):
            model.zero_grad()
            nn.functional.cross_entropy(model(s["x"][rows]), s["y"][rows]).backward()
            return torch.cat([p.grad.reshape(-1) for n, p in model.named_parameters() if n in names]).double()

        ref = None if target == "self" else g(list(range(8)) if target == "forget" else list(range(8, 12)))
        for i in range(8):
            gi = g([i])
            total[i] += lr * float(gi @ gi if ref is None else gi @ ref)
    return total


@pytest.mark.parametrize("scope,names", [("last", {"2.weight", "2.bias"}), ("all", None)])
@pytest.mark.parametrize("target", ["self", "forget", "retain"])
def test_matches_brute_force(setup, scope, names, target):
    names = names or {n for n, _ in setup["model"].named_parameters()}
    before = {k: v.clone() for k, v in setup["model"].state_dict().items()}
    sel = get_selector("tracin", checkpoints=setup["ckpts"], scope=scope, target=target)
    core = sel.select(setup["model"], setup["forget"], task=ClassificationTask(), k=3, retain=setup["retain"])
    got = np.array([core.scores[i] for i in range(8)])
    assert_float32_close(got, _brute(setup, names, target))  # batched vs one sample at a time
    assert core.info["checkpoints"] == 3 and "fallback" not in core.info
    assert all(torch.equal(before[k], v) for k, v in setup["model"].state_dict().items()), "model untouched"
    order = np.lexsort((np.arange(8), -got if sel.order == "high" else got))[:3]
    assert core.ids.tolist() == order.tolist()


def test_projection_and_fallback(setup):
    task = ClassificationTask()
    exact = get_selector("tracin", checkpoints=setup["ckpts"], scope="all").select(setup["model"], setup["forget"], task=task, k=3)
    proj = get_selector("tracin", checkpoints=setup["ckpts"], scope="all", proj_dim=4096).select(
        setup["model"], setup["forget"], task=task, k=3, seed=1
    )
    a = np.array([exact.scores[i] for i in range(8)])
    b = np.array([proj.scores[i] for i in range(8)])
    assert np.abs(a - b).max() / np.abs(a).max() < 0.1
    cur = get_selector("tracin").select(setup["model"], setup["forget"], task=task, k=3)
    assert cur.info["fallback"] == "current model only"
    with pytest.raises(InvalidDataError, match="retain"):
        get_selector("tracin", target="retain").select(setup["model"], setup["forget"], task=task, k=3)
    with pytest.raises(InvalidConfigError, match="checkpoints"):
        get_selector("tracin", checkpoints=[setup["ckpts"][0][0]])
