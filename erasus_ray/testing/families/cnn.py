"""Small CNN classifier (2 conv + 1 fc) on 500 scikit-learn digits as 1x8x8 images, trained 15 epochs (~1 s)."""

from torch import nn
from torch.utils.data import TensorDataset

from erasus_ray.tasks import ClassificationTask
from erasus_ray.testing._family import Family, digits, register_family, seeded, trained_family
from erasus_ray.training import TrainRecipe


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, 10))


@register_family("cnn", cheap=False)
def cnn_family() -> Family:
    x, y = digits()
    data = TensorDataset(x[:500].reshape(-1, 1, 8, 8), y[:500])
    recipe = TrainRecipe(epochs=15, lr=1e-2, batch_size=32, seed=0)
    return trained_family("cnn", seeded(cnn), ClassificationTask(), data, recipe, n_forget=16, n_test=100, cheap=False,
                          lr=1e-2, batch_size=8)
