"""Tiny Hugging Face ``CLIPModel`` (one layer per tower, 16 wide, 8x8 single-channel images in 2x2 patches of 4x4)
built from a config, trained on 8x8 digits paired with token captions against the ten class captions (~1-2 s).

The same pairs as :mod:`~erasus_ray.testing.families.contrastive` ("digit <c> <noise>"), each caption closed by an
end-of-text token, the position CLIP's text tower pools. The model is called by keyword (``pixel_values``,
``input_ids``) and its learned ``logit_scale`` is the temperature (``ContrastiveTask.from_model``).
"""

import torch
from torch import nn
from torch.utils.data import Dataset

from erasus_ray.tasks.contrastive import ContrastiveTask
from erasus_ray.testing._family import Family, register_family, seeded, trained_family
from erasus_ray.testing.families.contrastive import CLASS_CAPTIONS, VOCAB, CaptionedDigits
from erasus_ray.training import TrainRecipe

#: CLIP pools its text tower at the first end-of-text token: one id past the toy captions' vocabulary.
EOS = VOCAB


def with_eos(tokens: torch.Tensor) -> torch.Tensor:
    """``tokens`` (``[L]`` or ``[K, L]``, 0-padded) with :data:`EOS` written after the last non-pad token."""
    rows = tokens.reshape(-1, tokens.shape[-1])
    out = torch.cat([rows, torch.zeros(len(rows), 1, dtype=rows.dtype)], 1)
    out[torch.arange(len(rows)), (rows != 0).sum(1)] = EOS
    return out.reshape(*tokens.shape[:-1], -1)


#: One caption per class: "digit <c> <eos>".
CLIP_CAPTIONS = with_eos(CLASS_CAPTIONS)


class ClipDigits(Dataset):
    """``(pixel_values [1, 8, 8], tokens [4], label)``: :class:`CaptionedDigits` in CLIP's shapes."""

    def __init__(self, n: int = 500, seed: int = 0) -> None:
        self.pairs = CaptionedDigits(n, seed)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        image, tokens, label = self.pairs[i]
        return image.reshape(1, 8, 8), with_eos(tokens), label


def tiny_clip() -> nn.Module:
    """An untrained ``CLIPModel`` with one layer per tower (about 6k parameters)."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=VOCAB + 1, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=8, pad_token_id=0, bos_token_id=EOS, eos_token_id=EOS)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                  patch_size=4, num_channels=1)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


def clip_task(model: nn.Module) -> ContrastiveTask:
    """The zero-shot task over the class captions, with the model's learned temperature."""
    return ContrastiveTask.from_model(model, captions=CLIP_CAPTIONS)


@register_family("clip", cheap=True)
def clip_family() -> Family:
    factory = seeded(tiny_clip)
    # 1e-2 (the toy two-tower's rate) leaves the transformer towers at ~46% test accuracy; 3e-3 reaches 86% (measured)
    recipe = TrainRecipe(epochs=15, lr=3e-3, batch_size=32, seed=0)
    return trained_family("clip", factory, clip_task(factory()), ClipDigits(), recipe, n_forget=16, n_test=100,
                          cheap=True, lr=3e-3, batch_size=8)
