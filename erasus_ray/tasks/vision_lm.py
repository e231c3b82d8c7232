"""Adapter for generative vision-language models (``LlavaForConditionalGeneration``-shaped: a vision tower, a projector
and a causal LM): the causal-LM path with ``pixel_values``.

Items are dicts with ``pixel_values`` (``[C, H, W]``), ``input_ids`` that hold the model's image placeholder token
(``config.image_token_id``, one per image feature the projector writes in its place) and ``answer_start``. The
objective is the causal LM's answer-only cross-entropy: image placeholders and the prompt are never supervised
(labels ``-100``), so a sample's loss is the mean cross-entropy of its answer tokens given its image and question -
what the model's own ``loss`` is with the same labels. Everything else (prediction units, features, the
``lm_head`` head, prompts for generation) is the causal-LM adapter's; generation receives the images through
:meth:`~erasus_ray.tasks.base.Task.condition_inputs`.

Cost: one forward of the vision tower, the projector and the LM per batch.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.tasks._images import check_image, expected_image_shape
from erasus_ray.tasks.base import parameters_reached
from erasus_ray.tasks.capabilities import Capability as C
from erasus_ray.tasks.causal_lm import IGNORE, CausalLMTask
from erasus_ray.tasks.registry import register_task


def image_token_id(model: nn.Module) -> int | None:
    """The image placeholder token of a Hugging Face VLM's config (``image_token_id``, older ``image_token_index``)."""
    config = getattr(model, "config", None)
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


#: Module names under which Hugging Face VLMs keep the vision side (Llava: ``vision_tower`` +
#: ``multi_modal_projector``; BLIP-2: ``vision_model`` + ``qformer`` + ``language_projection``).
VISION_MODULES = ("vision_tower", "multi_modal_projector", "vision_model", "qformer", "language_projection")


@register_task("vision_causal_lm")
class VisionCausalLMTask(CausalLMTask):
    """Causal language modelling conditioned on an image: answer-only loss on the text, image placeholders masked.

    ``task="auto"`` picks it for a model whose config names an image placeholder token and a vision config
    (``LlavaForConditionalGeneration`` and models shaped like it); :meth:`from_model` reads the pad id, the
    placeholder and the image shape from the config.

    Args:
        image_token_id: the placeholder token (its positions are never supervised).
        image_shape: ``(C, H, W)`` every item's ``pixel_values`` must have (None: not checked).
        pad_token_id / answer_only / tokenizer: as :class:`~erasus_ray.tasks.causal_lm.CausalLMTask`.
    """

    # not 'input': perturbing the token embeddings (causal tracing, DeepFool) misses the image, whose placeholders'
    # embeddings the projector's features overwrite
    capabilities = (CausalLMTask.capabilities - {C.INPUT}) | {C.TOWERS}
    # answer accuracy ("what digit is this?") is the headline; ROUGE-L of a one-word answer says the same less plainly
    default_metrics = tuple(f"{s}_{m}" for s in ("forget", "retain", "test") for m in ("exact", "loss", "prob")) + (
        "mia_mink_auc", "mia_loss_auc")
    gap_metrics = ("forget_exact", "retain_exact", "test_exact", "forget_prob", "retain_prob", "mia_mink_auc")
    display_metrics = ("forget_exact", "retain_exact", "test_exact", "forget_loss", "retain_loss", "test_loss",
                       "mia_mink_auc")
    match_priority = 30  # above the causal LM: its forward without pixel_values would read placeholders as text

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return image_token_id(model) is not None and getattr(config, "vision_config", None) is not None

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs: Any) -> "VisionCausalLMTask":
        """The adapter with the text pad id, the image placeholder and the image shape read from the config."""
        text = getattr(getattr(model, "config", None), "text_config", None)
        pad = getattr(text, "pad_token_id", None)
        if pad is None:
            pad = getattr(text, "eos_token_id", None)
        if "pad_token_id" not in kwargs and isinstance(pad, int):
            kwargs["pad_token_id"] = pad
        kwargs.setdefault("image_token_id", image_token_id(model))
        kwargs.setdefault("image_shape", expected_image_shape(model))
        return cls(**kwargs)

    def __init__(self, image_token_id: int | None = None, image_shape: tuple[int, int, int] | None = None,
                 pad_token_id: int = 0, answer_only: bool = True, tokenizer: Any = None) -> None:
        super().__init__(pad_token_id=pad_token_id, answer_only=answer_only, tokenizer=tokenizer)
        if image_token_id is None:
            raise InvalidConfigError("vision_causal_lm: image_token_id is required (the model config's image placeholder "
                                   "token); build the task with VisionCausalLMTask.from_model(model)")
        self.image_token_id = int(image_token_id)
        self.image_shape = None if image_shape is None else tuple(int(s) for s in image_shape)

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        if not isinstance(items[0], dict):
            raise InvalidDataError("vision_causal_lm items must be dicts with 'pixel_values', 'input_ids' and "
                                   "'answer_start'")
        pixels = [check_image(it.get("pixel_values"), self.image_shape, f"vision_causal_lm item {row}")
                  for row, it in enumerate(items)]
        data = super().collate(items)
        # the placeholders stand for image features: nothing there to predict
        data["labels"] = data["labels"].masked_fill(data["input_ids"] == self.image_token_id, IGNORE)
        data["pixel_values"] = torch.stack(pixels)
        return data

    def model_inputs(self, data: Any) -> tuple[tuple, dict]:
        args, kwargs = super().model_inputs(data)
        return args, {**kwargs, "pixel_values": data["pixel_values"]}

    def functional_inputs(self, data: Any) -> tuple[tuple, dict]:
        args, kwargs = super().functional_inputs(data)
        return args, {**kwargs, "pixel_values": data["pixel_values"]}

    @contextlib.contextmanager
    def functional_context(self, model: nn.Module) -> Iterator[None]:
        """The causal LM's context, and the placeholder lookup without its count check: Hugging Face VLMs format the
        token and feature counts into the check's message (a ``.item()`` that ``vmap`` cannot trace); the count is
        the same for every row of a collated batch, which the ordinary forward checks."""
        patched = [m for m in model.modules() if callable(getattr(m, "get_placeholder_mask", None))]
        image_token = self.image_token_id

        def placeholder_mask(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return (input_ids == image_token).unsqueeze(-1)

        with super().functional_context(model):
            for module in patched:
                module.get_placeholder_mask = placeholder_mask
            try:
                yield
            finally:
                for module in patched:
                    del module.get_placeholder_mask

    def condition_inputs(self, data: Any) -> dict[str, torch.Tensor]:
        return {"pixel_values": data["pixel_values"]}

    def tower_parameters(self, model: nn.Module, data: Any) -> dict[str, list[str]]:
        """``vision``: the parameters under the vision tower and the projector (:data:`VISION_MODULES`); ``text``:
        the other parameters the loss reaches (the language model, its embeddings and head). Cost: one forward and
        one backward pass."""
        vision_prefixes = tuple(f"{name}." for name, _ in model.named_modules()
                                if name.rsplit(".", 1)[-1] in VISION_MODULES)
        out = self.forward(model, data).sample_loss()
        reached = parameters_reached(model, out)
        vision = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith(vision_prefixes)]
        if not vision:
            raise InvalidDataError(f"vision_causal_lm: {type(model).__name__} has no module named any of "
                                   f"{VISION_MODULES}, so its vision tower cannot be told apart")
        return {"vision": vision, "text": [n for n in reached if not n.startswith(vision_prefixes)]}

    def __repr__(self) -> str:
        return f"VisionCausalLMTask(image_token_id={self.image_token_id}, image_shape={self.image_shape})"
