"""Training from scratch: the recipe shared by benchmark tasks (original and gold models) and ``retrain``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from erasus_ray.data import IdDataset, make_loader
from erasus_ray.errors import InvalidConfigError
from erasus_ray.tasks import Task
from erasus_ray.utils import model_device, seed_everything


@dataclass
class TrainRecipe:
    """How a model is trained from scratch: the original model and the retrained (gold) model use the same one."""

    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    optimizer: str = "adam"  # adam | adamw | sgd
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The optimizers :func:`make_optimizer` builds.
OPTIMIZERS = ("adam", "adamw", "sgd")


def make_optimizer(name: str, params: Any, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``adam`` | ``adamw`` | ``sgd`` (momentum 0.9) over ``params``."""
    name = name.lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=0.9)
    raise InvalidConfigError(f"unknown optimizer {name!r}; known: adam, adamw, sgd")


def train_model(
    model: nn.Module, dataset: IdDataset, task: Task, recipe: TrainRecipe, *, progress: bool = False, desc: str = "train"
) -> nn.Module:
    """Train ``model`` in place on ``dataset`` with ``recipe`` (seeded shuffling) and return it, with the task's
    :meth:`~erasus_ray.tasks.Task.training_task` objective."""
    seed_everything(recipe.seed)
    task = task.training_task()
    device = model_device(model)
    loader = make_loader(dataset, task.collate, batch_size=recipe.batch_size, shuffle=True, seed=recipe.seed)
    opt = make_optimizer(recipe.optimizer, [p for p in model.parameters() if p.requires_grad], recipe.lr, recipe.weight_decay)
    model.train()
    epochs = range(recipe.epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc=desc, leave=False, disable=None)
    for _ in epochs:
        for batch in loader:
            batch = batch.to(device)
            loss = task.forward(model, batch.data).sample_loss().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return model
