"""Federated deletion with Flower 1.42 (issue #5 part B).

- ``partition``: split a benchmark's training ids across clients (IID / by label) and the ownership registry;
- ``messages``: the protocol's message types (``query.hello``, ``query.delete``, ``train``, ``train.unlearn``,
  ``train.repair``) with validated records;
- ``fedavg``: FedAvg aggregation;
- ``fedearser``: client-level deletion (FedEraser calibration, Liu et al. IWQoS 2021) and the exact
  rollback-and-retrain baseline;
- ``coordinator``: the server logic (train, collect requests into the ledger between rounds, serve every pending
  request as one batch per unlearning round - FedEraser, merged ``train.unlearn``, repair - verify the batch against
  one federated retrain, resume);
- ``client_app`` / ``server_app``: the Flower ``ClientApp`` and ``ServerApp`` (``examples/federated`` is the app dir;
  ``server_app.GridTransport`` binds nodes to clients by their registered SuperNode keys, ``node-keys``);
- ``simulation`` / ``deployment``: run them under Flower's simulation runtime (subprocess) or as real
  SuperLink/SuperNode processes on 127.0.0.1 (TLS and SuperNode authentication optional).

Nothing here imports Flower until a Flower object is needed.
"""

from erasus_ray.federated.partition import build_ownership, client_name, load_federation, partition_ids

__all__ = ["build_ownership", "client_name", "load_federation", "partition_ids"]
