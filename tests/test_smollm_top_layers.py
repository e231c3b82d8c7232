"""``train_top_layers_only``: unlearning the authors-smollm tier updates only the decoder layers its fine-tune trained.

Runs on a tiny Llama built from a config (the SmolLM2 architecture, 3 layers, 32 wide): no GGUF needed, default suite.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from erasus_ray.benchmarks.authors_smollm import train_top_layers_only
from erasus_ray.data import IdDataset
from erasus_ray.errors import InvalidConfigError
from erasus_ray.tasks import CausalLMTask
from erasus_ray.testing.families.gpt2 import TokenSequences


def tiny_llama(layers: int = 3) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0,
                      bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def test_only_the_top_layers_change_when_unlearning():
    from erasus_ray import ErasusUnlearner

    model = train_top_layers_only(tiny_llama(), 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in trainable)
    assert any(n.startswith("model.layers.1.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    data = IdDataset(TokenSequences(n=16), np.arange(16), np.arange(1000, 1016))
    forget, retain = data.subset(np.arange(1000, 1004)), data.subset(np.arange(1004, 1016))
    result = ErasusUnlearner(model, strategy="gradient_ascent", selector=None, fraction=None, seed=0, progress=False,
                             task=CausalLMTask(pad_token_id=0), lr=1e-2).fit(forget_data=forget, retain_data=retain,
                                                                                 epochs=2)
    changed = {n for n, p in result.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= trainable, sorted(changed - trainable)  # the lower layers and embeddings are as before
    assert any(n.startswith("model.layers.2.") for n in changed)


def test_zero_means_every_parameter_and_negative_is_refused():
    model = tiny_llama(2)
    model.requires_grad_(False)
    assert all(p.requires_grad for p in train_top_layers_only(model, 0).parameters())
    with pytest.raises(InvalidConfigError, match="k must be >= 0"):
        train_top_layers_only(model, -1)
