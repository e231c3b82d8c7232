"""The federated deletion server over a real Flower Grid: node identity bound to registered keys, and fuzzed
``query.delete`` replies (issue #5, "Security").

:class:`LinkHarness` is Flower's own in-memory message path without processes: a real ``InMemoryLinkState`` (what
the SuperLink stores: registered nodes with their public keys and node ids, messages in and out), the real
``InMemoryGrid`` the ServerApp talks to, and one thread playing the SuperNodes - it pulls each node's messages from
the LinkState, runs the real ``ClientApp`` (or a fuzzing handler) on them and stores the reply ``Message``. Node ids
are the ones the LinkState assigns at registration and every key is a real EC public key, as with SuperNode
authentication, so ``GridTransport`` sees exactly what it sees in deployment (``grid.get_nodes()``: node id and the
registered key). The deployment test with real processes is in tests/test_federated.py (slow).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable
from uuid import uuid4

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("sqlalchemy")

from erasus_ray.federated.messages import DeleteQuery, DeleteSubmission, FederationSpec, Hello  # noqa: E402
from erasus_ray.ledger import DeletionLedger, DeletionRequest  # noqa: E402


def _pem_key() -> tuple[bytes, bytes]:
    """A SuperNode key pair: the OpenSSH public key (what ``flwr supernode register`` reads) and the PEM the SuperLink
    stores for it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    public = ec.generate_private_key(ec.SECP384R1()).public_key()
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH), public_key_to_bytes(public)


class LinkHarness:
    """A LinkState with registered nodes, an InMemoryGrid for the ServerApp, and a thread answering for the nodes."""

    def __init__(self) -> None:
        from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
        from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
        from flwr.server.superlink.linkstate import LinkStateFactory
        from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
        from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
        from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
        from flwr.supercore.object_store import ObjectStoreFactory
        from flwr.supercore.run import Run
        from flwr.supercore.task_identity import TaskIdentity
        from flwr.superlink.federation import NoOpFederationManager
        from flwr.superlink.grid import InMemoryGrid

        self.factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
        self.state = self.factory.state()
        run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
        run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
        run.federation_id = NOOP_FEDERATION_ID
        self.state.run_ids[run.run_id] = RunRecord(run=run)
        self.state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
        self.run = run
        # what flwr-serverapp sets for the ServerApp's process (Message() reads it); restored in close()
        self._identity = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
        self.grid = InMemoryGrid(self.factory, pull_interval=0.002)
        self.grid.set_run(run)
        self.handlers: dict[int, Callable[[Any], Any]] = {}
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def add_node(self, partition_id: int, n_partitions: int, *, outbox: str | Path | None = None,
                 handler: Callable[[Any, Any], Any] | None = None) -> tuple[int, bytes]:
        """Register a node with a fresh key (``flwr supernode register``) and bring it online; it answers with the real
        ClientApp for ``partition_id`` unless ``handler(message, context)`` is given. Returns (node id, OpenSSH key)."""
        from flwr.app import Context, RecordDict
        from flwr.common.constant import NOOP_ACCOUNT_NAME, NOOP_FLWR_AID

        from erasus_ray.federated.client_app import app as client_app

        openssh, pem = _pem_key()
        node_id = self.state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, pem, heartbeat_interval=1e6)
        self.state.acknowledge_node_heartbeat(node_id=node_id, heartbeat_interval=1e6)
        node_config = {"partition-id": partition_id, "num-partitions": n_partitions, **({"outbox": str(outbox)} if outbox else {})}
        context = Context(run_id=self.run.run_id, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={})
        fn = handler or client_app
        self.handlers[node_id] = lambda message: fn(message, context)
        return node_id, openssh

    def _serve(self) -> None:
        while not self._stop.is_set():
            for node_id, handle in list(self.handlers.items()):
                for message in self.state.get_message_ins(node_id=node_id, limit=50):
                    try:
                        reply = handle(message)
                    except BaseException as err:  # noqa: BLE001 - surfaced by the test, never a hung grid
                        self.errors.append(err)
                        continue
                    reply.metadata.__dict__["_message_id"] = str(uuid4())
                    self.state.store_message_res(reply)
            self._stop.wait(0.002)

    def close(self) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        self._stop.set()
        self._thread.join(10)
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = self._identity


@pytest.fixture
def link():
    harness = LinkHarness()
    yield harness
    harness.close()
    assert harness.errors == []


# ---------------------------------------------------------------- node identity


def test_a_node_can_only_speak_for_the_client_its_key_is_registered_for(link, tmp_path, caplog):
    from erasus_ray.federated.server_app import GridTransport, key_fingerprint, load_node_bindings

    n0, key0 = link.add_node(0, 3)
    impostor, key_imp = link.add_node(2, 3)  # registered (it authenticates) for client-1, but claims partition 2
    unbound, _ = link.add_node(1, 3)  # registered at the SuperLink, but bound to no client
    n2, key2 = link.add_node(2, 3)
    (tmp_path / "node-2.pub").write_bytes(key2)
    # every way to name a node: its key's fingerprint, its public key file, its node id
    bindings = load_node_bindings(f"client-0={key_fingerprint(key0)},client-1={key_fingerprint(key_imp)},client-2={tmp_path / 'node-2.pub'}")
    assert bindings["client-2"] == key_fingerprint(key2)
    hello = Hello(FederationSpec(n_clients=3))
    transport = GridTransport(link.grid, hello_timeout=20, bindings=bindings)
    assert transport.discover(hello) == ["client-0", "client-2"]
    assert transport.node_of == {"client-0": n0, "client-2": n2}
    assert transport.refused == {
        impostor: "claims 'client-2' but is registered for 'client-1'",
        unbound: "claims 'client-1' but its key/node id is registered for no client",
    }
    by_id = GridTransport(link.grid, hello_timeout=20, bindings=load_node_bindings({"client-0": n0, "client-2": str(n2)}))
    assert by_id.discover(hello) == ["client-0", "client-2"] and set(by_id.refused) == {impostor, unbound}

    # without bindings a claim is all there is: whichever claimant comes first (by node id) gets client-2
    with caplog.at_level(logging.WARNING, logger="erasus_ray.federated"):
        open_transport = GridTransport(link.grid, hello_timeout=20)
        assert open_transport.discover(hello) == ["client-0", "client-1", "client-2"]
    assert open_transport.node_of["client-2"] == min(impostor, n2) and "not bound" in caplog.text


def test_server_app_with_node_auth_and_no_node_keys_refuses_to_start(link, tmp_path):
    """Fail closed: the real ServerApp ``main`` over the grid with node authentication on (the app's default) and no
    ``node-keys`` raises an error naming ``node-keys`` before it sends any message or creates any state - no node,
    whichever partition it claims, gets a client. ``node-auth=false`` (no authentication at all) is the explicit
    opt-out to the first-claim fallback; with ``node-keys`` set, the transport is bound."""
    from flwr.app import Context, RecordDict

    from erasus_ray.errors import InvalidConfigError
    from erasus_ray.federated.coordinator import ServerConfig
    from erasus_ray.federated.server_app import key_fingerprint, main, make_transport

    seen = []
    for k in range(2):
        link.add_node(k, 2, handler=lambda message, context: seen.append(message.metadata.message_type))
    state = tmp_path / "state"

    def context(run_config):
        return Context(run_id=link.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)

    for run_config in ({"n-clients": 2, "state-dir": str(state)},  # the default: node-auth on
                       {"n-clients": 2, "state-dir": str(state), "node-auth": True, "node-keys": ""}):
        with pytest.raises(InvalidConfigError, match="node-keys") as err:
            main(link.grid, context(run_config))
        assert "node-auth" in str(err.value)
    time.sleep(0.05)
    assert seen == [] and not state.exists()  # refused before any message or ledger
    assert ServerConfig.from_mapping({"node-auth": "false"}).node_auth is False and ServerConfig().node_auth is True
    assert make_transport(link.grid, ServerConfig(node_auth=False)).bindings == {}
    _, key = link.add_node(0, 2)
    bound = make_transport(link.grid, ServerConfig(node_keys=f"client-0={key_fingerprint(key)}"))
    assert bound.bindings == {"client-0": key_fingerprint(key)}


def test_an_impostor_node_cannot_delete_another_clients_ids(link, tmp_path):
    """The whole server (training, requests, unlearning, verification) over the Flower grid with the real ClientApp:
    an authenticated node registered for client-1 claims client-2's partition and forwards a request for client-2's
    ids; the binding refuses the node, so the request never reaches the ledger; client-0's own request completes."""
    from erasus_ray.federated.client_app import submit_to_outbox
    from erasus_ray.federated.coordinator import DeletionCoordinator, ServerConfig
    from erasus_ray.federated.partition import load_federation
    from erasus_ray.federated.server_app import GridTransport, key_fingerprint

    spec = FederationSpec(n_clients=3)
    parts = load_federation(spec).partitions
    outbox, evil = tmp_path / "outbox", tmp_path / "impostor-outbox"
    submit_to_outbox(DeletionRequest("mine-0", "client-0", "sample", ids=parts["client-0"][:15].tolist()), root=outbox)
    submit_to_outbox(DeletionRequest("steal-2", "client-2", "sample", ids=parts["client-2"][:15].tolist()), root=evil)
    n0, key0 = link.add_node(0, 3, outbox=outbox)
    _, key1 = link.add_node(2, 3, outbox=evil)  # the impostor: client-1's registered key, claiming partition 2
    bindings = {"client-0": key_fingerprint(key0), "client-1": key_fingerprint(key1), "client-2": "0" * 64}
    config = ServerConfig(rounds=2, local_epochs=2, min_clients=1, wait_clients_s=0.0, process_passes=1, pass_wait_s=0.0,
                          round_timeout_s=120.0)
    transport = GridTransport(link.grid, hello_timeout=30, bindings=bindings)
    co = DeletionCoordinator(spec, transport, tmp_path / "state", config=config)
    states = co.run()
    assert states == {"mine-0": "verified"}, {e.request_id: (e.state, e.state_reason) for e in co.ledger.entries()}
    assert transport.node_of == {"client-0": n0} and len(transport.refused) == 1
    assert (evil / "client-2" / "steal-2.json").exists()  # never asked for, never acknowledged
    assert (outbox / "client-0" / "acked" / "mine-0.json").exists()
    assert co.ledger.check_integrity() == []


# ---------------------------------------------------------------- fuzzed query.delete replies


def _fuzzed_reply(rng: np.random.Generator, client: str, case: int, own: list[int], foreign: list[int]) -> tuple[Any, list[str]]:
    """A ``query.delete`` reply built with real Flower records, and what each of its items must be answered with:
    ``"message"`` (a scope=message rejection), ``"validated"``, ``"rejected"`` or ``"any"`` (a random record: validated
    if it happens to be a valid request, else rejected - either way with a reason when refused)."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    kind = int(rng.integers(0, 12))
    rid = f"fz-{client}-{case}"

    def good(i: int) -> ConfigRecord:
        return ConfigRecord(DeletionRequest(f"{rid}-{i}", client, "sample", ids=[int(own[(case * 7 + i) % len(own)])]).to_record())

    if kind == 0:  # no config record at all, or an empty message
        content = RecordDict({"request.0": good(0)}) if rng.random() < 0.5 else RecordDict()
        return content, ["message"]
    if kind == 1:  # "config" of the wrong record type
        other = MetricRecord({"n_requests": 1}) if rng.random() < 0.5 else ArrayRecord()
        return RecordDict({"config": other, "request.0": good(0)}), ["message"]
    if kind == 2:  # n_requests missing or of the wrong type / range
        bad = [None, "1", 1.5, True, [1], -1, 65, 10**9, b"\x01"][int(rng.integers(0, 9))]
        cfg = ConfigRecord({} if bad is None else {"n_requests": bad})
        return RecordDict({"config": cfg, "request.0": good(0)}), ["message"]
    if kind == 3:  # more records than n_requests says, or a stray record
        extra = {"request.1": good(1)} if rng.random() < 0.5 else {"attachment": ConfigRecord({"x": 1})}
        return RecordDict({"config": ConfigRecord({"n_requests": 1}), "request.0": good(0), **extra}), ["message"]
    n = int(rng.integers(1, 4))
    content = RecordDict({"config": ConfigRecord({"n_requests": n})})
    expected = []
    for i in range(n):
        sub = int(rng.integers(0, 8)) if kind >= 4 else 0
        if sub == 0:  # a valid request for the sender's own id
            content[f"request.{i}"] = good(i)
            expected.append("validated")
        elif sub == 1:  # missing slot
            expected.append("message")
        elif sub == 2:  # a slot of the wrong record type
            content[f"request.{i}"] = MetricRecord({"ids": [1.0]})
            expected.append("message")
        elif sub == 3:  # another client's ids
            content[f"request.{i}"] = ConfigRecord(DeletionRequest(f"{rid}-{i}", client, "sample", ids=[int(foreign[case % len(foreign)])]).to_record())
            expected.append("rejected")
        elif sub == 4:  # in another client's name (impersonation)
            other = "client-9" if client != "client-9" else "client-8"
            content[f"request.{i}"] = ConfigRecord({"request_id": f"{rid}-{i}", "client_id": other, "level": "client"})
            expected.append("rejected")
        elif sub == 5:  # wrong field types
            bad = [{"ids": "1,2"}, {"ids": [1.5]}, {"level": 3}, {"created_at": "now"}, {"label": "x", "level": "class"}][int(rng.integers(0, 5))]
            content[f"request.{i}"] = ConfigRecord({"request_id": f"{rid}-{i}", "client_id": client, "ids": [int(own[0])], **bad})
            expected.append("rejected")
        else:  # random fields and values
            values = ["", "x" * 300, -1, 3, 2.5, True, [1, 2], [1, 1], [-4], ["a"], b"\x00", "sample", "class", "client", client]
            fields = ["request_id", "client_id", "level", "ids", "label", "reason", "created_at", "idz"]
            rec = {str(f): values[int(rng.integers(len(values)))] for f in rng.choice(fields, size=int(rng.integers(0, 6)), replace=False)}
            if rng.random() < 0.7:
                rec["request_id"] = f"{rid}-{i}"
            content[f"request.{i}"] = ConfigRecord(rec)
            expected.append("any")
    return content, expected


def test_fuzzed_query_delete_replies_through_flower_messages_each_get_a_rejection(link, tmp_path):
    """1100 fuzzed ``query.delete`` replies (10 nodes x 110 polls) built from real ``RecordDict`` / ``ConfigRecord`` /
    ``MetricRecord`` / ``ArrayRecord`` objects and sent as reply ``Message``s through the grid: broken envelopes (no
    config record, wrong record types, bad ``n_requests``, stray records), broken slots and broken or hostile
    requests. Each item is answered on the node's next ``query.delete`` (a malformed reply with a scope=message
    rejection and its reason), nothing raises, and the ledger stays consistent with no request accepted in another
    client's name or for another client's ids."""
    from flwr.app import Message

    from erasus_ray.federated.coordinator import DeletionCoordinator, ServerConfig
    from erasus_ray.federated.messages import HelloReply
    from erasus_ray.federated.partition import client_name, load_federation
    from erasus_ray.federated.server_app import GridTransport, key_fingerprint

    n_nodes, polls = 10, 110
    spec = FederationSpec(n_clients=n_nodes)
    fed = load_federation(spec)
    received: dict[str, list[list[Any]]] = {}  # client -> the acks of each query.delete it got
    sent: dict[str, list[list[str]]] = {}  # client -> what each of its replies must be answered with

    def fuzzing_node(k: int) -> Callable[[Any, Any], Any]:
        client = client_name(k)
        rng = np.random.default_rng(100 + k)
        own = fed.partitions[client].tolist()
        foreign = fed.partitions[client_name((k + 1) % n_nodes)].tolist()

        def handle(message: Any, context: Any) -> Any:
            if message.metadata.message_type == "query.hello":
                return Message(HelloReply(client, len(own)).to_content(), reply_to=message)
            received.setdefault(client, []).append(DeleteQuery.from_content(message.content).acks)
            case = len(sent.get(client, []))
            # the last poll only collects the answers to the last fuzzed reply: answer it with nothing new
            content, expected = _fuzzed_reply(rng, client, case, own, foreign) if case < polls else (DeleteSubmission().to_content(), [])
            sent.setdefault(client, []).append(expected)
            return Message(content, reply_to=message)

        return handle

    bindings = {}
    for k in range(n_nodes):
        _, key = link.add_node(k, n_nodes, handler=fuzzing_node(k))
        bindings[client_name(k)] = key_fingerprint(key)
    ledger = DeletionLedger(f"sqlite:///{tmp_path / 'ledger.db'}", synchronous="NORMAL")
    config = ServerConfig(max_requests_per_minute=1_000_000, wait_clients_s=0.0, round_timeout_s=60.0)
    co = DeletionCoordinator(spec, GridTransport(link.grid, hello_timeout=30, bindings=bindings), tmp_path, ledger=ledger, config=config)
    assert len(co.discover()) == n_nodes
    t0 = time.monotonic()
    for _ in range(polls + 1):  # the last poll delivers the answers to the 110th replies
        co.collect_requests(max_polls=1)
    seconds = time.monotonic() - t0

    cases = kinds = 0
    seen: dict[str, int] = {}
    for client in sorted(sent):
        assert len(sent[client]) == polls + 1 and len(received[client]) == polls + 1 and received[client][0] == []
        for expected, acks in zip(sent[client][:-1], received[client][1:]):  # reply p is answered in query p + 1
            cases += 1
            assert len(acks) == len(expected), (client, expected, acks)
            for want, ack in zip(expected, acks):
                kinds += 1
                seen[want] = seen.get(want, 0) + 1
                if want == "message":
                    assert ack.scope == "message" and not ack.accepted and ack.state == "rejected" and len(ack.reason) > 20, ack
                elif want == "validated":
                    assert ack.accepted and ack.state == "validated" and ack.request_id.startswith(f"fz-{client}-"), ack
                elif want == "rejected":
                    assert not ack.accepted and ack.state in ("rejected", "refused") and ack.reason, ack
                else:
                    assert ack.scope == "request" and (ack.accepted or (ack.state in ("rejected", "refused") and ack.reason)), ack
    assert cases == n_nodes * polls >= 1000 and min(seen.values()) > 100, seen
    assert ledger.check_integrity() == []
    accepted = 0
    for client, queries in received.items():  # every accepted request is the sender's own, for its own ids (or data)
        for ack in (a for acks in queries for a in acks if a.accepted):
            entry = ledger.get(ack.request_id)
            assert entry.state == "validated" and entry.client_id == client, (client, entry)
            assert entry.ids is None or all(fed.registry.owner_of(i) == client for i in entry.ids), (client, entry)
            accepted += 1
    assert accepted >= seen["validated"] and len(ledger.entries(states=["validated"])) == accepted
    print(f"\n{cases} fuzzed replies, {kinds} items ({seen}) in {seconds:.1f} s; ledger {ledger.counts()}")
    ledger.close()
