"""The federated deletion server (``DeletionCoordinator.run``) with crash points, for tests/test_federated_crash.py.

``serve(state_dir, outbox, kill_at, count_path)`` runs the real coordinator over ``InProcessTransport`` (the
ClientApp handler functions, Flower record encoding) on a small digits federation: discover, FedAvg training
(resumed from the stored history after a crash) with ``query.delete`` collection from the clients' outboxes between
rounds, one batch for every accepted request (FedEraser + one unlearning round + repair), verification of the batch
against one federated retrain baseline. Nothing in the coordinator
is changed; crash points are added *around* its durable operations by wrapping, on this instance only:

- every ledger write (``submit``, ``transition``, ``record_result``, ``record_results``, ``schedule_pending``) - after
  it commits;
- ``save_global`` (the global model + the request ids it contains) - after the atomic replace;
- ``FederatedHistory.record`` / ``finish`` (training rounds on disk) - after;
- every message exchange with the clients - before it is sent and after the replies arrive.

``kill_at``: SIGKILL this process at the kill_at-th crash point; 0 = never. ``count_path``: where a run writes how
many crash points it passed (the reference run's count sizes the random kill points).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

# Small on purpose: every trial trains, unlearns and retrains (baseline) several times on 2 cores.
N_CLIENTS = 3
CONFIG = dict(
    rounds=2, local_epochs=1, repair_rounds=1, repair_epochs=1, calibration_epochs=1, process_passes=1,
    pass_wait_s=0.0, wait_clients_s=0.0,
    # This test is about crash safety, not unlearning quality (tests/test_federated.py checks that): with tolerance 1.0
    # every request that is unlearned is verified, so "verified" means "completed".
    verify_tolerance=1.0,
)


class _Points:
    def __init__(self, kill_at: int, count_path: str | None) -> None:
        self.kill_at = kill_at
        self.count_path = count_path
        self.n = 0

    def __call__(self) -> None:
        self.n += 1
        if self.n == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def write(self) -> None:
        if self.count_path:
            Path(self.count_path).write_text(str(self.n))


def _after(fn: Any, point: _Points) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        point()
        return out

    return wrapped


class _CrashTransport:
    def __init__(self, inner: Any, point: _Points) -> None:
        self.inner = inner
        self.point = point

    def discover(self, hello: Any) -> list[str]:
        return self.inner.discover(hello)

    def exchange(self, message_type: str, contents: Any, timeout: float | None = None) -> dict[str, Any]:
        self.point()
        replies = self.inner.exchange(message_type, contents, timeout)
        self.point()
        return replies


def spec() -> Any:
    from erasus_ray.federated.messages import FederationSpec

    return FederationSpec(n_clients=N_CLIENTS)


def serve(state_dir: str, outbox: str, kill_at: int = 0, count_path: str | None = None) -> None:
    import torch

    torch.set_num_threads(1)
    from erasus_ray.federated.coordinator import DeletionCoordinator, InProcessTransport, ServerConfig

    point = _Points(kill_at, count_path)
    sp = spec()
    co = DeletionCoordinator(sp, _CrashTransport(InProcessTransport(sp, outbox=outbox), point), state_dir, config=ServerConfig(**CONFIG))
    for name in ("submit", "transition", "record_result", "record_results", "schedule_pending"):
        setattr(co.ledger, name, _after(getattr(co.ledger, name), point))
    co.save_global = _after(co.save_global, point)
    co.history.record = _after(co.history.record, point)
    co.history.finish = _after(co.history.finish, point)
    co.run()
    co.ledger.close()
    point.write()
