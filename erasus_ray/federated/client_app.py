"""The Flower ``ClientApp`` of federated deletion: each SuperNode holds one partition of the training set by id.

Handlers (Flower 1.42 Message API), each a thin wrapper over a pure function that tests call in process:

* ``query.hello``  -> :func:`client_hello`: which client this node is (``client-<partition-id>``) and how many ids.
* ``query.delete`` -> :func:`client_delete_query`: hands the server the deletion requests the client's users filed
  (``erasus-ray fl request`` writes them to the client's outbox folder) and files the server's acknowledgements.
* ``train`` / ``train.repair`` -> :func:`client_train`: FedAvg local training on the partition minus deleted ids.
* ``train.unlearn`` -> :func:`client_unlearn`: resolve the request's forget ids locally (sample ids, or the
  client's samples of a label), select a coreset of them with any registered selector and run the strategy through
  :class:`~erasus_ray.unlearner.ErasusUnlearner` (the shared runner), then return the weights.

Clients are stateless: every instruction carries the federation spec and the ids deleted so far, so a client that
restarts (or a new SuperNode for the same partition) continues where the server is.

Outbox: ``$ERASUS_FL_OUTBOX`` (or node config ``outbox``) / ``<client_id>`` / ``<request_id>.json``; acknowledged
requests move to ``acked/`` with the server's answer.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erasus_ray.errors import ErasusError
from erasus_ray.federated.messages import (
    DeleteQuery,
    DeleteSubmission,
    Hello,
    HelloReply,
    ModelUpdate,
    TrainInstruction,
    UnlearnInstruction,
)
from erasus_ray.federated.partition import client_name, load_federation


# ---------------------------------------------------------------- pure client logic


def client_hello(hello: Hello, client_id: str) -> HelloReply:
    fed = load_federation(hello.spec)
    return HelloReply(client_id=client_id, n_ids=len(fed.partitions.get(client_id, ())))


def _seed(base: int, client_id: str, round_: int) -> int:
    return int(base) * 100_003 + int(client_id.rsplit("-", 1)[-1]) * 1_009 + int(round_)


def client_train(instr: TrainInstruction, client_id: str) -> ModelUpdate:
    """FedAvg local step: ``instr.epochs`` epochs of Adam on the partition minus ``exclude_ids``.

    Cost: ``epochs`` passes over the client's partition. An empty partition returns the model unchanged with weight 0.
    """
    from erasus_ray.training import TrainRecipe, train_model

    torch.set_num_threads(1)
    fed = load_federation(instr.spec)
    data = fed.client_data(client_id, instr.exclude_ids)
    model = fed.model_factory()
    model.load_state_dict(instr.state)
    if len(data) == 0:
        return ModelUpdate(state=model.state_dict(), num_examples=0)
    recipe = TrainRecipe(
        epochs=instr.epochs, lr=instr.lr, batch_size=instr.batch_size, optimizer="adam", seed=_seed(instr.seed, client_id, instr.round)
    )
    start = time.perf_counter()
    train_model(model, data, fed.task, recipe)
    return ModelUpdate(state=model.state_dict(), num_examples=len(data), metrics={"seconds": time.perf_counter() - start})


def resolve_forget_ids(instr: UnlearnInstruction, client_id: str) -> np.ndarray:
    """The ids of this client that the instruction forgets: the named ids it holds, or its samples with ``label``."""
    fed = load_federation(instr.spec)
    held = fed.client_data(client_id, instr.exclude_ids).ids
    if instr.level == "sample":
        return np.intersect1d(np.asarray(instr.ids, dtype=np.int64), held)
    return fed.ids_with_label(held, int(instr.label))


def client_unlearn(instr: UnlearnInstruction, client_id: str) -> ModelUpdate:
    """Select a coreset of the client's forget ids and unlearn it with the strategy; the FedAvg weight is the
    client's partition size.

    A batched instruction has several groups of forget ids (e.g. an operator's class removal and a user's samples,
    each with its own stopping target): the strategy runs once per group, in order, on the same model, and every
    group's ids are kept out of the retain set. Cost: per group, the selector's scoring of its ids plus the strategy's
    epochs over the coreset (each step pairs a forget batch with a local retain batch).
    """
    from erasus_ray.unlearner import ErasusUnlearner

    torch.set_num_threads(1)
    fed = load_federation(instr.spec)
    held = fed.client_data(client_id, instr.exclude_ids)
    model = fed.model_factory()
    model.load_state_dict(instr.state)
    if instr.level == "sample":
        groups = [(np.intersect1d(np.asarray(ids, dtype=np.int64), held.ids), target) for ids, target in instr.groups()]
    else:
        groups = [(resolve_forget_ids(instr, client_id), instr.forget_target)]
    groups = [(ids, target) for ids, target in groups if len(ids)]
    if not groups:
        return ModelUpdate(state=model.state_dict(), num_examples=0, request_id=instr.request_id)
    forget_ids = np.unique(np.concatenate([ids for ids, _ in groups]))
    retain = held.exclude(forget_ids)
    selector = instr.selector if instr.selector not in ("", "full", "none") else None
    coreset: list[int] = []
    seconds = 0.0
    for ids, target in groups:
        unlearner = ErasusUnlearner(
            model,
            strategy=instr.strategy,
            selector=selector,
            fraction=instr.fraction,
            seed=instr.seed,
            lr=instr.lr or None,
            epochs=instr.epochs or None,
            forget_target=target,
            progress=False,
            model_factory=fed.model_factory,
            recipe=fed.recipe,
            inplace=True,
        )
        result = unlearner.fit(held.subset(ids), retain if len(retain) else None)
        model = result.model
        coreset += [int(i) for i in result.coreset.ids]
        seconds += result.timings["total"]
    return ModelUpdate(
        state=model.state_dict(),
        num_examples=len(held),
        metrics={"n_forget": float(len(forget_ids)), "coreset": float(len(set(coreset))), "groups": float(len(groups)), "seconds": seconds},
        request_id=instr.request_id,
        forget_ids=[int(i) for i in forget_ids],
        coreset_ids=sorted(set(coreset)),
    )


def outbox_dir(client_id: str, root: str | os.PathLike | None = None) -> Path:
    root = root or os.environ.get("ERASUS_FL_OUTBOX") or Path.home() / ".cache" / "erasus-ray" / "fl-outbox"
    return Path(root) / client_id


def submit_to_outbox(request: Any, root: str | os.PathLike | None = None) -> Path:
    """Queue a :class:`~erasus_ray.ledger.requests.DeletionRequest` for the next ``query.delete`` (atomic write)."""
    folder = outbox_dir(request.client_id, root)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{request.request_id.replace('/', '_')}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(request.to_dict(drop_none=True)))
    os.replace(tmp, path)
    return path


def client_delete_query(query: DeleteQuery, client_id: str, root: str | os.PathLike | None = None) -> DeleteSubmission:
    """File the acks (acked requests move to ``acked/``), then return every request still waiting in the outbox.

    Unacknowledged requests are sent again on every query: the ledger is idempotent by request id, so a lost reply
    never loses a request. The server's rejection of a reply it could not read (``scope="message"``) is logged and
    appended to ``<outbox>/<client>/rejections.jsonl``.
    """
    from erasus_ray.ledger.requests import DeletionRequest

    folder = outbox_dir(client_id, root)
    acked = folder / "acked"
    for ack in query.acks:
        if ack.scope == "message":
            logging.getLogger("erasus_ray.federated").warning("server rejected a query.delete reply of %s: %s", client_id, ack.reason)
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / "rejections.jsonl", "a") as fh:
                fh.write(json.dumps({"at": time.time(), **ack.__dict__}) + "\n")
            continue
        path = folder / f"{ack.request_id.replace('/', '_')}.json"
        if path.exists():
            acked.mkdir(parents=True, exist_ok=True)
            (acked / path.name).write_text(json.dumps({"request": json.loads(path.read_text()), "ack": ack.__dict__}))
            path.unlink()
    requests = []
    if folder.exists():
        for path in sorted(folder.glob("*.json")):
            try:
                requests.append(DeletionRequest.from_dict(json.loads(path.read_text())))
            except (ErasusError, ValueError) as err:
                # A broken file must not block the others; the user sees it in acked/ with the reason.
                acked.mkdir(parents=True, exist_ok=True)
                (acked / path.name).write_text(json.dumps({"error": str(err)}))
                path.unlink()
    return DeleteSubmission(requests[:64])


# ---------------------------------------------------------------- the Flower ClientApp


def _client_id(context: Any) -> str:
    cfg = context.node_config
    if "client-id" in cfg:
        return str(cfg["client-id"])
    return client_name(int(cfg.get("partition-id", 0)))


def _make_app() -> Any:
    from flwr.app import Error, Message
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def _reply(message: Any, fn: Any) -> Any:
        try:
            return Message(fn().to_content(), reply_to=message)
        except ErasusError as err:  # a malformed instruction is answered with the reason, not a crash
            return Message(error=Error(code=400, reason=f"{type(err).__name__}: {err}"), reply_to=message)

    @app.query("hello")
    def hello(message: Message, context: Any) -> Message:
        return _reply(message, lambda: client_hello(Hello.from_content(message.content), _client_id(context)))

    @app.query("delete")
    def delete(message: Message, context: Any) -> Message:
        root = context.node_config.get("outbox") or None
        return _reply(message, lambda: client_delete_query(DeleteQuery.from_content(message.content), _client_id(context), root))

    @app.train()
    def train(message: Message, context: Any) -> Message:
        return _reply(message, lambda: client_train(TrainInstruction.from_content(message.content), _client_id(context)))

    @app.train("repair")
    def repair(message: Message, context: Any) -> Message:
        return _reply(message, lambda: client_train(TrainInstruction.from_content(message.content, "train.repair"), _client_id(context)))

    @app.train("unlearn")
    def unlearn(message: Message, context: Any) -> Message:
        return _reply(message, lambda: client_unlearn(UnlearnInstruction.from_content(message.content), _client_id(context)))

    return app


app = _make_app()
