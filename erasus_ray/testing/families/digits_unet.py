"""Tiny class-conditional diffusers UNet on 8x8 digits (channels 8 and 16, ~42k parameters), forget set = images of
one class, trained briefly (~2 s), with a small digits judge for the judged generation metrics: the diffusion task's
contract family. Registered only when diffusers imports."""

import importlib.util

import numpy as np
import torch
from torch.utils.data import TensorDataset

from erasus_ray.data import as_id_dataset
from erasus_ray.testing._family import Family, digits, register_family, seeded
from erasus_ray.training import TrainRecipe, train_model

#: the class the family's forget set holds
FORGET_CLASS = 3


def tiny_unet() -> torch.nn.Module:
    from erasus_ray.benchmarks.diffusion import digits_unet

    return digits_unet(channels=(8, 16), groups=4)


def tiny_judge() -> torch.nn.Module:
    """A digits MLP (64-64-10) trained on all 1797 digits for 10 epochs (~0.3 s): the judge of generated images."""
    from erasus_ray.benchmarks.diffusion import ImageJudge
    from erasus_ray.benchmarks.models import MLP
    from erasus_ray.tasks import ClassificationTask

    x, y = digits()
    torch.manual_seed(0)
    judge = ImageJudge(MLP(64, (64,), 10))
    images = as_id_dataset(TensorDataset(x.reshape(-1, 1, 8, 8) * 2 - 1, y))
    return train_model(judge, images, ClassificationTask(), TrainRecipe(epochs=10, lr=3e-3, batch_size=64, seed=0))


def digits_image_family(name: str, factory, make_task) -> Family:
    """A diffusion family on the first 400 digits as ``[1, 8, 8]`` images in ``[-1, 1]``: 60 held-out test ids, the
    forget set = 16 training images of :data:`FORGET_CLASS`, the model trained for 3 epochs. ``make_task(model)``
    builds the family's task (the prompt adapter reads its tokenizer from the model)."""
    x, y = digits()
    full = as_id_dataset(TensorDataset(x[:400].reshape(-1, 1, 8, 8) * 2 - 1, y[:400]))
    recipe = TrainRecipe(epochs=3, lr=3e-3, batch_size=32, seed=0)
    order = np.random.default_rng(recipe.seed).permutation(full.ids)
    test_ids = np.sort(order[:60])
    train = full.exclude(test_ids)
    forget_ids = np.sort(train.ids[(y[train.ids] == FORGET_CLASS).numpy()][:16])
    factory = seeded(factory)
    model = factory()
    task = make_task(model)
    model = train_model(model, train, task, recipe)
    return Family(name, model, task, full.subset(forget_ids), train.exclude(forget_ids), full.subset(test_ids),
                  factory, recipe, True, {"lr": 1e-3, "batch_size": 8})


def diffusion_family() -> Family:
    from erasus_ray.tasks.diffusion import DiffusionTask

    return digits_image_family("digits_unet", tiny_unet, lambda model: DiffusionTask(
        num_class_embeds=11, draws=2, seed=0, sample_steps=5, eval_samples=8, judge=tiny_judge()))

if importlib.util.find_spec("diffusers") is not None:
    register_family("digits_unet", cheap=True)(diffusion_family)
