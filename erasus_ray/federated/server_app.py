"""The Flower ``ServerApp`` of federated deletion: :class:`~erasus_ray.federated.coordinator.DeletionCoordinator`
over a Flower :class:`flwr.serverapp.Grid`.

``app`` trains FedAvg, collects ``query.delete`` requests into the ledger, schedules every pending one (also those
left unfinished by an earlier run: the ledger and history live in ``state-dir``), runs the unlearning / FedEraser /
repair rounds and verifies against the federated retrain baseline. Settings come from ``context.run_config``
(``[tool.flwr.app.config]`` in deployment) overlaid with the JSON file named by ``$ERASUS_FL_CONFIG`` (simulation:
``context.run_config`` is empty under ``run_simulation``).

Config keys: ``benchmark``, ``scenario``, ``seed``, ``n-clients``, ``scheme``, ``state-dir``, ``ledger-url`` and every
field of :class:`~erasus_ray.federated.coordinator.ServerConfig` (``rounds``, ``strategy``, ``selector``, ...).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

from erasus_ray.errors import InvalidDataError
from erasus_ray.federated.coordinator import DeletionCoordinator, ServerConfig
from erasus_ray.federated.messages import MSG_HELLO, FederationSpec, HelloReply

log = logging.getLogger("erasus_ray.federated")


class GridTransport:
    """Messages through a Flower ``Grid``: nodes are mapped to client ids by ``query.hello``; a node that does not
    answer within the timeout (or answers with an error) is simply absent from the replies."""

    def __init__(self, grid: Any, hello_timeout: float = 60.0) -> None:
        self.grid = grid
        self.hello_timeout = hello_timeout
        self.node_of: dict[str, int] = {}

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

    def discover(self, hello: Any) -> list[str]:
        nodes = list(self.grid.get_node_ids())
        replies = self._send(MSG_HELLO, {n: hello.to_content() for n in nodes}, self.hello_timeout)
        node_of: dict[str, int] = {}
        for node, content in replies.items():
            try:
                client = HelloReply.from_content(content).client_id
            except InvalidDataError as err:
                log.warning("node %s: %s", node, err)
                continue
            if client in node_of:
                log.warning("nodes %s and %s both claim %s; keeping the first", node_of[client], node, client)
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
    )


def main(grid: Any, context: Any) -> None:
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)
    values = settings(context.run_config)
    state_dir = values.get("state-dir") or os.environ.get("ERASUS_FL_STATE") or "fl-state"
    ledger = None
    if values.get("ledger-url"):
        from erasus_ray.ledger import DeletionLedger

        ledger = DeletionLedger(str(values["ledger-url"]))
    coordinator = DeletionCoordinator(
        spec_from(values), GridTransport(grid), state_dir, ledger=ledger, config=ServerConfig.from_mapping(values)
    )
    states = coordinator.run()
    log.info("ledger: %s", states)


def _make_app() -> Any:
    from flwr.serverapp import ServerApp

    app = ServerApp()
    app.main()(main)
    return app


app = _make_app()
