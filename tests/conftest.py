"""Shared fixtures: offline environment, a per-session model cache, digits benchmarks and a tiny memorising LM."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _key, _value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}.items():
    os.environ.setdefault(_key, _value)

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Benchmarks cache trained models under ERASUS_RAY_CACHE; keep a given one (CI/Makefile), else a temp dir."""
    if "ERASUS_RAY_CACHE" not in os.environ:
        os.environ["ERASUS_RAY_CACHE"] = str(tmp_path_factory.mktemp("erasus-cache"))
    yield


@pytest.fixture(scope="session")
def digits_class():
    from erasus_ray.benchmarks import load_benchmark

    return load_benchmark("digits", scenario="class", seed=0)


@pytest.fixture(scope="session")
def digits_random10():
    from erasus_ray.benchmarks import load_benchmark

    return load_benchmark("digits", scenario="random10", seed=0)


class SequenceDataset(Dataset):
    """Random token sequences with a 3-token prompt; ``ids`` start at 1000 so ids differ from positions."""

    def __init__(self, n: int = 32, length: int = 10, vocab: int = 48, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.seqs = [torch.randint(1, vocab, (length - (i % 3),), generator=g) for i in range(n)]
        self.ids = np.arange(1000, 1000 + n)

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.seqs[i], "answer_start": 3}


def tiny_gpt2(vocab: int = 48, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=vocab, n_positions=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(cfg)


@pytest.fixture(scope="session")
def tiny_lm():
    """A 1-layer GPT-2 that has memorised 32 random sequences; forget = first 8 ids, retain = the rest, heldout = 24
    unseen sequences."""
    from erasus_ray.data import as_id_dataset
    from erasus_ray.tasks import get_task
    from erasus_ray.training import TrainRecipe, train_model

    data = SequenceDataset()
    model = tiny_gpt2()
    task = get_task("auto", model)
    full = as_id_dataset(data)
    train_model(model, full, task, TrainRecipe(epochs=60, lr=1e-2, batch_size=8, optimizer="adamw", seed=0))
    forget_ids = full.ids[:8]
    return {
        "model": model,
        "task": task,
        "data": data,
        "forget": full.subset(forget_ids),
        "retain": full.exclude(forget_ids),
        # sequences drawn the same way that the model never saw (a different base dataset: its own id space)
        "heldout": as_id_dataset(SequenceDataset(n=24, seed=1)),
        "factory": tiny_gpt2,
    }


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test run (start-up costs 5-9 s); shut down only if we started it."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        # address="local": always a new cluster of our own, never one another process left running on the machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024**2)
    yield ray
    if started:
        ray.shutdown()
