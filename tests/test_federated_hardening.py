"""The federated server's side of the issue #24 hardening: a client's out-of-range ``created_at`` is answered with a
rejection and leaves the audit readable (item 1); a client cannot tell unknown ids from another client's (item 7);
two servers on one ledger: a server leaves alone a batch another live server holds the lease of - no error, no
transition, no client contacted (item 10)."""

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
    # the default server id is the host and state folder: stable over a restart, apart for another server
    ids = [DeletionCoordinator(spec, _Unreachable(), tmp_path / d, ledger=DeletionLedger(url)).server_id for d in ("c", "c", "d")]
    assert ids[0] == ids[1] != ids[2]


def test_a_client_claiming_a_far_future_created_at_gets_a_rejection_and_the_audit_stays_readable(tmp_path) -> None:
    spec = FederationSpec(n_clients=2)
    co = DeletionCoordinator(spec, _Unreachable(), tmp_path / "s")
    ids = co.fed.partitions["client-0"][:2].tolist()
    ack = co.acknowledge({"request_id": "r-1", "client_id": "client-0", "ids": ids, "created_at": 1e20}, "client-0")
    assert (ack.request_id, ack.accepted, ack.state) == ("r-1", False, "rejected") and "created_at" in ack.reason
    assert co.acknowledge({"request_id": "r-2", "client_id": "client-0", "ids": ids}, "client-0").state == "validated"
    assert len(co.ledger.export(tmp_path / "audit.json")) == 2


def test_a_client_cannot_tell_unknown_ids_from_another_clients(tmp_path) -> None:
    spec = FederationSpec(n_clients=2)
    co = DeletionCoordinator(spec, _Unreachable(), tmp_path / "s")
    theirs = int(co.fed.partitions["client-1"][0])
    nobodys = max(int(i) for ids in co.fed.partitions.values() for i in ids) + 1
    acks = [co.acknowledge(DeletionRequest(f"probe-{i}", "client-0", "sample", ids=[i]), "client-0") for i in (theirs, nobodys)]
    assert [a.state for a in acks] == ["rejected", "rejected"]
    assert acks[0].reason.replace(f"[{theirs}]", "[N]") == acks[1].reason.replace(f"[{nobodys}]", "[N]")
    assert {e.error_code for e in co.ledger.entries()} == {"not_owner"}
