"""Seeding, devices, timing, model copies and hashes."""

from __future__ import annotations

import copy
import hashlib
import random
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy (same device, same requires_grad flags)."""
    return copy.deepcopy(model)


def model_hash(model: nn.Module) -> str:
    """SHA-256 of the state dict's tensors (names, dtypes, shapes and bytes), for ledgers and results."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        if not isinstance(t, torch.Tensor) or t.dim() == 0:  # 0-d tensors cannot be viewed as bytes
            t = torch.as_tensor(t).reshape(1)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class Timer:
    """Accumulates wall-clock seconds per phase: ``with timer("select"): ...``; ``timer.seconds`` is a dict."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
