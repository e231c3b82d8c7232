"""Tiny prompt-conditioned (Stable-Diffusion shaped) model on 8x8 digits: a ``UNet2DConditionModel`` (channels 8 and
16, cross-attention width 16) with a one-layer frozen ``CLIPTextModel`` and a word tokenizer over "a handwritten
three"-style prompts, trained briefly (~3 s); forget set = images of one class; the digits judge of ``digits_unet``.
The prompt adapter's contract family (every generic algorithm, and the cross-attention methods ESD-x and UCE).
Registered only when diffusers imports."""

import importlib.util

import torch

from erasus_ray.testing._family import Family, register_family


def tiny_prompt_model() -> torch.nn.Module:
    from erasus_ray.benchmarks.diffusion import digits_prompt_model

    return digits_prompt_model(channels=(8, 16), groups=4, width=16)


def prompt_diffusion_family() -> Family:
    from erasus_ray.tasks.prompt_diffusion import PromptDiffusionTask
    from erasus_ray.testing.families.digits_unet import digits_image_family, tiny_judge

    return digits_image_family("digits_prompt_unet", tiny_prompt_model, lambda model: PromptDiffusionTask.from_model(
        model, draws=2, seed=0, sample_steps=5, eval_samples=8, judge=tiny_judge()))


if importlib.util.find_spec("diffusers") is not None:
    register_family("digits_prompt_unet", cheap=True)(prompt_diffusion_family)
