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

Outbox: ``$ERASUS_FL_OUTBOX`` (or node config ``outbox``) / ``<client_id>`` / ``<request_id>.json``, each id written
by :func:`outbox_name` (an injective, file-name-safe encoding: ``r/1`` and ``r_1`` never share a file, a client id such as
``client-0/../client-3`` stays one folder under the root); acknowledged requests move to ``acked/`` with the server's
answer.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erasus_ray.errors import ErasusError, InvalidConfigError, InvalidRequestError
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


#: a client's local held-out split smaller than this cannot tell forgotten samples from remembered ones (at 20
#: held-out and 20 forget samples the loss-MIA AUC's 99% null band is already +-0.21): the group then runs without it
MIN_LOCAL_HELDOUT = 20


def local_heldout(instr: UnlearnInstruction, client_id: str, held: Any) -> tuple[Any, str]:
    """The held-out split a group of this client is verified against, and why (``None`` with the reason when there is
    none): with ``instr.local_heldout``, the client's share of the test set with the labels its data has
    (:meth:`~erasus_ray.federated.partition.Federation.client_heldout`), if it has at least ``MIN_LOCAL_HELDOUT``
    samples."""
    if not instr.local_heldout:
        return None, "the server did not ask for the local held-out split"
    fed = load_federation(instr.spec)
    heldout = fed.client_heldout(client_id, labels={fed.labels[int(i)] for i in held.ids.tolist()})
    if len(heldout) < MIN_LOCAL_HELDOUT:
        return None, (f"the local held-out split has {len(heldout)} samples (< {MIN_LOCAL_HELDOUT}): too few to measure; "
                      "a sample group runs the strategy's fixed default budget, unverified")
    return heldout, f"local held-out split: {len(heldout)} test samples of the client's labels"


def client_unlearn(instr: UnlearnInstruction, client_id: str) -> ModelUpdate:
    """Select a coreset of the client's forget ids and unlearn it with the strategy; the FedAvg weight is the
    client's partition size.

    A batched instruction has several groups of forget ids (e.g. an operator's class removal and a user's samples,
    each with its own stopping target): the strategy runs once per group, in order, on the same model, and every
    group's ids are kept out of the retain set. A group with a ``forget_target`` runs open-loop to that local forget
    accuracy; one without runs under the closed-loop controller (:mod:`erasus_ray.control`) with target ``auto``: a
    whole class of the client's data -> ``class``; samples -> ``heldout`` against the client's local held-out split
    when the server asks for it (``instr.local_heldout``, :func:`local_heldout`), else unverified at the strategy's
    fixed default budget. Each group's verification (:func:`~erasus_ray.evaluation.verification.verification_record`)
    goes back in the update. Cost: per group, the selector's scoring of its ids plus the controller's steps over the
    coreset (each step pairs a forget batch with a local retain batch) and its forward-only verifications.
    """
    from erasus_ray.evaluation.verification import verification_record
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
    records = []
    heldout, heldout_why = local_heldout(instr, client_id, held)
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
        result = unlearner.fit(held.subset(ids), retain if len(retain) else None, heldout_data=heldout)
        model = result.model
        coreset += [int(i) for i in result.coreset.ids]
        seconds += result.timings["total"]
        records.append({"n_forget": int(len(ids)), "forget_target": target, "heldout": heldout_why,
                        **verification_record(result.verification)})
    return ModelUpdate(
        state=model.state_dict(),
        num_examples=len(held),
        metrics={"n_forget": float(len(forget_ids)), "coreset": float(len(set(coreset))), "groups": float(len(groups)), "seconds": seconds},
        request_id=instr.request_id,
        forget_ids=[int(i) for i in forget_ids],
        coreset_ids=sorted(set(coreset)),
        verification=records,
    )


#: kept as they are in a file name; every other character of an id is escaped by "=" and one character
_LITERAL = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")
_ESCAPES = {"/": "=0", ":": "=1", "@": "=2"}
#: longest encoded id (a file name is at most 255 bytes on common file systems; room for ".json" and a temp suffix)
MAX_OUTBOX_NAME = 200


def outbox_name(identifier: str, what: str = "request_id") -> str:
    """The file (or folder) name of a request or client id: injective and safe on any common file system.

    Lower-case letters, digits and ``. _ -`` stay; an upper-case letter becomes ``=`` + its lower case, ``/ : @``
    become ``=0 =1 =2``. Each piece is one character or ``=`` plus one, so the name decodes back to exactly one id
    (``r/1`` -> ``r=01``, ``r_1`` -> ``r_1``); it has no upper case, so case-insensitive file systems keep ids
    apart; it has no ``/`` and never is ``.`` or ``..`` (an id starts with a letter or digit), so it is one path
    component. Ids outside the request alphabet (``NAME_PATTERN``) or encoded longer than ``MAX_OUTBOX_NAME``
    raise :class:`InvalidRequestError` naming ``what``.
    """
    from erasus_ray.ledger.requests import NAME_PATTERN

    if not isinstance(identifier, str) or not NAME_PATTERN.fullmatch(identifier):
        raise InvalidRequestError(
            f"{what} must be 1-128 characters of letters, digits and '._:@/-' starting with a letter or digit, "
            f"got {str(identifier)[:40]!r}"
        )
    name = "".join(
        ch if ch in _LITERAL else ("=" + ch.lower() if ch.isupper() else _ESCAPES[ch]) for ch in identifier
    )
    if len(name) > MAX_OUTBOX_NAME:
        raise InvalidRequestError(
            f"{what} {identifier[:40]!r}... is {len(name)} characters as a file name, over {MAX_OUTBOX_NAME}: use a "
            "shorter id (capitals and '/:@' take two characters each)"
        )
    return name


def _inside(root: Path, path: Path) -> Path:
    """``path``, after checking that it resolves (symbolic links followed) to somewhere strictly under ``root``."""
    resolved, base = path.resolve(), root.resolve()
    if resolved == base or not resolved.is_relative_to(base):
        raise InvalidConfigError(f"outbox path {str(path)!r} resolves to {str(resolved)!r}, outside the outbox root {str(base)!r}")
    return path


def outbox_root(root: str | os.PathLike | None = None) -> Path:
    """The outbox root: ``root``, else ``$ERASUS_FL_OUTBOX``, else ``~/.cache/erasus-ray/fl-outbox``."""
    return Path(root or os.environ.get("ERASUS_FL_OUTBOX") or Path.home() / ".cache" / "erasus-ray" / "fl-outbox")


def outbox_dir(client_id: str, root: str | os.PathLike | None = None) -> Path:
    """The client's outbox folder: ``<root>/<outbox_name(client_id)>``, proven to stay under the root."""
    base = outbox_root(root)
    return _inside(base, base / outbox_name(client_id, "client_id"))


def _request_path(folder: Path, request_id: str) -> Path:
    return _inside(folder, folder / f"{outbox_name(request_id)}.json")


def submit_to_outbox(request: Any, root: str | os.PathLike | None = None) -> Path:
    """Queue a :class:`~erasus_ray.ledger.requests.DeletionRequest` for the next ``query.delete``.

    The file appears whole or not at all (temp file in the same folder, fsync, then a hard link that never replaces an
    existing file). Filing the same request again returns its path; a different request under a request id still
    queued raises :class:`InvalidRequestError` ``conflict`` (the queued one is never overwritten).
    """
    folder = outbox_dir(request.client_id, root)
    folder.mkdir(parents=True, exist_ok=True)
    path = _request_path(folder, request.request_id)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(request.to_dict(drop_none=True)))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            _same_as_queued(request, path)
    finally:
        os.unlink(tmp)
    return path


def _same_as_queued(request: Any, path: Path) -> None:
    from erasus_ray.ledger.requests import DeletionRequest

    try:
        queued = DeletionRequest.from_dict(json.loads(path.read_text()))
    except (ErasusError, ValueError):
        queued = None
    if queued is None or queued.fingerprint() != request.fingerprint():
        raise InvalidRequestError(
            f"request_id {request.request_id!r} is already queued for {request.client_id!r} with a different request "
            f"({path}); use a new request_id", code="conflict", request_id=request.request_id,
        )


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
        try:
            path = _request_path(folder, ack.request_id)
        except ErasusError:  # an id no request of ours can have ("?" for a reply the server could not read)
            continue
        if path.exists():
            acked.mkdir(parents=True, exist_ok=True)
            (acked / path.name).write_text(json.dumps({"request": json.loads(path.read_text()), "ack": ack.__dict__}))
            path.unlink()
    requests = []
    if folder.exists():
        for path in sorted(folder.glob("*.json")):
            if path.is_symlink() or path.name.startswith("."):
                continue  # only files this outbox wrote
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
