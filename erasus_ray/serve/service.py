"""What the deletion service's HTTP ingress and its worker share: the ledger (the only queue), the API keys, the
ownership registry, the data and the published model versions - all built from a :class:`ServeConfig`, so each
process (a Serve replica, the worker actor, a test) rebuilds the same view from the same files.

Cost: ``load_benchmark`` (cached trained model: a few seconds) and opening the ledger.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from erasus_ray.ledger import DeletionLedger, OwnershipRegistry, RequestLimits
from erasus_ray.serve.config import ServeConfig
from erasus_ray.serve.keys import ClientKeys
from erasus_ray.serve.versions import ModelVersions


def round_robin_owners(train_ids: np.ndarray, clients: int) -> dict[str, list[int]]:
    """``client-k`` owns every ``clients``-th train id starting at position ``k`` (the demo's partition)."""
    return {f"client-{k}": [int(i) for i in train_ids[k::clients]] for k in range(clients)}


class DeletionService:
    """The service's state, from ``config``; ``benchmark``: an already loaded benchmark (tests reuse one)."""

    def __init__(self, config: ServeConfig, benchmark: Any = None) -> None:
        from erasus_ray.benchmarks import load_benchmark

        config.validate()
        self.config = config
        self.benchmark = benchmark if benchmark is not None else load_benchmark(config.benchmark, scenario=config.scenario, seed=config.seed)
        Path(config.state_dir).mkdir(parents=True, exist_ok=True)
        self.ledger = DeletionLedger(config.ledger_url)
        self.keys = ClientKeys(self.ledger)
        train = self.benchmark.train
        labels = np.asarray(train.base.y)[np.asarray(train.positions)]  # labels of the train rows, for class requests
        self.ownership = OwnershipRegistry(
            round_robin_owners(np.asarray(train.ids), config.clients),
            labels={int(i): int(y) for i, y in zip(train.ids, labels)},
            operators=config.operators,
        )
        self.limits = RequestLimits(max_ids=config.max_ids, max_requests_per_minute=config.max_requests_per_minute)
        self.versions = ModelVersions(config.state_dir, self.benchmark.model_factory)
        self.versions.initialise(self.benchmark.original)

    def close(self) -> None:
        self.ledger.close()
