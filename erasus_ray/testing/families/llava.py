"""Tiny Hugging Face ``LlavaForConditionalGeneration`` (a one-layer CLIP vision tower 32 wide on 8x8 single-channel
digits in 2x2 patches of 4x4, a GELU projector and a one-layer Llama 32 wide) built from a config, trained to answer
"what digit is this ?" with the digit's name: the generative vision-language family, through the
``vision_causal_lm`` adapter.

A sample is ``<s> <image> x5 what digit is this ? <name> </s>``: the five placeholders are where the projector writes
the CLS and four patch features (feature selection ``full``: with the ``default``, which drops CLS, answer accuracy
was 0.68 instead of 0.74 on the test digits after 30 epochs, measured), and only ``<name> </s>`` is supervised. The tokenizer is word-level and built here (no hub): one token per word, so an answer is one token.
"""

from functools import lru_cache
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from erasus_ray.tasks.vision_lm import VisionCausalLMTask
from erasus_ray.testing._family import Family, digits, register_family, seeded, trained_family
from erasus_ray.training import TrainRecipe

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPECIALS = ("<pad>", "<s>", "</s>", "<image>")
QUESTION = ("what", "digit", "is", "this", "?")
VOCAB = SPECIALS + QUESTION + NAMES
PAD, BOS, EOS, IMAGE = range(4)
IMAGE_TOKENS = 5  # CLS + (8 / 4) ** 2 patches


@lru_cache(maxsize=1)
def tokenizer() -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over :data:`VOCAB` (ids in that order), built offline."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<pad>"))
    core.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   extra_special_tokens={"image_token": "<image>"})


def prompt_text() -> str:
    return "<s> " + "<image> " * IMAGE_TOKENS + " ".join(QUESTION)


class DigitQuestions(Dataset):
    """``{"pixel_values" [1, 8, 8], "input_ids", "answer_start"}``: digit ``i`` with the question and its name."""

    def __init__(self, n: int = 500) -> None:
        x, y = digits()
        self.images, self.labels = x[:n].reshape(n, 1, 8, 8), y[:n]
        tok = tokenizer()
        self.prompt = tok(prompt_text(), add_special_tokens=False)["input_ids"]
        self.answers = [tok(f"{name} </s>", add_special_tokens=False)["input_ids"] for name in NAMES]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        answer = self.answers[int(self.labels[i])]
        return {"pixel_values": self.images[i], "input_ids": torch.tensor(self.prompt + answer),
                "answer_start": len(self.prompt)}


def tiny_llava() -> nn.Module:
    """An untrained ``LlavaForConditionalGeneration``: CLIP vision tower and Llama, 32 wide, one layer each."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=8, patch_size=4, num_channels=1)
    text = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=PAD,
                       bos_token_id=BOS, eos_token_id=EOS)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE,
                                                      vision_feature_layer=-1, vision_feature_select_strategy="full"))
    # Llava reads the vision tower's hidden states, never its pooled output, so the tower's post-layernorm is dead
    # weight that gradient selectors (rightly) report as receiving no gradient; a real checkpoint has it too, and
    # there the selectors' scope= leaves it out
    model.model.vision_tower.post_layernorm = nn.Identity()
    return model


@register_family("llava", cheap=True)
def llava_family() -> Family:
    factory = seeded(tiny_llava)
    # measured answer accuracy on the 100 test digits (chance 0.1): 15 epochs at 3e-3 0.32, 30 at 3e-3 0.74,
    # 40 at 2e-3 0.83 (~6 s on one thread; forget 0.88, retain 0.89)
    recipe = TrainRecipe(epochs=40, lr=2e-3, batch_size=32, seed=0)
    task = VisionCausalLMTask.from_model(factory(), tokenizer=tokenizer())
    return trained_family("llava", factory, task, DigitQuestions(), recipe, n_forget=16, n_test=100, cheap=True,
                          lr=3e-3, batch_size=8)
