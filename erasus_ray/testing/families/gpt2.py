"""Tiny GPT-2 (1 layer, 32 wide, vocabulary 48) built from a config, memorising 40 random token sequences (~3 s)."""

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from erasus_ray.tasks import CausalLMTask
from erasus_ray.testing._family import Family, register_family, seeded, trained_family
from erasus_ray.training import TrainRecipe


class TokenSequences(Dataset):
    """Random token sequences (lengths 8-10) with a 3-token prompt; ids start at 1000, so ids differ from rows."""

    def __init__(self, n: int = 40, vocab: int = 48, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.seqs = [torch.randint(1, vocab, (10 - (i % 3),), generator=g) for i in range(n)]
        self.ids = np.arange(1000, 1000 + n)

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.seqs[i], "answer_start": 3}


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=48, n_positions=32, bos_token_id=0, eos_token_id=0,
                     pad_token_id=0)
    return GPT2LMHeadModel(cfg)


@register_family("gpt2", cheap=False)
def gpt2_family() -> Family:
    recipe = TrainRecipe(epochs=40, lr=1e-2, batch_size=8, optimizer="adamw", seed=0)
    return trained_family("gpt2", seeded(tiny_gpt2), CausalLMTask(pad_token_id=0), TokenSequences(), recipe,
                          n_forget=8, n_test=8, cheap=False, lr=3e-3, batch_size=4)
