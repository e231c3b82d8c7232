"""Non-differentiable model parts: every gradient-based selector names the scoped parameters that receive no
gradient (one shared check), and torch.func tracing failures come back as errors that say what to change."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from erasus_ray.data import as_id_dataset
from erasus_ray.errors import InvalidConfigError, NonDifferentiableModelError
from erasus_ray.selectors import get_selector
from erasus_ray.tasks import ClassificationTask


class RoundNet(nn.Module):
    """torch.round between the layers: its derivative is zero, so ``body`` gets exact-zero gradients."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(torch.round(self.body(x))))


class ToListNet(RoundNet):
    """The hidden state goes through Python (``.tolist()``): ``body`` is cut off from the loss, and vmap cannot trace it."""

    def forward(self, x):
        h = torch.tensor(self.body(x).tolist(), dtype=x.dtype)
        return self.head(torch.tanh(h))


class BranchNet(RoundNet):
    """Data-dependent Python control flow (``.item()``): fine for autograd, untraceable under vmap; ``scale`` is not
    a Linear/LayerNorm parameter, so per-sample gradients need torch.func."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        z = self.head(torch.tanh(self.body(x))) * self.scale
        return z if float(x.sum().item()) > -1e9 else -z


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    ds = as_id_dataset(TensorDataset(torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)))
    return ds.subset(range(12)), ds.subset(range(12, 24))


GRADIENT_SELECTORS = [
    ("influence", {"scope": "all"}),
    ("influence", {"scope": "all", "ihvp": "cg"}),
    ("tracin", {"scope": "all"}),
    ("gradient_norm", {"scope": "all"}),
    ("grand_ensemble", {"scope": "all"}),
]


@pytest.mark.parametrize("name,kwargs", GRADIENT_SELECTORS)
@pytest.mark.parametrize("model_cls", [RoundNet, ToListNet])
def test_no_gradient_names_the_parameters(name, kwargs, model_cls):
    torch.manual_seed(0)
    model = model_cls()
    forget, retain = _data()
    try:
        selector = get_selector(name, **kwargs)
    except TypeError:  # pragma: no cover - selector without a scope argument
        pytest.skip(f"{name} takes no scope")
    with pytest.raises(NonDifferentiableModelError, match=r"body\.weight") as err:
        selector.select(model, forget, task=ClassificationTask(), k=3, retain=retain)
    assert "body (Linear)" in str(err.value) and "head" not in str(err.value).split("receive none")[1].split("Something")[0]
    assert isinstance(err.value, InvalidConfigError)


@pytest.mark.parametrize("name", ["influence", "tracin", "gradient_norm"])
def test_scope_after_the_cut_works(name):
    torch.manual_seed(0)
    forget, retain = _data()
    core = get_selector(name, scope="last").select(RoundNet(), forget, task=ClassificationTask(), k=3, retain=retain)
    assert len(core.ids) == 3


@pytest.mark.parametrize("name,kwargs", [("tracin", {"scope": "all"}), ("influence", {"scope": "all", "ihvp": "ggn"}),
                                         ("gradient_norm", {"scope": "all", "method": "func"})])
def test_vmap_failure_is_a_clear_error(name, kwargs):
    torch.manual_seed(0)
    forget, retain = _data()
    with pytest.raises(NonDifferentiableModelError, match="torch.func") as err:
        get_selector(name, **kwargs).select(BranchNet(), forget, task=ClassificationTask(), k=3, retain=retain)
    assert ".item()" in str(err.value) and err.value.__cause__ is not None
