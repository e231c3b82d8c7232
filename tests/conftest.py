"""Shared fixtures: offline environment, a per-session model cache, digits benchmarks and a tiny memorising LM."""

from __future__ import annotations

import os
from typing import Any

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

# Under pytest-xdist (`make test` runs `-n 2`: torch runs one thread per test process, so two processes use both
# cores) tests are scheduled by :func:`xdist_scope`: a module stays on one worker (its module fixtures are built once),
# and the modules that start a Ray cluster share one worker, as do those that start Flower, so no two Ray clusters or
# Flower deployments compete for the machine at once (xdist's own `--dist loadgroup` cannot do this under pytest 9.2:
# it renames `item._nodeid`, which pytest 9.2 no longer reads).
RAY_MODULES = {
    "test_audio_ray", "test_cluster_job", "test_device", "test_distributed", "test_ray_train", "test_serve_ray",
    "test_serve_ray_durability", "test_tuning", "test_tuning_own_data", "test_vlm_ray", "test_diffusion_ray_pool",
}
FLOWER_MODULES = {"test_federated", "test_federated_crash", "test_federated_grid"}


def xdist_scope(nodeid: str) -> str:
    """The unit of work a test is scheduled with: ``"ray"`` or ``"flower"`` for the modules above, else its module."""
    path = nodeid.split("::", 1)[0]
    stem = path.rsplit("/", 1)[-1].removesuffix(".py")
    return "ray" if stem in RAY_MODULES else "flower" if stem in FLOWER_MODULES else path


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: unknown without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class ModuleOrClusterScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return ModuleOrClusterScheduling(config, log)


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
