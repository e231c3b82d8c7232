"""The federated deletion protocol as explicit message types with validated records.

Flower 1.42's Message API carries a :class:`flwr.app.RecordDict` per message. Each type below is a dataclass with
``to_content()`` (-> RecordDict) and ``from_content(RecordDict)`` (validates every field and raises
:class:`~erasus_ray.errors.InvalidDataError` naming the record and field), so the protocol reads as a list of
messages and a malformed record is a clear rejection, never a crash deep inside a handler.

=====================  =========================  ===========================================================
message type           server -> client           client -> server (reply)
=====================  =========================  ===========================================================
``query.hello``        :class:`Hello`             :class:`HelloReply` (client id, number of ids held)
``query.delete``       :class:`DeleteQuery`       :class:`DeleteSubmission` (requests the client's users filed)
                       (acks of earlier requests,
                       rejections of malformed
                       replies)
``train``              :class:`TrainInstruction`  :class:`ModelUpdate` (FedAvg local training)
``train.unlearn``      :class:`UnlearnInstruction` :class:`ModelUpdate` (coreset + strategy on the forget ids)
``train.repair``       :class:`TrainInstruction`  :class:`ModelUpdate` (a few retain-only FedAvg steps)
=====================  =========================  ===========================================================

Every instruction carries the federation spec (benchmark, scenario, seed, clients, scheme) and the ids deleted
so far (``exclude_ids``): clients are stateless, the server's ledger is the only source of truth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import json

import numpy as np
import torch

from erasus_ray.errors import InvalidDataError

MSG_HELLO = "query.hello"
MSG_DELETE = "query.delete"
MSG_TRAIN = "train"
MSG_UNLEARN = "train.unlearn"
MSG_REPAIR = "train.repair"

LEVELS = ("sample", "class", "client")


def _records():
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    return ArrayRecord, ConfigRecord, MetricRecord, RecordDict


# ---------------------------------------------------------------- field checks (name the record and the field)


def _get(record: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in record:
        raise InvalidDataError(f"{where}: missing field {key!r}")
    return record[key]


def _as_int(value: Any, key: str, where: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidDataError(f"{where}: field {key!r} must be an integer, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise InvalidDataError(f"{where}: field {key!r} must be >= {minimum}, got {value}")
    return int(value)


def _as_float(value: Any, key: str, where: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidDataError(f"{where}: field {key!r} must be a number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or (positive and value <= 0):
        raise InvalidDataError(f"{where}: field {key!r} must be a finite{' positive' if positive else ''} number, got {value}")
    return value


def _as_str(value: Any, key: str, where: str, *, max_len: int = 256, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise InvalidDataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if len(value) > max_len or (not allow_empty and not value):
        raise InvalidDataError(f"{where}: field {key!r} must be a string of 1..{max_len} characters")
    return value


def _as_ids(value: Any, key: str, where: str) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise InvalidDataError(f"{where}: field {key!r} must be a list of integers, got {type(value).__name__}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise InvalidDataError(f"{where}: field {key!r} must hold non-negative integer ids, got {v!r}")
        out.append(int(v))
    return out


def _as_bool(value: Any, key: str, where: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidDataError(f"{where}: field {key!r} must be true or false, got {type(value).__name__}")
    return bool(value)


def _as_records(value: Any, key: str, where: str, *, max_len: int = 1_000_000) -> list[dict[str, Any]]:
    """A JSON list of objects (e.g. per-group verification records)."""
    if not isinstance(value, str) or len(value) > max_len:
        raise InvalidDataError(f"{where}: field {key!r} must be a JSON string of at most {max_len} characters")
    try:
        out = json.loads(value)
    except ValueError as err:
        raise InvalidDataError(f"{where}: field {key!r} is not valid JSON ({err})") from None
    if not isinstance(out, list) or not all(isinstance(r, dict) for r in out):
        raise InvalidDataError(f"{where}: field {key!r} must be a JSON list of objects")
    return out


def _json_value(value: Any) -> Any:
    """numpy scalars / arrays as plain JSON values."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _config(content: Any, name: str, where: str) -> Mapping[str, Any]:
    _, ConfigRecord, _, RecordDict = _records()
    if not isinstance(content, RecordDict):
        raise InvalidDataError(f"{where}: content must be a RecordDict, got {type(content).__name__}")
    if name not in content or not isinstance(content[name], ConfigRecord):
        raise InvalidDataError(f"{where}: missing ConfigRecord {name!r}")
    return content[name]


# ---------------------------------------------------------------- the federation spec


@dataclass(frozen=True)
class FederationSpec:
    """What every party rebuilds identically: the benchmark's data and how it is split across clients."""

    benchmark: str = "digits"
    scenario: str = "class"
    seed: int = 0
    n_clients: int = 10
    scheme: str = "iid"
    # backdoor scenario: ``backdoor_n`` seeded ids of client ``backdoor_client``'s partition carry a trigger and the
    # target label (:func:`erasus_ray.federated.partition.backdoor`); -1 / 0: none
    backdoor_client: int = -1
    backdoor_n: int = 0

    def to_config(self) -> dict[str, Any]:
        return {f"fed.{k}": v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, record: Mapping[str, Any], where: str = "spec") -> "FederationSpec":
        return cls(
            benchmark=_as_str(_get(record, "fed.benchmark", where), "fed.benchmark", where, allow_empty=False),
            scenario=_as_str(_get(record, "fed.scenario", where), "fed.scenario", where, allow_empty=False),
            seed=_as_int(_get(record, "fed.seed", where), "fed.seed", where),
            n_clients=_as_int(_get(record, "fed.n_clients", where), "fed.n_clients", where, minimum=1),
            scheme=_as_str(_get(record, "fed.scheme", where), "fed.scheme", where, allow_empty=False),
            backdoor_client=_as_int(record.get("fed.backdoor_client", -1), "fed.backdoor_client", where, minimum=-1),
            backdoor_n=_as_int(record.get("fed.backdoor_n", 0), "fed.backdoor_n", where, minimum=0),
        )


# ---------------------------------------------------------------- query.hello


@dataclass
class Hello:
    spec: FederationSpec

    def to_content(self) -> Any:
        _, ConfigRecord, _, RecordDict = _records()
        return RecordDict({"config": ConfigRecord(self.spec.to_config())})

    @classmethod
    def from_content(cls, content: Any) -> "Hello":
        return cls(FederationSpec.from_config(_config(content, "config", MSG_HELLO), MSG_HELLO))


@dataclass
class HelloReply:
    client_id: str
    n_ids: int

    def to_content(self) -> Any:
        _, ConfigRecord, _, RecordDict = _records()
        return RecordDict({"config": ConfigRecord({"client_id": self.client_id, "n_ids": self.n_ids})})

    @classmethod
    def from_content(cls, content: Any) -> "HelloReply":
        where = f"{MSG_HELLO} reply"
        rec = _config(content, "config", where)
        return cls(
            _as_str(_get(rec, "client_id", where), "client_id", where, allow_empty=False),
            _as_int(_get(rec, "n_ids", where), "n_ids", where, minimum=0),
        )


# ---------------------------------------------------------------- query.delete


ACK_SCOPES = ("request", "message")


@dataclass
class DeleteAck:
    """The server's answer to one submitted request: ``state`` is its ledger state, ``reason`` why if rejected.

    ``scope="message"``: the answer to a reply that could not be read as requests at all (no ``config`` record, a bad
    ``n_requests``, a ``request.<i>`` that is not a ConfigRecord, unexpected records); ``request_id`` is then empty
    and ``reason`` says what was wrong. Nothing of such a reply reaches the ledger.
    """

    request_id: str
    accepted: bool
    state: str
    reason: str = ""
    scope: str = "request"


@dataclass
class DeleteQuery:
    """Server -> client: acknowledgements of requests seen so far; asks for any new ones."""

    acks: list[DeleteAck] = field(default_factory=list)

    def to_content(self) -> Any:
        _, ConfigRecord, _, RecordDict = _records()
        content = RecordDict({"config": ConfigRecord({"n_acks": len(self.acks)})})
        for i, ack in enumerate(self.acks):
            content[f"ack.{i}"] = ConfigRecord(asdict(ack))
        return content

    @classmethod
    def from_content(cls, content: Any) -> "DeleteQuery":
        rec = _config(content, "config", MSG_DELETE)
        n = _as_int(_get(rec, "n_acks", MSG_DELETE), "n_acks", MSG_DELETE, minimum=0)
        acks = []
        for i in range(n):
            where = f"{MSG_DELETE} ack.{i}"
            a = _config(content, f"ack.{i}", where)
            accepted = _get(a, "accepted", where)
            if not isinstance(accepted, bool):
                raise InvalidDataError(f"{where}: field 'accepted' must be a bool")
            scope = _as_str(a.get("scope", "request"), "scope", where)
            if scope not in ACK_SCOPES:
                raise InvalidDataError(f"{where}: field 'scope' must be one of {list(ACK_SCOPES)}, got {scope[:40]!r}")
            acks.append(
                DeleteAck(
                    _as_str(_get(a, "request_id", where), "request_id", where, allow_empty=scope == "message"),
                    accepted,
                    _as_str(_get(a, "state", where), "state", where),
                    _as_str(a.get("reason", ""), "reason", where, max_len=4096),
                    scope,
                )
            )
        return cls(acks)


@dataclass
class MalformedRecord:
    """A ``request.<i>`` slot of a ``query.delete`` reply that holds no ConfigRecord (missing, or another record
    type): there is nothing to hand to the ledger, only a reason to send back."""

    index: int
    reason: str


@dataclass
class DeleteSubmission:
    """Client -> server: the deletion requests its users filed (``DeletionRequest`` of :mod:`erasus_ray.ledger`)."""

    requests: list[Any] = field(default_factory=list)  # erasus_ray.ledger.requests.DeletionRequest

    def to_content(self) -> Any:
        _, ConfigRecord, _, RecordDict = _records()
        content = RecordDict({"config": ConfigRecord({"n_requests": len(self.requests)})})
        for i, req in enumerate(self.requests):
            content[f"request.{i}"] = ConfigRecord(req.to_record())
        return content

    @classmethod
    def records(cls, content: Any, max_requests: int = 64) -> list[Any]:
        """The envelope checked, then one item per ``request.<i>``: its ConfigRecord as it came (the ledger parses
        and judges it, storing a malformed one as ``rejected`` with the reason) or a :class:`MalformedRecord`.

        Raises InvalidDataError for an envelope that cannot be read: content not a RecordDict, no ``config``
        ConfigRecord, ``n_requests`` missing / not an integer / negative / over ``max_requests``, or records other
        than ``config`` and ``request.0 .. request.<n-1>``.
        """
        _, ConfigRecord, _, _ = _records()
        where = f"{MSG_DELETE} reply"
        rec = _config(content, "config", where)
        n = _as_int(_get(rec, "n_requests", where), "n_requests", where, minimum=0)
        if n > max_requests:
            raise InvalidDataError(f"{where}: {n} requests in one message; at most {max_requests}")
        expected = {"config", *(f"request.{i}" for i in range(n))}
        unexpected = sorted(str(k)[:40] for k in content.keys() if k not in expected)
        if unexpected:
            raise InvalidDataError(f"{where}: unexpected record(s) {unexpected[:5]} (n_requests={n})")
        items: list[Any] = []
        for i in range(n):
            key = f"request.{i}"
            if key not in content:
                items.append(MalformedRecord(i, f"{key}: missing (n_requests={n})"))
            elif not isinstance(content[key], ConfigRecord):
                items.append(MalformedRecord(i, f"{key}: must be a ConfigRecord, got {type(content[key]).__name__}"))
            else:
                items.append(content[key])
        return items

    @classmethod
    def parse(cls, content: Any, max_requests: int = 64) -> tuple["DeleteSubmission", list[str]]:
        """The well-formed requests and a reason per malformed one (a bad record never hides the good ones)."""
        from erasus_ray.errors import InvalidRequestError
        from erasus_ray.ledger.requests import DeletionRequest

        good, errors = [], []
        for i, item in enumerate(cls.records(content, max_requests)):
            if isinstance(item, MalformedRecord):
                errors.append(item.reason)
                continue
            try:
                good.append(DeletionRequest.from_record(item))
            except (InvalidDataError, InvalidRequestError) as err:
                errors.append(f"request.{i}: {err}")
        return cls(good), errors

    @classmethod
    def from_content(cls, content: Any) -> "DeleteSubmission":
        sub, errors = cls.parse(content)
        if errors:
            raise InvalidDataError("; ".join(errors))
        return sub


# ---------------------------------------------------------------- train / train.repair / train.unlearn


def state_to_arrays(state: Mapping[str, torch.Tensor]) -> Any:
    ArrayRecord, *_ = _records()
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def arrays_to_state(record: Any, where: str) -> dict[str, torch.Tensor]:
    ArrayRecord, *_ = _records()
    if not isinstance(record, ArrayRecord):
        raise InvalidDataError(f"{where}: missing ArrayRecord 'arrays'")
    state = record.to_torch_state_dict()
    for k, v in state.items():
        if not torch.isfinite(v).all():
            raise InvalidDataError(f"{where}: array {k!r} has non-finite values")
    return state


@dataclass
class TrainInstruction:
    """``train`` (FedAvg local training) and ``train.repair`` (retain-only repair): start from ``state``."""

    state: dict[str, torch.Tensor]
    spec: FederationSpec
    round: int
    lr: float
    epochs: int
    batch_size: int = 32
    seed: int = 0
    exclude_ids: list[int] = field(default_factory=list)

    def to_content(self) -> Any:
        _, ConfigRecord, _, RecordDict = _records()
        cfg = {
            **self.spec.to_config(),
            "round": self.round,
            "lr": self.lr,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "exclude_ids": [int(i) for i in self.exclude_ids],
        }
        return RecordDict({"arrays": state_to_arrays(self.state), "config": ConfigRecord(cfg)})

    @classmethod
    def from_content(cls, content: Any, where: str = MSG_TRAIN) -> "TrainInstruction":
        rec = _config(content, "config", where)
        return cls(
            state=arrays_to_state(content.get("arrays") if hasattr(content, "get") else None, where),
            spec=FederationSpec.from_config(rec, where),
            round=_as_int(_get(rec, "round", where), "round", where, minimum=0),
            lr=_as_float(_get(rec, "lr", where), "lr", where, positive=True),
            epochs=_as_int(_get(rec, "epochs", where), "epochs", where, minimum=1),
            batch_size=_as_int(_get(rec, "batch_size", where), "batch_size", where, minimum=1),
            seed=_as_int(_get(rec, "seed", where), "seed", where),
            exclude_ids=_as_ids(_get(rec, "exclude_ids", where), "exclude_ids", where),
        )


@dataclass
class UnlearnInstruction:
    """``train.unlearn``: unlearn forget ids locally (coreset by ``selector``, then ``strategy``).

    One instruction serves a whole batch on one client (``request_id`` is then the batch id): ``ids`` are every
    forget id of the batch on this client, split into ``groups`` that differ in when to stop - e.g. an operator's
    class removal runs the strategy's epochs (``None``), samples of a client stop at the global test accuracy. Sent as
    ``ids`` (the groups concatenated), ``group_sizes`` and ``group_targets`` (-1 = None); without groups, ``ids`` is
    one group with ``forget_target``.
    """

    state: dict[str, torch.Tensor]
    spec: FederationSpec
    request_id: str
    level: str
    ids: list[int] = field(default_factory=list)
    label: int | None = None
    strategy: str = "grad_diff"
    selector: str = "el2n"
    fraction: float = 1.0
    epochs: int = 0  # 0: the strategy's default
    lr: float = 0.0  # 0: the strategy's default
    seed: int = 0
    exclude_ids: list[int] = field(default_factory=list)
    forget_target: float | None = None  # stop once local forget accuracy is at or below this (None: run all epochs)
    group_sizes: list[int] = field(default_factory=list)
    group_targets: list[float | None] = field(default_factory=list)
    # the client passes its local held-out split (Federation.client_heldout) to the controller: a group without a
    # forget_target then runs closed-loop under the ``heldout`` target (a whole class stays ``class``)
    local_heldout: bool = False

    @classmethod
    def for_groups(cls, state: Any, spec: "FederationSpec", request_id: str, groups: list[tuple[list[int], float | None]], **kwargs: Any) -> "UnlearnInstruction":
        """A sample-level instruction for ``[(ids, forget_target), ...]`` (empty groups dropped)."""
        groups = [(list(map(int, ids)), t) for ids, t in groups if len(ids)]
        return cls(
            state, spec, request_id, "sample", ids=[i for ids, _ in groups for i in ids],
            group_sizes=[len(ids) for ids, _ in groups], group_targets=[t for _, t in groups], **kwargs,
        )

    def groups(self) -> list[tuple[list[int], float | None]]:
        """``[(ids, forget_target), ...]``: the groups, or ``ids`` as one group with ``forget_target``."""
        if not self.group_sizes:
            return [(list(self.ids), self.forget_target)]
        out, start = [], 0
        for size, target in zip(self.group_sizes, self.group_targets):
            out.append((list(self.ids[start:start + size]), target))
            start += size
        return out

    def to_content(self) -> Any:
        _, ConfigRecord, _, RecordDict = _records()
        cfg = {
            **self.spec.to_config(),
            "forget_target": -1.0 if self.forget_target is None else float(self.forget_target),
            "group_sizes": [int(n) for n in self.group_sizes],
            "group_targets": [-1.0 if t is None else float(t) for t in self.group_targets],
            "request_id": self.request_id,
            "level": self.level,
            "ids": [int(i) for i in self.ids],
            "label": -1 if self.label is None else int(self.label),
            "strategy": self.strategy,
            "selector": self.selector,
            "fraction": float(self.fraction),
            "epochs": int(self.epochs),
            "lr": float(self.lr),
            "seed": self.seed,
            "exclude_ids": [int(i) for i in self.exclude_ids],
            "local_heldout": bool(self.local_heldout),
        }
        return RecordDict({"arrays": state_to_arrays(self.state), "config": ConfigRecord(cfg)})

    @classmethod
    def from_content(cls, content: Any) -> "UnlearnInstruction":
        where = MSG_UNLEARN
        rec = _config(content, "config", where)
        level = _as_str(_get(rec, "level", where), "level", where)
        if level not in ("sample", "class"):
            raise InvalidDataError(f"{where}: field 'level' must be 'sample' or 'class' (client level is FedEraser), got {level!r}")
        fraction = _as_float(_get(rec, "fraction", where), "fraction", where, positive=True)
        if fraction > 1:
            raise InvalidDataError(f"{where}: field 'fraction' must be in (0, 1], got {fraction}")
        label = _as_int(_get(rec, "label", where), "label", where, minimum=-1)
        target = _as_float(_get(rec, "forget_target", where), "forget_target", where)
        if target > 1:
            raise InvalidDataError(f"{where}: field 'forget_target' must be <= 1, got {target}")
        ids = _as_ids(_get(rec, "ids", where), "ids", where)
        sizes = _as_ids(rec.get("group_sizes", []), "group_sizes", where)
        raw_targets = rec.get("group_targets", [])
        if not isinstance(raw_targets, list):
            raise InvalidDataError(f"{where}: field 'group_targets' must be a list of numbers")
        targets = [_as_float(t, "group_targets", where) for t in raw_targets]
        if len(targets) != len(sizes) or (sizes and sum(sizes) != len(ids)) or any(t > 1 for t in targets):
            raise InvalidDataError(
                f"{where}: 'group_sizes' ({len(sizes)} groups, {sum(sizes)} ids) and 'group_targets' ({len(targets)}, each <= 1) "
                f"must describe the {len(ids)} ids"
            )
        if sizes and level != "sample":
            raise InvalidDataError(f"{where}: groups are for sample-level instructions")
        return cls(
            group_sizes=sizes,
            group_targets=[None if t < 0 else t for t in targets],
            forget_target=None if target < 0 else target,
            state=arrays_to_state(content.get("arrays"), where),
            spec=FederationSpec.from_config(rec, where),
            request_id=_as_str(_get(rec, "request_id", where), "request_id", where, allow_empty=False),
            level=level,
            ids=ids,
            label=None if label < 0 else label,
            strategy=_as_str(_get(rec, "strategy", where), "strategy", where, allow_empty=False),
            selector=_as_str(_get(rec, "selector", where), "selector", where),
            fraction=fraction,
            epochs=_as_int(_get(rec, "epochs", where), "epochs", where, minimum=0),
            lr=_as_float(_get(rec, "lr", where), "lr", where),
            seed=_as_int(_get(rec, "seed", where), "seed", where),
            exclude_ids=_as_ids(_get(rec, "exclude_ids", where), "exclude_ids", where),
            local_heldout=_as_bool(rec.get("local_heldout", False), "local_heldout", where),
        )


@dataclass
class ModelUpdate:
    """Client -> server after ``train`` / ``train.repair`` / ``train.unlearn``: new weights and FedAvg weight.

    ``num_examples`` is the FedAvg weight (local training samples). For unlearning, ``forget_ids`` are the ids the
    client resolved and unlearned (a class request resolves its label locally) and ``coreset_ids`` the selection.
    ``verification``: per group of forget ids, the controller's verification of the client's run on it
    (:func:`~erasus_ray.evaluation.verification.verification_record`: target, criteria, passed, steps, ...), sent as
    JSON in the config record.
    """

    state: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    request_id: str = ""
    forget_ids: list[int] = field(default_factory=list)
    coreset_ids: list[int] = field(default_factory=list)
    verification: list[dict[str, Any]] = field(default_factory=list)

    def to_content(self) -> Any:
        _, ConfigRecord, MetricRecord, RecordDict = _records()
        return RecordDict(
            {
                "arrays": state_to_arrays(self.state),
                "metrics": MetricRecord({"num-examples": int(self.num_examples), **{k: float(v) for k, v in self.metrics.items()}}),
                "config": ConfigRecord(
                    {"request_id": self.request_id, "forget_ids": list(self.forget_ids), "coreset_ids": list(self.coreset_ids),
                     "verification": json.dumps(self.verification, default=_json_value)}
                ),
            }
        )

    @classmethod
    def from_content(cls, content: Any, where: str = "update") -> "ModelUpdate":
        _, _, MetricRecord, _ = _records()
        rec = _config(content, "config", where)
        metrics = content.get("metrics")
        if not isinstance(metrics, MetricRecord):
            raise InvalidDataError(f"{where}: missing MetricRecord 'metrics'")
        n = _as_int(_get(metrics, "num-examples", where), "num-examples", where, minimum=0)
        return cls(
            state=arrays_to_state(content.get("arrays"), where),
            num_examples=n,
            metrics={k: float(v) for k, v in metrics.items() if k != "num-examples" and isinstance(v, (int, float))},
            request_id=_as_str(_get(rec, "request_id", where), "request_id", where),
            forget_ids=_as_ids(_get(rec, "forget_ids", where), "forget_ids", where),
            coreset_ids=_as_ids(_get(rec, "coreset_ids", where), "coreset_ids", where),
            verification=_as_records(rec.get("verification", "[]"), "verification", where),
        )


def content_bytes(content: Any) -> int:
    """Bytes of the arrays a message carries (what the benchmark reports as traffic)."""
    ArrayRecord, *_ = _records()
    return sum(int(rec.count_bytes()) for rec in content.values() if isinstance(rec, ArrayRecord))


__all__ = [
    "MSG_DELETE", "MSG_HELLO", "MSG_REPAIR", "MSG_TRAIN", "MSG_UNLEARN", "DeleteAck", "DeleteQuery", "DeleteSubmission", "MalformedRecord",
    "FederationSpec", "Hello", "HelloReply", "ModelUpdate", "TrainInstruction", "UnlearnInstruction", "arrays_to_state",
    "content_bytes", "state_to_arrays",
]
