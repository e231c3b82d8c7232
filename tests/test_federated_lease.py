"""Two federated servers on one ledger (issue #24 item 10): a server leaves alone a batch another live server holds
the lease of - no error, no transition, no client contacted."""

from __future__ import annotations

import pytest

pytest.importorskip("sqlalchemy")

from erasus_ray.federated.coordinator import DeletionCoordinator, ServerConfig  # noqa: E402
from erasus_ray.federated.messages import FederationSpec  # noqa: E402
from erasus_ray.ledger import DeletionLedger, DeletionRequest  # noqa: E402


class _Unreachable:
    """A transport the second server must never use: the batch is not its to drive."""

    def discover(self, hello):  # noqa: ANN001
        raise AssertionError("the second server contacted the clients")

    def exchange(self, message_type, contents, timeout=None):  # noqa: ANN001
        raise AssertionError(f"the second server sent {message_type}")


def test_a_second_server_leaves_a_batch_another_live_server_runs(tmp_path) -> None:
    spec = FederationSpec(n_clients=2)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    a = DeletionCoordinator(spec, _Unreachable(), tmp_path / "a", ledger=DeletionLedger(url), config=ServerConfig(server_id="srv-a"))
    b = DeletionCoordinator(spec, _Unreachable(), tmp_path / "b", ledger=DeletionLedger(url), config=ServerConfig(server_id="srv-b"))
    assert a.submit(DeletionRequest("class-1", "operator", "class", label=1)).state == "validated"
    # srv-a scheduled the batch and is running it (its lease is live)
    [entry] = a.ledger.schedule_pending(batch_id="batch-000001", owner="srv-a", lease_s=600)
    assert b.process_pending() == {}
    assert [t.to_state for t in b.ledger.history(entry.request_id)] == ["received", "validated", "scheduled"]
    assert b.ledger.batch_lease("batch-000001").owner == "srv-a"
    # the default server id names the host and process, so two servers never share one by accident
    assert DeletionCoordinator(spec, _Unreachable(), tmp_path / "c", ledger=DeletionLedger(url)).server_id.count(":") == 2
