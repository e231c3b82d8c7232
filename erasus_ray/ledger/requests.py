"""Deletion requests: what a client (or the operator) asks to forget, and the checks a request must pass.

A :class:`DeletionRequest` is a plain record that travels as a dict (JSON, a Flower ``ConfigRecord``): it names the
requesting client, a level (``sample`` ids, a ``class`` label, or the whole ``client``), and a client-supplied
``request_id`` that is the idempotency key of the ledger. :func:`validate` checks it against the partition registry
(:class:`OwnershipRegistry`: which client owns which dataset ids) and :class:`RequestLimits` (size and rate), and raises
:class:`~erasus_ray.errors.InvalidRequestError` (or :class:`~erasus_ray.errors.UnauthorizedRequestError` for another
client's ids) whose ``code`` says why.

Example:
    >>> owners = OwnershipRegistry({"alice": [0, 1, 2], "bob": [3, 4]})
    >>> req = DeletionRequest(request_id="r-1", client_id="alice", level="sample", ids=[1, 2])
    >>> validate(req, owners, RequestLimits(max_ids=100, max_requests_per_minute=10))
    >>> owners.resolve(req).tolist()
    [1, 2]
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from erasus_ray.errors import InvalidDataError, InvalidRequestError, UnauthorizedRequestError

LEVELS: tuple[str, ...] = ("sample", "class", "client")
#: request and client ids: 1-128 characters, a letter or digit first, then letters, digits and ``. _ : @ / -``.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/\-]{0,127}")
MAX_REASON_CHARS = 2000
#: the latest ``created_at`` a request may claim: 2100-01-01T00:00:00Z. The claim is the client's, kept for the audit
#: only (the ledger records its own receive time); the bound keeps every stored claim printable as a date.
MAX_CREATED_AT = 4_102_444_800.0
_INT64 = 2**63
_FIELDS = ("request_id", "client_id", "level", "ids", "label", "reason", "created_at")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _fail(message: str, code: str = "malformed", request_id: str | None = None) -> InvalidRequestError:
    return InvalidRequestError(message, code=code, request_id=request_id)


@dataclass
class DeletionRequest:
    """One request to forget data.

    Attributes:
        request_id: client-supplied idempotency key; resubmitting the same id never creates a second request.
        client_id: who asks (the owner of the data, or an operator id registered in :class:`OwnershipRegistry`).
        level: ``"sample"`` (forget ``ids``), ``"class"`` (forget the requester's samples with ``label``; all samples
            with it for an operator) or ``"client"`` (forget everything the requester contributed).
        ids: dataset ids to forget (``sample`` level only), never loader positions.
        label: the class to forget (``class`` level only).
        reason: free text for the audit trail (e.g. "GDPR art. 17 request #123").
        created_at: when the client says it created it, seconds since the epoch (UTC), in ``[0, MAX_CREATED_AT]``.
            A claim kept for the audit only: the ledger records its own receive time (``LedgerEntry.received_at``).
    """

    request_id: str
    client_id: str
    level: str = "sample"
    ids: list[int] | None = None
    label: int | None = None
    reason: str = ""
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.ids is not None:
            self.ids = [int(i) for i in self.ids]
        if self.label is not None:
            self.label = int(self.label)
        self.created_at = float(self.created_at)

    # ---- plain dict form (JSON, Flower ConfigRecord) -------------------------------------------------------------
    def to_dict(self, *, drop_none: bool = False) -> dict[str, Any]:
        """A plain dict of str/int/float/list[int]; ``drop_none=True`` leaves out unset fields (ConfigRecord has no None)."""
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "client_id": self.client_id,
            "level": self.level,
            "ids": None if self.ids is None else list(self.ids),
            "label": self.label,
            "reason": self.reason,
            "created_at": self.created_at,
        }
        if drop_none:
            out = {k: v for k, v in out.items() if v is not None}
        return out

    def to_record(self) -> dict[str, Any]:
        """``to_dict(drop_none=True)``: ready for a Flower ``ConfigRecord``."""
        return self.to_dict(drop_none=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DeletionRequest":
        """Parse a dict (or a Flower ``ConfigRecord``); raises :class:`InvalidRequestError` ``malformed`` with the field at fault.

        Missing optional fields take their defaults; unknown keys are refused (a typo such as ``idz`` must not turn
        a sample request into something else).
        """
        if not isinstance(data, Mapping):
            raise _fail(f"a deletion request must be a mapping, got {type(data).__name__}")
        try:
            keys = list(data.keys())
        except Exception as err:  # a hostile Mapping
            raise _fail(f"cannot read the request's keys: {err}") from None
        request_id = data.get("request_id") if "request_id" in keys else None
        rid = request_id if isinstance(request_id, str) else None
        bad = [k for k in keys if k not in _FIELDS]
        if bad:
            shown = [str(k)[:40] for k in bad[:5]]
            raise _fail(f"unknown field(s) {shown}; a request has {list(_FIELDS)}", request_id=rid)
        for required in ("request_id", "client_id"):
            if required not in keys:
                raise _fail(f"field {required!r} is missing", request_id=rid)
        kwargs = {k: data[k] for k in keys}
        ids = kwargs.get("ids")
        if ids is not None and not isinstance(ids, (list, tuple, np.ndarray)):
            raise _fail(f"field 'ids' must be a list of integers, got {type(ids).__name__}", request_id=rid)
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1:
                raise _fail(f"field 'ids' must be one-dimensional, got shape {ids.shape}", request_id=rid)
            kwargs["ids"] = ids.tolist()
        elif isinstance(ids, tuple):
            kwargs["ids"] = list(ids)
        return cls(**kwargs)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "DeletionRequest":
        """Alias of :meth:`from_dict` for a Flower ``ConfigRecord`` (a Mapping of str to scalars and lists)."""
        return cls.from_dict(record)

    def fingerprint(self) -> str:
        """SHA-256 of what the request asks (not ``created_at``): a resubmission must match it to be the same request."""
        body = {k: v for k, v in self.to_dict().items() if k != "created_at"}
        if body["ids"] is not None:
            body["ids"] = sorted(body["ids"])
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_fields(request: DeletionRequest) -> None:
    """Types and shapes of every field; raises :class:`InvalidRequestError` ``malformed`` (or ``empty_ids``)."""
    rid = request.request_id if isinstance(request.request_id, str) else None
    for name in ("request_id", "client_id"):
        value = getattr(request, name)
        if not isinstance(value, str):
            raise _fail(f"field {name!r} must be a string, got {type(value).__name__}", request_id=rid)
        if not NAME_PATTERN.fullmatch(value):
            raise _fail(
                f"field {name!r} must be 1-128 characters of letters, digits and '._:@/-' starting with a letter or digit, "
                f"got {value[:40]!r}{'...' if len(value) > 40 else ''}",
                request_id=rid,
            )
    if not isinstance(request.level, str) or request.level not in LEVELS:
        raise _fail(f"field 'level' must be one of {list(LEVELS)}, got {str(request.level)[:40]!r}", request_id=rid)
    ids = request.ids
    if ids is not None:
        if not isinstance(ids, (list, tuple)):
            raise _fail(f"field 'ids' must be a list of integers, got {type(ids).__name__}", request_id=rid)
        wrong = [i for i in ids if not _is_int(i)]
        if wrong:
            raise _fail(
                f"field 'ids' must hold integers only; got {len(wrong)} other value(s), e.g. {str(wrong[0])[:40]!r} "
                f"({type(wrong[0]).__name__})",
                request_id=rid,
            )
        if len(set(int(i) for i in ids)) != len(ids):
            raise _fail("field 'ids' repeats an id; list each id once", request_id=rid)
        if any(int(i) < 0 for i in ids):
            raise _fail("field 'ids' holds a negative id; dataset ids are >= 0", request_id=rid)
        if any(int(i) >= _INT64 for i in ids):
            raise _fail("field 'ids' holds an id >= 2**63; dataset ids are 64-bit integers", request_id=rid)
    label = request.label
    if label is not None and not _is_int(label):
        raise _fail(f"field 'label' must be an integer, got {type(label).__name__}", request_id=rid)
    if label is not None and not -_INT64 <= int(label) < _INT64:
        raise _fail("field 'label' is outside the 64-bit integer range", request_id=rid)
    if request.level == "sample":
        if ids is None:
            raise _fail("a sample-level request needs 'ids'", code="empty_ids", request_id=rid)
        if len(ids) == 0:
            raise _fail("field 'ids' is empty: nothing to forget", code="empty_ids", request_id=rid)
        if label is not None:
            raise _fail("a sample-level request takes 'ids', not 'label'", request_id=rid)
    elif request.level == "class":
        if label is None:
            raise _fail("a class-level request needs 'label'", request_id=rid)
        if ids is not None:
            raise _fail("a class-level request takes 'label', not 'ids'", request_id=rid)
    else:  # client
        if ids is not None or label is not None:
            raise _fail("a client-level request takes neither 'ids' nor 'label': it forgets all of the client's data", request_id=rid)
    if not isinstance(request.reason, str):
        raise _fail(f"field 'reason' must be a string, got {type(request.reason).__name__}", request_id=rid)
    if "\x00" in request.reason:
        raise _fail("field 'reason' contains a NUL character", request_id=rid)
    if len(request.reason) > MAX_REASON_CHARS:
        raise _fail(f"field 'reason' has {len(request.reason)} characters; at most {MAX_REASON_CHARS}", request_id=rid)
    created = request.created_at
    if not (_is_int(created) or isinstance(created, (float, np.floating))) or isinstance(created, bool):
        raise _fail(f"field 'created_at' must be seconds since the epoch, got {type(created).__name__}", request_id=rid)
    if not created_at_in_range(created):
        raise _fail(
            f"field 'created_at' must be seconds since the epoch between 0 and {MAX_CREATED_AT:.0f} (2100-01-01 UTC), "
            f"got {_shown(created)}",
            request_id=rid,
        )


def _shown(value: Any) -> str:
    """At most 40 characters of a value for a message (an int too long for ``str`` is described by its size)."""
    try:
        return str(value)[:40]
    except ValueError:  # Python refuses to print ints of more than 4300 digits
        return f"an integer of {int(value).bit_length()} bits"


def created_at_in_range(value: Any) -> bool:
    """Whether ``value`` is a number in ``[0, MAX_CREATED_AT]`` (finite): a claim the ledger can store and print."""
    if isinstance(value, (bool, np.bool_)) or not (_is_int(value) or isinstance(value, (float, np.floating))):
        return False
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        return False
    return math.isfinite(number) and 0.0 <= number <= MAX_CREATED_AT


class OwnershipRegistry:
    """Which client owns which dataset ids (the federated partition), and optional labels per id.

    Args:
        owners: client id -> the dataset ids in its partition. An id may belong to one client only.
        labels: dataset id -> class label, needed to resolve class-level requests.
        operators: ids of server operators, who may name any known id and forget a class across all clients.

    Example:
        >>> reg = OwnershipRegistry({"c0": range(0, 50), "c1": range(50, 100)}, operators=["server"])
        >>> reg.owner_of(57)
        'c1'
    """

    def __init__(
        self,
        owners: Mapping[str, Iterable[int]],
        labels: Mapping[int, int] | None = None,
        operators: Iterable[str] = (),
    ) -> None:
        if not isinstance(owners, Mapping):
            raise InvalidDataError(f"owners must map client id -> ids, got {type(owners).__name__}")
        self._ids: dict[str, np.ndarray] = {}
        self._owner: dict[int, str] = {}
        for client, ids in owners.items():
            arr = np.unique(np.asarray(list(ids), dtype=np.int64))
            self._ids[str(client)] = arr
            for i in arr.tolist():
                if i in self._owner:
                    raise InvalidDataError(f"id {i} is owned by both {self._owner[i]!r} and {client!r}")
                self._owner[i] = str(client)
        self._labels = None if labels is None else {int(k): int(v) for k, v in labels.items()}
        self.operators = frozenset(str(o) for o in operators)

    @classmethod
    def from_partition(
        cls, partitions: Iterable[Iterable[int]], *, prefix: str = "client-", labels: Mapping[int, int] | None = None,
        operators: Iterable[str] = (),
    ) -> "OwnershipRegistry":
        """Clients named ``prefix + index`` from a list of id lists (client ``i`` owns ``partitions[i]``)."""
        return cls({f"{prefix}{k}": ids for k, ids in enumerate(partitions)}, labels=labels, operators=operators)

    @property
    def clients(self) -> list[str]:
        return sorted(self._ids)

    def owner_of(self, sample_id: int) -> str | None:
        return self._owner.get(int(sample_id))

    def ids_of(self, client_id: str) -> np.ndarray:
        """The ids the client owns (sorted; empty for an unknown client)."""
        return self._ids.get(client_id, np.empty(0, dtype=np.int64))

    def is_known(self, client_id: str) -> bool:
        return client_id in self._ids or client_id in self.operators

    def label_of(self, sample_id: int) -> int | None:
        return None if self._labels is None else self._labels.get(int(sample_id))

    def resolve(self, request: DeletionRequest) -> np.ndarray:
        """The dataset ids a (valid) request forgets, sorted ascending."""
        if request.level == "sample":
            return np.unique(np.asarray(request.ids, dtype=np.int64))
        if request.level == "client":
            return self.ids_of(request.client_id).copy()
        if self._labels is None:
            raise InvalidDataError("this registry has no labels: cannot resolve a class-level request")
        scope = np.fromiter(self._owner, dtype=np.int64) if request.client_id in self.operators else self.ids_of(request.client_id)
        return np.sort(np.asarray([i for i in scope.tolist() if self._labels.get(i) == request.label], dtype=np.int64))


@dataclass
class RequestLimits:
    """Size and rate limits per request and client.

    Attributes:
        max_ids: most ids one sample-level request may name.
        max_requests_per_minute: most requests a client may submit in any sliding 60-second window; ``None``
            disables it. Through :meth:`DeletionLedger.submit <erasus_ray.ledger.DeletionLedger.submit>` (what the
            servers use) the window is counted from the ledger's rows - the client's accepted requests received in
            the last 60 s - so it survives a restart and is shared by every process on that ledger. Only the
            standalone :func:`validate` uses the in-memory window of this object (:meth:`admit`: every submission that
            names a well-formed client id counts, accepted or not).
    """

    max_ids: int = 10_000
    max_requests_per_minute: int | None = 60
    _windows: dict[str, deque] = field(default_factory=dict, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from erasus_ray.errors import InvalidConfigError

        if not _is_int(self.max_ids) or self.max_ids < 1:
            raise InvalidConfigError(f"max_ids must be a positive integer, got {self.max_ids!r}")
        rpm = self.max_requests_per_minute
        if rpm is not None and (not _is_int(rpm) or rpm < 1):
            raise InvalidConfigError(f"max_requests_per_minute must be a positive integer or None, got {rpm!r}")

    def admit(self, client_id: str, now: float | None = None) -> bool:
        """Count one request by ``client_id`` at ``now``; False when it exceeds the per-minute limit (then not counted)."""
        if self.max_requests_per_minute is None:
            return True
        now = time.monotonic() if now is None else float(now)
        with self._lock:
            window = self._windows.setdefault(client_id, deque())
            while window and window[0] <= now - 60.0:
                window.popleft()
            if len(window) >= self.max_requests_per_minute:
                return False
            window.append(now)
            return True


def _refuse_not_own(request: DeletionRequest, unknown: list[int], ownership: OwnershipRegistry) -> None:
    """A client's view of ids that are not its own: one code (``not_owner``) and one message whether an id is
    unknown or another client's, so a client cannot probe which ids other clients hold. The split is kept on the
    error's ``audit_detail`` for the ledger's own audit (never sent to the client)."""
    foreign = sorted(i for i in request.ids or () if ownership.owner_of(i) not in (None, request.client_id))
    if not unknown and not foreign:
        return
    bad = sorted(set(unknown) | set(foreign))
    err = UnauthorizedRequestError(
        f"client {request.client_id!r} does not own {len(bad)} of the requested id(s): {bad[:10]}{' ...' if len(bad) > 10 else ''}",
        code="not_owner",
        request_id=request.request_id,
    )
    err.audit_detail = {"unknown_ids": len(unknown), "other_clients_ids": len(foreign)}  # type: ignore[attr-defined]
    raise err


def validate(
    request: DeletionRequest,
    ownership: OwnershipRegistry | None = None,
    limits: RequestLimits | None = None,
    *,
    now: float | None = None,
    sender: str | None = None,
) -> None:
    """Check a request; return None if it may be executed, else raise with the reason.

    ``sender``: the authenticated identity that delivered the request (e.g. the Flower node's client); when given, a
    request in another client's name is refused (``impersonation``) unless the sender is a registered operator, and
    ids that are not the client's own are refused with one code (``not_owner``) whether they are unknown or another
    client's: a client learns only that they are not its own (no enumeration oracle). Without a sender (the
    operator's console) or for an operator, ``unknown_ids`` and ``not_owner`` stay apart.

    Checks, in order: field types and shapes (``malformed``, ``empty_ids``); the client's rate (``rate_limited``); the
    number of ids (``too_many_ids``); with a registry: the requester is known (``unknown_client``), every id exists
    (``unknown_ids``), every id is the requester's own unless it is an operator (``not_owner``, as
    :class:`UnauthorizedRequestError`), and a class/client request resolves to at least one id (``empty_ids``).

    Raises:
        InvalidRequestError: with ``code`` and ``request_id`` set.
        UnauthorizedRequestError: ids owned by another client.
    """
    if not isinstance(request, DeletionRequest):
        raise _fail(f"expected a DeletionRequest, got {type(request).__name__}")
    check_fields(request)
    rid = request.request_id
    if sender is not None and sender != request.client_id and not (ownership is not None and sender in ownership.operators):
        raise UnauthorizedRequestError(
            f"sender {str(sender)[:60]!r} may not submit a request in the name of {request.client_id!r}",
            code="impersonation",
            request_id=rid,
        )
    if limits is not None:
        if not limits.admit(request.client_id, now):
            raise _fail(
                f"client {request.client_id!r} exceeded {limits.max_requests_per_minute} requests per minute; retry later "
                "with a new request_id",
                code="rate_limited",
                request_id=rid,
            )
        if request.ids is not None and len(request.ids) > limits.max_ids:
            raise _fail(
                f"the request names {len(request.ids)} ids; at most {limits.max_ids} per request (split it)",
                code="too_many_ids",
                request_id=rid,
            )
    if ownership is None:
        return
    if not ownership.is_known(request.client_id):
        raise UnauthorizedRequestError(
            f"client {request.client_id!r} is not in the partition registry", code="unknown_client", request_id=rid
        )
    operator = request.client_id in ownership.operators
    if request.level == "sample":
        assert request.ids is not None
        unknown = sorted(i for i in request.ids if ownership.owner_of(i) is None)
        if sender is not None and not operator:
            _refuse_not_own(request, unknown, ownership)
        if unknown:
            raise _fail(
                f"{len(unknown)} id(s) are not in any partition: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}",
                code="unknown_ids",
                request_id=rid,
            )
        if not operator:
            foreign = sorted(i for i in request.ids if ownership.owner_of(i) != request.client_id)
            if foreign:
                raise UnauthorizedRequestError(
                    f"client {request.client_id!r} does not own {len(foreign)} of the requested id(s): "
                    f"{foreign[:10]}{' ...' if len(foreign) > 10 else ''}",
                    code="not_owner",
                    request_id=rid,
                )
    elif request.level == "client" and operator and request.client_id not in ownership.clients:
        raise _fail("an operator owns no data: send a client-level request in the leaving client's name", code="empty_ids", request_id=rid)
    if request.level in ("class", "client"):
        try:
            resolved = ownership.resolve(request)
        except InvalidDataError as err:
            raise _fail(str(err), request_id=rid) from None
        if len(resolved) == 0:
            what = f"label {request.label}" if request.level == "class" else "data"
            raise _fail(f"client {request.client_id!r} has no {what} to forget", code="empty_ids", request_id=rid)
