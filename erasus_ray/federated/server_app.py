"""The Flower ``ServerApp`` of federated deletion: :class:`~erasus_ray.federated.coordinator.DeletionCoordinator`
over a Flower :class:`flwr.serverapp.Grid`.

``app`` trains FedAvg, collects ``query.delete`` requests into the ledger, schedules every pending one (also those
left unfinished by an earlier run: the ledger and history live in ``state-dir``), runs the unlearning / FedEraser /
repair rounds and verifies against the federated retrain baseline. Settings come from ``context.run_config``
(``[tool.flwr.app.config]`` in deployment) overlaid with the JSON file named by ``$ERASUS_FL_CONFIG`` (simulation:
``context.run_config`` is empty under ``run_simulation``).

Config keys: ``benchmark``, ``scenario``, ``seed``, ``n-clients``, ``scheme``, ``backdoor-client`` and ``backdoor-n``
(the backdoor test scenario, :func:`~erasus_ray.federated.partition.backdoor`), ``state-dir``, ``ledger-url``,
``node-keys`` (which SuperNode may speak for which client: :func:`load_node_bindings`) and every field of
:class:`~erasus_ray.federated.coordinator.ServerConfig` (``rounds``, ``strategy``, ``selector``, ...).

Node identity: a node's ``query.hello`` reply only *claims* a client id (its ``partition-id``). With SuperNode
authentication the SuperLink knows each node's registered public key and node id, and the ServerApp sees them
(``grid.get_nodes()``). ``node-keys`` binds each client to its registered key (or node id); :class:`GridTransport`
then accepts a node only for the client its key is registered for, so an authenticated node that claims another
client's partition is refused (and logged) and can never submit requests for, or receive, that partition's ids.
Fail closed: with ``node-auth`` on (the default) the ServerApp refuses to start unless ``node-keys`` binds at least
one client (:func:`make_transport` raises :class:`~erasus_ray.errors.InvalidConfigError` naming ``node-keys``), so
an authenticated deployment never falls back to "the first node to claim a client gets it". Only with
``node-auth = false`` (simulation, or an insecure local test where no node is authenticated anyway) does that
fallback apply, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.federated.coordinator import DeletionCoordinator, ServerConfig
from erasus_ray.federated.messages import MSG_HELLO, FederationSpec, HelloReply

log = logging.getLogger("erasus_ray.federated")


def key_fingerprint(key: bytes | str | os.PathLike) -> str:
    """SHA-256 (hex) of a SuperNode public key, the same whichever form it comes in: the PEM bytes the SuperLink stores
    and ``grid.get_nodes()`` reports, the OpenSSH ``.pub`` file given to ``flower-supernode`` and ``flwr supernode
    register``, or a path to either. Bytes that are not a public key (simulation's random placeholders) are hashed
    as they are."""
    from cryptography.hazmat.primitives import serialization

    data = Path(key).read_bytes() if isinstance(key, (str, os.PathLike)) else bytes(key)
    for load in (serialization.load_ssh_public_key, serialization.load_pem_public_key, serialization.load_der_public_key):
        try:
            public = load(data)
        except Exception:  # noqa: BLE001 - not this format (cryptography raises ValueError or UnsupportedAlgorithm)
            continue
        der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(der).hexdigest()
    return hashlib.sha256(data).hexdigest()


_HEX64 = re.compile(r"[0-9a-f]{64}")


def load_node_bindings(spec: str | Mapping[str, Any] | None) -> dict[str, int | str]:
    """``{client_id: node id (int) | key fingerprint (hex)}`` from the ``node-keys`` setting.

    ``spec``: empty/None (no binding), a mapping, a path to a JSON file holding one, or ``"client-0=<v>,client-1=<v>"``.
    Each value is a node id (an integer: the id ``flwr supernode register`` printed), a SHA-256 fingerprint
    (:func:`key_fingerprint`), or a path to the node's public key file.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return {}
    if isinstance(spec, str):
        path = Path(spec).expanduser()
        if path.is_file():
            try:
                spec = json.loads(path.read_text())
            except ValueError as err:
                raise InvalidConfigError(f"node-keys file {path} is not JSON: {err}") from None
        else:
            pairs = [p.split("=", 1) for p in spec.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise InvalidConfigError(f"node-keys must be a JSON file or 'client=<node id|fingerprint|key file>,...', got {spec[:80]!r}")
            spec = {k.strip(): v.strip() for k, v in pairs}
    if not isinstance(spec, Mapping):
        raise InvalidConfigError(f"node-keys must map client ids to node ids or keys, got {type(spec).__name__}")
    out: dict[str, int | str] = {}
    for client, value in spec.items():
        if isinstance(value, bool):
            raise InvalidConfigError(f"node-keys[{client!r}]: expected a node id, a fingerprint or a key file, got {value!r}")
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
            out[str(client)] = int(value)
        elif isinstance(value, str) and _HEX64.fullmatch(value.lower()):
            out[str(client)] = value.lower()
        elif isinstance(value, str) and Path(value).expanduser().is_file():
            out[str(client)] = key_fingerprint(Path(value).expanduser())
        else:
            raise InvalidConfigError(f"node-keys[{client!r}]: {str(value)[:80]!r} is no node id, fingerprint or key file")
    return out


class GridTransport:
    """Messages through a Flower ``Grid``. ``query.hello`` maps nodes to client ids; a node that does not answer within
    the timeout (or answers with an error) is simply absent from the replies.

    ``bindings`` (:func:`load_node_bindings`): client id -> the node id or public-key fingerprint registered for it.
    With bindings a node is accepted only for the client it is registered for: one that claims another client, or
    has no registration, is refused (``refused``: node id -> reason, also logged). Without them the first node to
    claim a client gets it (a warning says identities are unbound).
    """

    def __init__(self, grid: Any, hello_timeout: float = 60.0, bindings: Mapping[str, int | str] | None = None) -> None:
        self.grid = grid
        self.hello_timeout = hello_timeout
        self.bindings = dict(bindings or {})
        self.node_of: dict[str, int] = {}
        self.refused: dict[int, str] = {}
        self._warned_unbound = False

    def _send(self, message_type: str, by_node: Mapping[int, Any], timeout: float | None) -> dict[int, Any]:
        from flwr.app import Message

        messages = [Message(content=c, message_type=message_type, dst_node_id=int(n)) for n, c in by_node.items()]
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        out = {}
        for reply in replies:
            if reply.has_error():
                log.warning("%s: node %s answered with an error: %s", message_type, reply.metadata.src_node_id, reply.error.reason)
                continue
            out[int(reply.metadata.src_node_id)] = reply.content
        return out

    def _nodes(self) -> dict[int, bytes]:
        """Node id -> the public key the SuperLink registered for it (empty bytes where the grid reports none)."""
        try:
            return {int(n.node_id): bytes(n.public_key) for n in self.grid.get_nodes()}
        except AttributeError:  # a grid without get_nodes
            return {int(n): b"" for n in self.grid.get_node_ids()}

    def registered_client(self, node_id: int, public_key: bytes) -> str | None:
        """The client ``node_id`` (with this registered key) may speak for, under ``bindings``; None if none."""
        fingerprint = key_fingerprint(public_key) if public_key else None
        for client, bound in self.bindings.items():
            if (isinstance(bound, int) and bound == node_id) or (isinstance(bound, str) and bound == fingerprint):
                return client
        return None

    def discover(self, hello: Any) -> list[str]:
        nodes = self._nodes()
        replies = self._send(MSG_HELLO, {n: hello.to_content() for n in nodes}, self.hello_timeout)
        node_of: dict[str, int] = {}
        self.refused = {}
        if not self.bindings and not self._warned_unbound:
            log.warning("node identities are not bound to clients (no node-keys): the first node to claim a client gets it; "
                        "configure node-keys with SuperNode authentication in deployment")
            self._warned_unbound = True
        for node, content in sorted(replies.items()):
            try:
                client = HelloReply.from_content(content).client_id
            except InvalidDataError as err:
                log.warning("node %s: %s", node, err)
                continue
            if self.bindings:
                allowed = self.registered_client(node, nodes.get(node, b""))
                if allowed != client:
                    why = (f"claims {client!r} but is registered for {allowed!r}" if allowed is not None
                           else f"claims {client!r} but its key/node id is registered for no client")
                    log.warning("refused node %s: %s", node, why)
                    self.refused[node] = why
                    continue
            if client in node_of:
                log.warning("nodes %s and %s both claim %s; keeping the first", node_of[client], node, client)
                self.refused[node] = f"claims {client!r}, already taken by node {node_of[client]}"
                continue
            node_of[client] = node
        self.node_of = node_of
        return sorted(node_of)

    def exchange(self, message_type: str, contents: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]:
        by_node = {self.node_of[c]: x for c, x in contents.items() if c in self.node_of}
        client_of = {n: c for c, n in self.node_of.items()}
        return {client_of[n]: x for n, x in self._send(message_type, by_node, timeout).items() if n in client_of}


def settings(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """``run_config`` overlaid with ``$ERASUS_FL_CONFIG`` (a JSON file); keys normalised to ``-``."""
    values = {str(k).replace("_", "-"): v for k, v in dict(run_config).items()}
    path = os.environ.get("ERASUS_FL_CONFIG")
    if path:
        with open(path) as fh:
            values.update({str(k).replace("_", "-"): v for k, v in json.load(fh).items()})
    return values


def spec_from(values: Mapping[str, Any]) -> FederationSpec:
    return FederationSpec(
        benchmark=str(values.get("benchmark", "digits")),
        scenario=str(values.get("scenario", "class")),
        seed=int(values.get("seed", 0)),
        n_clients=int(values.get("n-clients", 10)),
        scheme=str(values.get("scheme", "iid")),
        backdoor_client=int(values.get("backdoor-client", -1)),
        backdoor_n=int(values.get("backdoor-n", 0)),
    )


def make_transport(grid: Any, config: ServerConfig) -> GridTransport:
    """The :class:`GridTransport` for ``config``: bound by ``node-keys``; with ``node-auth`` on and no binding it
    refuses (raises before any message is sent) instead of letting the first node to claim a client get it."""
    bindings = load_node_bindings(config.node_keys)
    if config.node_auth and not bindings:
        raise InvalidConfigError(
            "node-auth is on (SuperNodes authenticate with registered keys) but node-keys binds no client to a key: "
            "set node-keys to a JSON file or 'client-0=<key fingerprint|public key file|node id>,...' (see "
            "examples/federated/README.md), or node-auth=false where nodes are not authenticated (simulation)"
        )
    return GridTransport(grid, bindings=bindings)


def main(grid: Any, context: Any) -> None:
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)
    values = settings(context.run_config)
    state_dir = values.get("state-dir") or os.environ.get("ERASUS_FL_STATE") or "fl-state"
    config = ServerConfig.from_mapping(values)
    transport = make_transport(grid, config)  # before anything touches the ledger, the state dir or the nodes
    ledger = None
    if values.get("ledger-url"):
        from erasus_ray.ledger import DeletionLedger

        ledger = DeletionLedger(str(values["ledger-url"]))
    coordinator = DeletionCoordinator(spec_from(values), transport, state_dir, ledger=ledger, config=config)
    states = coordinator.run()
    log.info("ledger: %s", states)


def _make_app() -> Any:
    from flwr.serverapp import ServerApp

    app = ServerApp()
    app.main()(main)
    return app


app = _make_app()
