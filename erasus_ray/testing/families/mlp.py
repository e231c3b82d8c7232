"""MLP classifier on 500 scikit-learn digits (64-32-10), trained 15 epochs (~0.1 s)."""

from torch import nn
from torch.utils.data import TensorDataset

from erasus_ray.tasks import ClassificationTask
from erasus_ray.testing._family import Family, digits, register_family, seeded, trained_family
from erasus_ray.training import TrainRecipe


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@register_family("mlp", cheap=True)
def mlp_family() -> Family:
    x, y = digits()
    data = TensorDataset(x[:500], y[:500])
    recipe = TrainRecipe(epochs=15, lr=1e-2, batch_size=32, seed=0)
    return trained_family("mlp", seeded(mlp), ClassificationTask(), data, recipe, n_forget=16, n_test=100, cheap=True,
                          lr=1e-2, batch_size=8)
