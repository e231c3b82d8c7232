"""Adapter for prompt-conditioned (Stable-Diffusion shaped) diffusion models: a ``UNet2DConditionModel`` whose
cross-attention reads a text encoder's states, with the empty prompt as the unconditional prediction.

The model is a :class:`PromptDiffusionModel`, a small ``nn.Module`` holding what a diffusers
``StableDiffusionPipeline`` holds (``unet``, ``text_encoder``, ``tokenizer``, ``scheduler``, optional ``vae``), so
the same code runs on real SD weights (:meth:`PromptDiffusionModel.from_pipeline` shares a pipeline's modules);
it is an ``nn.Module`` because runners train, copy and save the model. The text encoder (and VAE) are frozen, as in
every SD unlearning method: only the UNet is edited. ``task="auto"`` (and ``task="diffusion"``) pick
:class:`PromptDiffusionTask` for it, and for any object of the pipeline's shape.

Items are ``(x, y)`` as for the class-conditional adapter; class ``y`` is a *concept* with one or more prompts
(``class_prompts``, e.g. ``prompts_from_templates(("a handwritten {}", "the digit {}"), ("zero", "one", ...))``).
Each (timestep, noise) draw of a sample is conditioned on one of its class's prompts (draw ``d`` uses template
``d mod T``; training draws a template at random) and, in training, on the empty prompt with probability
``label_dropout``: the prompt dropout of classifier-free guidance. Every guidance method of
:class:`~erasus_ray.tasks.diffusion.DiffusionTask` (``predict_noise``, ``null_labels``, ``sample``) works on class
indices, which map to the first template's prompt, the null index to the empty prompt; a concept may also be given
as one of its prompts (``check_class("a handwritten three", ...)``).

The ``text_condition`` capability adds :meth:`PromptDiffusionTask.encode_prompts` (text embeddings of any prompt)
and :meth:`~erasus_ray.tasks.diffusion.DiffusionTask.cross_attention_modules` (the ``attn2`` blocks whose
``to_k`` / ``to_v`` read them): what ESD-x and UCE edit.

With a VAE the items hold latents (:meth:`PromptDiffusionModel.encode_images`) and samples are decoded to images;
tiny models work in pixel space (``vae=None``).

Example:
    >>> model = PromptDiffusionModel(unet, text_encoder, tokenizer, DDPMScheduler(1000), class_prompts=prompts)
    >>> task = get_task("auto", model)                                # PromptDiffusionTask
    >>> x0 = task.sample(model, torch.tensor([3] * 16), seed=0)      # 16 images of "a handwritten three"

Cost: as the class-conditional adapter, plus one text-encoder forward per draw (tiny next to the UNet).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from erasus_ray.errors import InvalidConfigError, TaskMismatchError
from erasus_ray.tasks.capabilities import Capability as C
from erasus_ray.tasks.diffusion import DiffusionTask, is_diffusers_unet
from erasus_ray.tasks.registry import register_task

#: What a Stable-Diffusion pipeline holds that the adapter needs (``vae`` is optional).
PIPELINE_PARTS = ("unet", "text_encoder", "tokenizer", "scheduler")


def is_prompt_diffusion(model: Any) -> bool:
    """Whether ``model`` is shaped like a Stable-Diffusion pipeline: a diffusers ``UNet2DConditionModel`` as
    ``unet`` next to a text encoder, a tokenizer and a scheduler."""
    unet = getattr(model, "unet", None)
    return (all(hasattr(model, part) for part in PIPELINE_PARTS) and isinstance(unet, nn.Module)
            and is_diffusers_unet(unet) and type(unet).__name__ == "UNet2DConditionModel")


def prompts_from_templates(templates: Sequence[str], names: Sequence[str]) -> list[list[str]]:
    """``[[template.format(name) for template in templates] for name in names]``: the prompts of each class."""
    return [[t.format(name) for t in templates] for name in names]


class PromptDiffusionModel(nn.Module):
    """A text-to-image diffusion model as one module: ``unet(x_t, t, encoder_hidden_states=text_encoder(ids))``.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (its ``cross_attention_dim`` is the text encoder's width).
        text_encoder: returns the token states first (``CLIPTextModel``); frozen here.
        tokenizer: an SD-style tokenizer (``tokenizer(prompts, padding="max_length", max_length=...,
            truncation=True, return_tensors="pt")``).
        scheduler: the noise scheduler (epsilon prediction).
        vae: optional ``AutoencoderKL`` (frozen); None for a pixel-space model.
        class_prompts: optional default prompts per class for the adapter (see :class:`PromptDiffusionTask`).
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, tokenizer: Any, scheduler: Any,
                 vae: nn.Module | None = None, class_prompts: Sequence[Any] | None = None) -> None:
        super().__init__()
        # the frozen parts are registered first, so the UNet's output layer is the model's last layer (what
        # last-layer methods such as layer_freezing train)
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.vae = vae.requires_grad_(False).eval() if vae is not None else None
        self.unet = unet
        self.tokenizer, self.scheduler, self.class_prompts = tokenizer, scheduler, class_prompts

    @classmethod
    def from_pipeline(cls, pipe: Any, class_prompts: Sequence[Any] | None = None) -> "PromptDiffusionModel":
        """Wrap a diffusers ``StableDiffusionPipeline`` (or any object with its parts), sharing its modules."""
        if not is_prompt_diffusion(pipe):
            raise TaskMismatchError(f"pipe: {type(pipe).__name__} lacks a UNet2DConditionModel 'unet' or one of "
                                    f"{PIPELINE_PARTS}")
        return cls(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, getattr(pipe, "vae", None),
                   class_prompts)

    @property
    def config(self) -> Any:
        """The UNet's config (``sample_size``, ``in_channels``: what the sampler draws)."""
        return self.unet.config

    def train(self, mode: bool = True) -> "PromptDiffusionModel":
        super().train(mode)
        self.text_encoder.eval()  # frozen parts stay in eval mode (no dropout) whatever the runner does
        if self.vae is not None:
            self.vae.eval()
        return self

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[N, L, D]`` the text encoder's token states of ``input_ids`` ``[N, L]``."""
        return self.text_encoder(input_ids.to(next(self.text_encoder.parameters()).device))[0]

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """VAE latents of images (the items of a latent model); ``x`` itself without a VAE."""
        if self.vae is None:
            return x
        return self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, input_ids: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None) -> Any:
        if encoder_hidden_states is None:
            if input_ids is None:
                raise InvalidConfigError("PromptDiffusionModel needs input_ids or encoder_hidden_states")
            encoder_hidden_states = self.encode_text(input_ids)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states)


@register_task("prompt_diffusion")
class PromptDiffusionTask(DiffusionTask):
    """Noise prediction for a prompt-conditioned UNet: concepts are prompts, the empty prompt is the null condition.

    Args:
        tokenizer: the model's tokenizer (read from the model by :meth:`from_model`).
        class_prompts: one entry per class, a prompt or a list of prompts (the same number for every class).
        max_length: tokens per prompt (default: ``tokenizer.model_max_length``, SD: 77).
        **kwargs: those of :class:`~erasus_ray.tasks.diffusion.DiffusionTask` (scheduler, draws, seed,
            ``label_dropout``, which is the prompt dropout here, judge, sampler settings, ``feature_layer``).
    """

    capabilities = DiffusionTask.capabilities | {C.TEXT_CONDITION}
    match_priority = 40

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_prompt_diffusion(model)

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs: Any) -> "PromptDiffusionTask":
        """The adapter for a pipeline-shaped ``model``: its tokenizer, scheduler and ``class_prompts``."""
        if not is_prompt_diffusion(model):
            raise TaskMismatchError(f"model: {type(model).__name__} is not a prompt-conditioned diffusion model (needs "
                                    f"a UNet2DConditionModel 'unet' and {PIPELINE_PARTS[1:]})")
        kwargs.setdefault("scheduler", model.scheduler)
        kwargs.setdefault("class_prompts", getattr(model, "class_prompts", None))
        return cls(model.tokenizer, **kwargs)

    def __init__(self, tokenizer: Any, class_prompts: Sequence[Any] | None = None, *, max_length: int | None = None,
                 feature_layer: str = "unet.mid_block", **kwargs: Any) -> None:
        prompts = self._check_prompts(class_prompts)
        if "num_class_embeds" in kwargs or "null_class" in kwargs:
            raise InvalidConfigError("num_class_embeds / null_class: a prompt model's classes are its class_prompts "
                                     "and its null condition is the empty prompt")
        super().__init__(num_class_embeds=len(prompts) + 1, feature_layer=feature_layer, **kwargs)
        self.tokenizer = tokenizer
        self.max_length = int(max_length or tokenizer.model_max_length)
        self.class_prompts = prompts
        self.templates = len(prompts[0])
        # row j * (K + 1) + c: template j's prompt of class c; c = K (the null index) is the empty prompt
        rows = [p[j] for j in range(self.templates) for p in prompts + [[""] * self.templates]]
        self.prompt_table = self.tokenize(rows)[0]

    @staticmethod
    def _check_prompts(class_prompts: Sequence[Any] | None) -> list[list[str]]:
        if not class_prompts:
            raise InvalidConfigError("class_prompts: a prompt-conditioned diffusion task needs the prompt(s) of each "
                                     "class, e.g. prompts_from_templates(('a handwritten {}',), ('zero', ...))")
        prompts = [[p] if isinstance(p, str) else list(p) for p in class_prompts]
        if len({len(p) for p in prompts}) != 1 or not prompts[0] or not all(isinstance(q, str) for p in prompts for q in p):
            raise InvalidConfigError("class_prompts: every class needs the same number (>= 1) of prompt strings")
        return prompts

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` ``[N, max_length]``, padded as Stable Diffusion pads its prompts."""
        enc = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        return enc.input_ids, enc.attention_mask

    def _conditions(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        cond = super()._conditions(y, shape)  # the class, or the null index under prompt dropout
        if self.fresh_draws:
            template = torch.randint(0, self.templates, tuple(shape))
        else:  # deterministic: draw d of every sample reads template d mod T
            template = (torch.arange(shape[-1]) % self.templates).expand(shape)
        return cond + (self.num_classes + 1) * template  # type: ignore[operator]

    def condition_kwargs(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The token ids of each condition's prompt (a class's prompt under its template, or the empty prompt)."""
        return {"input_ids": self.prompt_table.to(labels.device)[labels]}

    def denoiser(self, model: nn.Module) -> nn.Module:
        return model.unet

    def decode(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        vae = getattr(model, "vae", None)
        return x if vae is None else vae.decode(x / vae.config.scaling_factor).sample

    def check_class(self, value: Any, argument: str) -> int:
        """A class index, or one of a class's prompts (its class), else :class:`InvalidConfigError` naming
        ``argument`` and the known prompts."""
        if not isinstance(value, str):
            return super().check_class(value, argument)
        for cls, prompts in enumerate(self.class_prompts):
            if value.strip() in prompts:
                return cls
        known = ", ".join(repr(p[0]) for p in self.class_prompts)
        raise InvalidConfigError(f"{argument}: unknown concept {value!r}; this model's concepts are the prompts of its "
                                 f"classes (first templates: {known})")

    def concept_prompts(self, cls: int) -> list[str]:
        """Every prompt of class ``cls`` (all templates); the first is the one class-indexed sampling uses."""
        return list(self.class_prompts[self.check_class(cls, "cls")])

    @torch.no_grad()
    def encode_prompts(self, model: nn.Module, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states [N, L, D], attention_mask [N, L])``: the model's text-encoder states of ``prompts``."""
        ids, mask = self.tokenize(prompts)
        encoder = model.text_encoder
        return encoder(ids.to(next(encoder.parameters()).device))[0], mask

    def __repr__(self) -> str:
        return (f"PromptDiffusionTask(classes={self.num_classes}, templates={self.templates}, draws={self.draws}, "
                f"seed={self.seed}, num_timesteps={self.num_timesteps})")


__all__ = ["PIPELINE_PARTS", "PromptDiffusionModel", "PromptDiffusionTask", "is_prompt_diffusion",
           "prompts_from_templates"]
