"""Adapter for two-tower contrastive models (CLIP-like): an image tower and a text tower embed into one space.

Items are ``(image, text_tokens)`` or ``(image, text_tokens, label)``; the model is called ``model(images, texts)``
(or by keyword, ``model(pixel_values=..., input_ids=...)`` for a Hugging Face ``CLIPModel``) and returns
``(image_emb, text_emb)`` or an object with ``image_embeds`` / ``text_embeds``. Similarities are cosine similarities
divided by a temperature (Radford et al., ICML 2021, "Learning Transferable Visual Models From Natural Language
Supervision"): the ``temperature`` given, else the model's own learned scale when its output carries the scaled
similarities (``logits_per_image`` = ``exp(logit_scale) * cosine``, so the scale trains with the model), else 0.07.

Two objectives, chosen at construction:

* **fixed reference set** (``captions=`` a ``[K, L]`` token tensor, e.g. one caption per class): a sample's objective
  is the cross-entropy of its image against the K captions with its label as the target (zero-shot classification
  as a loss). It does not depend on the batch: capabilities ``independent``, ``logits``, ``labels``, ``features``.
* **in-batch** (no ``captions``): the symmetric InfoNCE loss of each (image, text) pair against the other pairs of
  its batch. A sample's objective depends on its batch mates, so the task declares neither ``independent`` nor
  ``logits``: per-sample algorithms (``vmap`` gradients, per-sample scores) are refused through their requirements,
  and :meth:`ContrastiveTask.dense_sample_loss` refuses a lone sample rather than return its constant 0.

Cost: one forward pass of both towers per batch (plus the K captions in the fixed mode).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from erasus_ray.checks import check_real
from erasus_ray.errors import TaskMismatchError
from erasus_ray.tasks.base import Task, TaskOutput, parameters_reached
from erasus_ray.tasks.capabilities import Capability as C
from erasus_ray.tasks.capabilities import CapabilityError
from erasus_ray.tasks.registry import register_task
from erasus_ray.tasks._images import check_image, expected_image_shape


#: the temperature of a model that has no learned scale (CLIP's initial value).
DEFAULT_TEMPERATURE = 0.07


def _keyword_inputs(model: nn.Module) -> tuple[str, str] | None:
    """``("pixel_values", "input_ids")`` when ``model.forward`` takes them by those names (Hugging Face two-tower
    models, whose first positional argument is ``input_ids``), else None (called positionally as (images, texts))."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return ("pixel_values", "input_ids") if {"pixel_values", "input_ids"} <= set(params) else None


def _embeddings(raw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    image, text = getattr(raw, "image_embeds", None), getattr(raw, "text_embeds", None)
    if isinstance(image, torch.Tensor) and isinstance(text, torch.Tensor):
        return image, text
    if isinstance(raw, (tuple, list)) and len(raw) >= 2 and all(isinstance(r, torch.Tensor) for r in raw[:2]):
        return raw[0], raw[1]
    raise TaskMismatchError(
        f"contrastive task expects (image_emb, text_emb) or an object with image_embeds/text_embeds; got {type(raw).__name__}"
    )


@register_task("contrastive")
class ContrastiveTask(Task):
    """Two-tower contrastive objective: against a fixed caption set (independent, with logits) or in-batch.

    ``task="auto"`` picks it for models that declare ``two_tower = True`` and for Hugging Face two-tower models (a
    ``CLIPModel`` / ``SiglipModel``-named class, or any model with both ``get_image_features`` and
    ``get_text_features``); :meth:`from_model` reads how to call it and its pad id.

    Args:
        captions: ``[K, L]`` token ids of the fixed reference set (one per class); None: in-batch InfoNCE.
        temperature: divides the cosine similarities. None: the model's learned scale when its output has
            ``logits_per_image`` (CLIP), else 0.07 (CLIP's initial value; its learned one settles near 0.01).
        pad_token_id: pads texts of different lengths.
        input_names: keyword names of the (images, texts) inputs, e.g. ``("pixel_values", "input_ids")``; None:
            positional.
        image_shape: ``(C, H, W)`` every image must have (read from a Hugging Face model's ``vision_config``); None:
            not checked.

    The declared capabilities depend on the mode and are set on the instance (``task.capabilities``); the class
    lists their union, so that ``providers`` names this task for each.
    """

    capabilities = frozenset({C.INDEPENDENT, C.LOGITS, C.LABELS, C.FEATURES, C.TOWERS, C.JOINT_SPACE})
    match_priority = 20

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if getattr(model, "two_tower", False) is True or type(model).__name__ in ("CLIPModel", "SiglipModel"):
            return True
        return all(callable(getattr(model, m, None)) for m in ("get_image_features", "get_text_features"))

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs: Any) -> "ContrastiveTask":
        """The adapter with the input names (keywords for a Hugging Face model) and the text pad id read from the
        model unless given."""
        kwargs.setdefault("input_names", _keyword_inputs(model))
        kwargs.setdefault("image_shape", expected_image_shape(model))
        config = getattr(getattr(model, "config", None), "text_config", None)
        if "pad_token_id" not in kwargs and isinstance(getattr(config, "pad_token_id", None), int):
            kwargs["pad_token_id"] = config.pad_token_id
        return cls(**kwargs)

    def __init__(self, captions: torch.Tensor | None = None, temperature: float | None = None, pad_token_id: int = 0,
                 input_names: tuple[str, str] | None = None, image_shape: tuple[int, int, int] | None = None) -> None:
        self.captions = None if captions is None else torch.as_tensor(captions, dtype=torch.long)
        if self.captions is not None and (self.captions.ndim != 2 or len(self.captions) < 2):
            raise TaskMismatchError(f"captions must be a [K, L] token tensor with K >= 2; got {tuple(self.captions.shape)}")
        self.temperature = (None if temperature is None
                            else check_real("temperature", temperature, low=0.0, low_open=True))
        self.pad_token_id = int(pad_token_id)
        if input_names is not None and (len(input_names) != 2 or not all(isinstance(n, str) for n in input_names)):
            raise TaskMismatchError(f"input_names must be two keyword names (images, texts); got {input_names!r}")
        self.input_names = None if input_names is None else tuple(input_names)
        self.image_shape = None if image_shape is None else tuple(int(s) for s in image_shape)
        fixed = self.captions is not None
        in_batch = frozenset({C.LOSS, C.FEATURES, C.TOWERS, C.JOINT_SPACE})
        self.capabilities = type(self).capabilities if fixed else in_batch  # type: ignore[misc]

    @property
    def fixed(self) -> bool:
        return self.captions is not None

    @property
    def shared_inputs(self) -> bool:
        """The fixed caption set passes through the text tower once per batch, shared by every sample."""
        return self.fixed

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        if not isinstance(items[0], (tuple, list)) or len(items[0]) < 2:
            raise TaskMismatchError("contrastive items must be (image, text_tokens) or (image, text_tokens, label)")
        images = [torch.as_tensor(it[0]) if self.image_shape is None
                  else check_image(it[0], self.image_shape, f"contrastive item {row}", "image") for row, it in enumerate(items)]
        data = {"images": torch.stack(images),
                "texts": pad_sequence([torch.as_tensor(it[1], dtype=torch.long).reshape(-1) for it in items],
                                      batch_first=True, padding_value=self.pad_token_id)}
        if len(items[0]) > 2:
            data["labels"] = torch.as_tensor([int(it[2]) for it in items], dtype=torch.long)
        elif self.fixed:
            raise TaskMismatchError("contrastive task with a caption set needs (image, text, label) items: the label "
                                    "is the index of the sample's caption")
        return data

    def model_inputs(self, data: Any) -> tuple[tuple, dict]:
        images = data["images"]
        texts = self.captions.to(images.device) if self.fixed else data["texts"]  # type: ignore[union-attr]
        return self._call_inputs(images, texts)

    def _call_inputs(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[tuple, dict]:
        if self.input_names is None:
            return (images, texts), {}
        return (), dict(zip(self.input_names, (images, texts)))

    def _own_pairs(self, model: nn.Module, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image_emb, text_emb)`` of each sample's image and its own text (not the caption set)."""
        args, kwargs = self._call_inputs(data["images"], data["texts"])
        return _embeddings(model(*args, **kwargs))

    def pair_embeddings(self, model: nn.Module, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised embeddings of each sample's image and its own caption. Cost: one forward of both towers."""
        image, text = self._own_pairs(model, data)
        return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)

    def tower_parameters(self, model: nn.Module, data: Any) -> dict[str, list[str]]:
        """The parameters the image embedding depends on and those the text embedding depends on, read off the
        autograd graph (so any two-tower model works, whatever its modules are called); parameters in neither
        (CLIP's ``logit_scale``) belong to no tower. Cost: one forward and two backward passes."""
        image, text = self._own_pairs(model, data)
        towers = {"vision": parameters_reached(model, image), "text": parameters_reached(model, text)}
        shared = sorted(set(towers["vision"]) & set(towers["text"]))
        if shared:
            raise TaskMismatchError(f"contrastive task: parameters {shared[:5]} feed both the image and the text "
                                    "embedding, so the model has no separate towers")
        return towers

    def batch_size(self, data: Any) -> int:
        return int(data["images"].shape[0])

    def labels_of(self, data: Any) -> torch.Tensor | None:
        return data.get("labels") if self.fixed else None

    def relabel(self, data: Any, labels: torch.Tensor) -> Any:
        if not self.fixed:
            return super().relabel(data, labels)
        return {**data, "labels": labels.to(data["labels"].device)}

    def similarities(self, raw: Any) -> torch.Tensor:
        """``[B, K]`` image-to-text logits: cosine similarities over the temperature (the model's learned scale when
        no temperature was given and its output carries ``logits_per_image``)."""
        learned = getattr(raw, "logits_per_image", None)
        if self.temperature is None and isinstance(learned, torch.Tensor):
            return learned.float()
        image, text = _embeddings(raw)
        temperature = DEFAULT_TEMPERATURE if self.temperature is None else self.temperature
        return F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T / temperature

    def read_output(self, raw: Any, data: Any, *, features: torch.Tensor | None = None) -> TaskOutput:
        logits = self.similarities(raw)
        size = self.batch_size(data)
        expected = (size, len(self.captions) if self.fixed else size)  # type: ignore[arg-type]
        if tuple(logits.shape) != expected:
            raise TaskMismatchError(f"contrastive task expects image/text embeddings giving {expected} similarities; "
                                    f"got {tuple(logits.shape)}")
        if not self.fixed:
            return TaskOutput(losses=self._in_batch(logits), batch_size=size, features=features)
        targets = data["labels"].to(logits.device)
        if targets.numel() and int(targets.max()) >= expected[1]:
            raise TaskMismatchError(f"label {int(targets.max())} has no caption (the set has {expected[1]})")
        return TaskOutput(logits, targets, torch.arange(size, device=logits.device), size, features)

    @staticmethod
    def _in_batch(logits: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE per pair: mean of its image->text and text->image cross-entropies."""
        target = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none"))

    def dense_sample_loss(self, raw: Any, data: Any) -> torch.Tensor:
        logits = self.similarities(raw)
        if self.fixed:
            return F.cross_entropy(logits, data["labels"], reduction="none")
        if logits.shape[0] < 2:
            raise CapabilityError("the in-batch contrastive loss of a lone sample is a constant 0: per-sample algorithms "
                                  "need capability 'independent' (build ContrastiveTask(captions=...) for a fixed set)")
        return self._in_batch(logits)

    def dense_units(self, raw: Any, data: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.fixed:
            return super().dense_units(raw, data)
        logits = self.similarities(raw)
        return logits[:, None], data["labels"][:, None], torch.ones(logits.shape[0], 1, dtype=logits.dtype, device=logits.device)

    def _forward_with_features(self, model: nn.Module, args: tuple, kwargs: dict, data: Any) -> TaskOutput:
        # the image embedding (before normalisation) is the feature: it depends on the sample alone in both modes
        raw = model(*args, **kwargs)
        return self.read_output(raw, data, features=_embeddings(raw)[0])

    def __repr__(self) -> str:
        mode = f"captions={len(self.captions)}" if self.fixed else "in_batch"  # type: ignore[arg-type]
        temperature = "learned" if self.temperature is None else self.temperature
        return f"ContrastiveTask({mode}, temperature={temperature})"
