"""Tiny T5 (1 encoder + 1 decoder layer, 16 wide) built from a config, memorising 40 reversal pairs (~2 s)."""

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from erasus_ray.tasks.seq2seq import Seq2SeqTask
from erasus_ray.testing._family import Family, register_family, seeded, trained_family
from erasus_ray.training import TrainRecipe

VOCAB = 32


class ReversalPairs(Dataset):
    """``{"input_ids": s, "labels": reversed(s) + [eos]}`` for random token strings of length 4-6; ids from 2000."""

    def __init__(self, n: int = 40, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.seqs = [torch.randint(2, VOCAB, (4 + i % 3,), generator=g) for i in range(n)]
        self.ids = np.arange(2000, 2000 + n)

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict:
        s = self.seqs[i]
        return {"input_ids": s, "labels": torch.cat([s.flip(0), torch.tensor([1])])}


def tiny_t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0)
    return T5ForConditionalGeneration(cfg)


@register_family("t5", cheap=False)
def t5_family() -> Family:
    recipe = TrainRecipe(epochs=40, lr=1e-2, batch_size=8, optimizer="adamw", seed=0)
    return trained_family("t5", seeded(tiny_t5), Seq2SeqTask(pad_token_id=0, decoder_start_token_id=0), ReversalPairs(),
                          recipe, n_forget=8, n_test=8, cheap=False, lr=3e-3, batch_size=4)
