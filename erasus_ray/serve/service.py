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


def _train_labels(train: Any) -> dict[int, int] | None:
    """Class label per train id, for class-level requests; None where the data has no class labels (an LM's QA
    pairs: class deletion is then refused as malformed by the ledger)."""
    y = getattr(train.base, "y", None)
    if y is None:
        return None
    labels = np.asarray(y)[np.asarray(train.positions)]
    return {int(i): int(v) for i, v in zip(train.ids, labels)}


class DeletionService:
    """The service's state, from ``config``; ``benchmark``: an already loaded benchmark (tests reuse one)."""

    def __init__(self, config: ServeConfig, benchmark: Any = None) -> None:
        from erasus_ray.benchmarks import load_benchmark

        config.validate()
        self.config = config
        self.benchmark = benchmark if benchmark is not None else load_benchmark(
            config.benchmark, scenario=config.scenario, seed=config.seed, **config.benchmark_options)
        self.task = self.benchmark.task  # the served model's task adapter: what /predict and /generate may do
        Path(config.state_dir).mkdir(parents=True, exist_ok=True)
        self.ledger = DeletionLedger(config.ledger_url)
        self.keys = ClientKeys(self.ledger)
        train = self.benchmark.train
        self.ownership = OwnershipRegistry(round_robin_owners(np.asarray(train.ids), config.clients),
                                           labels=_train_labels(train), operators=config.operators)
        self.limits = RequestLimits(max_ids=config.max_ids, max_requests_per_minute=config.max_requests_per_minute)
        self.versions = ModelVersions(config.state_dir, self.benchmark.model_factory)
        self.versions.initialise(self.benchmark.original)

    def rollback(self, actor: str) -> tuple[int, list[str]]:
        """Serve the current version's parent again and reopen the requests the rolled-back version carried; returns
        the served version and the reopened request ids."""
        version = self.versions.rollback()
        return version, self.reopen_rolled_back(actor)

    def reopen_rolled_back(self, actor: str = "worker") -> list[str]:
        """Reopen (:meth:`DeletionLedger.reopen`) every verified request whose model version is not on the served
        lineage: its deletion was rolled back, so it is owed again. Idempotent, so the worker also calls it when it
        starts - a crash between a rollback's index write and this leaves nothing owed unrecorded. Cost: one read
        of the verified requests, one transaction."""
        lineage = set(self.versions.lineage())
        gone = {e.request_id: (e.metrics or {}).get("model_version") for e in self.ledger.entries(states=["verified"])}
        gone = {rid: v for rid, v in gone.items() if v is not None and int(v) not in lineage}
        for version in sorted(set(gone.values())):
            rids = [rid for rid, v in gone.items() if v == version]
            self.ledger.reopen(rids, f"reopened: model version {version}, which served this deletion, was rolled back",
                               metrics={"model_version": None, "rolled_back_version": version}, by=actor)
        return sorted(gone)

    def close(self) -> None:
        self.ledger.close()
