"""Image inputs of vision models: the shape a model's vision tower takes, and a check that names what was expected."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from erasus_ray.errors import InvalidDataError


def expected_image_shape(model: nn.Module) -> tuple[int, int, int] | None:
    """``(C, H, W)`` the model's vision tower takes, read from ``config.vision_config`` (None when it says not)."""
    vision = getattr(getattr(model, "config", None), "vision_config", None)
    size, channels = getattr(vision, "image_size", None), getattr(vision, "num_channels", None)
    if not isinstance(size, int) or not isinstance(channels, int):
        return None
    return channels, size, size


def expected_clip_shape(model: nn.Module) -> tuple[int, int, int, int] | None:
    """``(T, C, H, W)`` a video model takes, read from its config's ``num_frames`` / ``num_channels`` / ``image_size``
    (VideoMAE's); None for a model whose config does not say (every non-video model)."""
    cfg = getattr(model, "config", None)
    frames, channels, size = (getattr(cfg, k, None) for k in ("num_frames", "num_channels", "image_size"))
    if not all(isinstance(v, int) for v in (frames, channels, size)):
        return None
    return frames, channels, size, size


def check_image(pixels: Any, expected: tuple[int, ...] | None, where: str, field: str = "pixel_values",
                kind: str = "images", layout: str = "channels, height, width") -> torch.Tensor:
    """``pixels`` as a float tensor of shape ``expected`` (``(C, H, W)``; a clip's ``(T, C, H, W)`` with ``kind``
    "clips" and its ``layout``); else an :class:`InvalidDataError` that names ``where``, the ``field``, the shape
    expected and the shape given."""
    if pixels is None:
        shape = "x".join(map(str, expected)) if expected else "C x H x W"
        raise InvalidDataError(f"{where}: missing {field!r} (an image tensor of shape {shape}); a vision-language "
                               "model without its image reads the image placeholder tokens as text")
    pixels = torch.as_tensor(pixels, dtype=torch.float32)
    if expected is not None and tuple(pixels.shape) != tuple(expected):
        raise InvalidDataError(f"{where}: {field!r} has shape {tuple(pixels.shape)}, but the model's vision tower "
                               f"takes {kind} of shape {tuple(expected)} ({layout}): resize them first")
    return pixels
