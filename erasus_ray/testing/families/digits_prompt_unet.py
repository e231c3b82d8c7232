"""Tiny prompt-conditioned (Stable-Diffusion shaped) model on 8x8 digits: a ``UNet2DConditionModel`` (channels 8 and
16, cross-attention width 16) with a one-layer frozen ``CLIPTextModel`` and a word tokenizer over "a handwritten
three"-style prompts, trained briefly (~3 s); forget set = images of one class; the digits judge of ``digits_unet``.
The prompt adapter's contract family (every generic algorithm, and the cross-attention methods ESD-x and UCE).
Registered only when diffusers imports."""

import importlib.util

import numpy as np
import torch
from torch.utils.data import TensorDataset

from erasus_ray.data import as_id_dataset
from erasus_ray.testing._family import Family, digits, register_family, seeded
from erasus_ray.training import TrainRecipe, train_model

#: the class the family's forget set holds
FORGET_CLASS = 3


def tiny_prompt_model() -> torch.nn.Module:
    from erasus_ray.benchmarks.diffusion import digits_prompt_model

    return digits_prompt_model(channels=(8, 16), groups=4, width=16)


def prompt_diffusion_family() -> Family:
    from erasus_ray.tasks.prompt_diffusion import PromptDiffusionTask
    from erasus_ray.testing.families.digits_unet import tiny_judge

    x, y = digits()
    full = as_id_dataset(TensorDataset(x[:400].reshape(-1, 1, 8, 8) * 2 - 1, y[:400]))
    recipe = TrainRecipe(epochs=3, lr=3e-3, batch_size=32, seed=0)
    order = np.random.default_rng(recipe.seed).permutation(full.ids)
    test_ids = np.sort(order[:60])
    train = full.exclude(test_ids)
    forget_ids = np.sort(train.ids[(y[train.ids] == FORGET_CLASS).numpy()][:16])
    factory = seeded(tiny_prompt_model)
    model = factory()
    task = PromptDiffusionTask.from_model(model, draws=2, seed=0, sample_steps=5, eval_samples=8, judge=tiny_judge())
    model = train_model(model, train, task, recipe)
    return Family("digits_prompt_unet", model, task, full.subset(forget_ids), train.exclude(forget_ids),
                  full.subset(test_ids), factory, recipe, True, {"lr": 1e-3, "batch_size": 8})


if importlib.util.find_spec("diffusers") is not None:
    register_family("digits_prompt_unet", cheap=True)(prompt_diffusion_family)
