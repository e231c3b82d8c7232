"""The server side of federated deletion, written once against a transport (Flower grid or in process).

:class:`DeletionCoordinator` does, in order (and again after a restart, from what is on disk):

1. **discover** clients (``query.hello``: node -> ``client-<k>``; the Flower transport binds each node to the
   client its authenticated key is registered for, see ``server_app.GridTransport``);
2. **train** FedAvg rounds, storing per-round globals and client updates (:class:`FederatedHistory`, for FedEraser);
   a restarted server resumes from the last stored round. Between rounds it **collects** requests (step 3), so
   requests filed while the federation trains are in the ledger before the first unlearning round;
3. **collect** deletion requests (``query.delete``): each is checked against the partition registry, size and rate
   limits (rate counted from the ledger, so it survives restarts) and the sending node's identity in one ledger
   transaction, and answered on the client's next ``query.delete`` with its ledger state (a request naming another
   client's ids is refused and logged; a malformed reply gets a rejection with the reason);
4. **batch per round**: every unfinished ledger request is resumed (``ledger.pending()``, so nothing accepted is
   lost across crashes), then every request validated at that point goes into **one batch** (``validated ->
   scheduled`` with its ``batch_id``, one transaction) served by **one unlearning round**: client-level requests by
   FedEraser calibration from the stored history (all leaving clients in one rebuild); sample and class ids merged
   per owning client into one ``train.unlearn`` message (groups that stop differently: an operator's class removal
   runs the strategy's epochs, anyone's samples stop at the global test accuracy), FedAvg of the owners' updates,
   then ``repair_rounds`` FedAvg rounds on retain data (``train.repair``). The model is saved with every request id
   of the batch at once and the batch moves to ``unlearned`` in one ledger transaction;
5. **verify** the batch against **one** federated retrain baseline (FedAvg from the same initialisation, same rounds,
   without every deleted id; rollback to the first leaving client's join round when only clients left) with
   :func:`erasus_ray.evaluation.evaluate`, and judge each request by :func:`verification_checks` (forget accuracy
   and MIA efficacy within tolerance of the retrain model, or the original's gap closed by ``verify_close_fraction``);
   metrics before/after, the rule's numbers, model hashes and the coreset go to the ledger and each request becomes
   ``verified`` or ``failed`` with the measured gaps as the reason.

Several servers may share one ledger (PostgreSQL): each batch has an owner with a lease (``ServerConfig.batch_lease_s``,
:meth:`~erasus_ray.ledger.DeletionLedger.claim_batch`), taken when it is scheduled and renewed before each step, so
a server leaves a batch another live server runs, takes over one whose lease expired (its server crashed), and stops
quietly - marking nothing failed - when it finds it lost the lease.

A batch whose clients do not answer stays ``scheduled`` (a ``scheduled -> scheduled`` row says who it waits for) and
is retried on the next pass - taking in the requests validated meanwhile, since it has not touched the model yet - so a
client that drops out mid-round and rejoins gets its request completed. Model updates are idempotent per request: the
saved global model lists the request ids it contains together with their results (coreset ids, model hashes before
and after, metrics; one atomic file replace), and a resumed ``scheduled`` request that is already in it skips
straight to ``unlearned`` with those stored results - the audit record is the same as without the crash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
import torch

from erasus_ray.errors import ErasusError, InvalidConfigError
from erasus_ray.evaluation.verification import VERIFY_RULE, verification_checks, verification_tolerance  # noqa: F401 (re-exported)
from erasus_ray.federated.fedavg import fedavg
from erasus_ray.federated.fedearser import FederatedHistory, federaser_unlearn, rollback_retrain
from erasus_ray.federated.messages import (
    MSG_DELETE,
    MSG_HELLO,
    MSG_REPAIR,
    MSG_TRAIN,
    MSG_UNLEARN,
    DeleteAck,
    DeleteQuery,
    DeleteSubmission,
    FederationSpec,
    MalformedRecord,
    Hello,
    HelloReply,
    ModelUpdate,
    TrainInstruction,
    UnlearnInstruction,
    content_bytes,
)
from erasus_ray.federated.partition import Federation, load_federation
from erasus_ray.utils.atomic import atomic_torch_save, atomic_write_text

log = logging.getLogger("erasus_ray.federated")
State = dict[str, torch.Tensor]


class Transport(Protocol):
    """How the coordinator reaches clients: ``discover`` returns the client ids answering now; ``exchange`` sends one
    RecordDict per client and returns the replies that arrived (absent: no reply, an error reply, or a timeout)."""

    def discover(self, hello: Any) -> list[str]: ...

    def exchange(self, message_type: str, contents: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]: ...


#: how a client stops on a sample group (ServerConfig.sample_forget_target)
SAMPLE_TARGETS = ("heldout", "test", "none")


@dataclass
class ServerConfig:
    """Server settings (also the keys of ``[tool.flwr.app.config]``, with ``-`` or ``_``).

    Defaults were measured on digits over 10 IID clients: 5 FedAvg rounds of 3 local Adam epochs (lr 3e-3) reach
    ~94% test accuracy (1 epoch at 1e-3: 79%); ``grad_diff`` on the full forget set plus one repair round takes a
    class's forget accuracy to the retrain baseline's 0% and keeps retain accuracy. Sample-level requests run on each
    owning client under the closed-loop controller until their losses look like the client's local held-out split's
    (``sample_forget_target="heldout"``, :func:`~erasus_ray.federated.client_app.local_heldout`): the retrained model
    treats those samples as unseen, and driving them to 0% overshoots. ``"test"`` (the rule before the controller)
    stops open-loop once the local forget accuracy reaches the global model's test accuracy. Both assume the samples
    come from the data's distribution: poisoned or mislabelled samples (the backdoor scenario), which the retrained
    model gets *wrong*, need ``"none"`` (the strategy's fixed budget) and are judged by the server's verification.
    Each client's verification comes back in its update and is stored with the request (``client_verification``).
    """

    rounds: int = 5
    local_epochs: int = 3
    lr: float = 3e-3
    batch_size: int = 32
    seed: int = 0
    strategy: str = "grad_diff"
    selector: str = "el2n"
    fraction: float = 1.0
    unlearn_epochs: int = 0
    unlearn_lr: float = 0.0
    repair_rounds: int = 1
    repair_epochs: int = 1
    repair_lr: float = 5e-4
    calibration_epochs: int = 2  # FedEraser: about half the local epochs (measured: 1 -> gap 0.08, 2 -> 0.00)
    history_interval: int = 1
    max_ids: int = 10_000
    max_requests_per_minute: int = 60
    min_clients: int = 0  # 0: spec.n_clients
    wait_clients_s: float = 120.0
    round_timeout_s: float = 300.0
    process_passes: int = 3
    pass_wait_s: float = 5.0
    collect_every_round: bool = True  # poll query.delete after every FedAvg training round
    max_batch: int = 0  # most requests one unlearning round serves (0: every validated request pending then)
    verify_tolerance: float = 0.05  # floor of verification_tolerance(), for forget accuracy and MIA efficacy
    verify_close_fraction: float = 0.9  # or: unlearning closed at least this fraction of the original's gap
    # how a client unlearns a sample group: "heldout": closed loop (erasus_ray.control) until the forget losses look like
    # the client's local held-out split (Federation.client_heldout; the controller's `heldout` target); "test": open
    # loop to the global model's test accuracy; "none": the strategy's fixed default budget
    sample_forget_target: str = "heldout"
    operators: tuple[str, ...] = ("operator",)
    node_keys: str = ""  # GridTransport: client -> registered SuperNode key / node id (server_app.load_node_bindings)
    # the SuperLink authenticates SuperNodes (--enable-supernode-auth): then node-keys must bind every client, or the
    # ServerApp refuses to start (server_app.make_transport); false only where nodes are not authenticated at all
    # (simulation, an insecure local test). Fail closed: true unless said otherwise.
    node_auth: bool = True
    # several servers on one ledger (PostgreSQL): a batch is driven by the server holding its lease, renewed between
    # steps; a lease not renewed for this long marks a crashed server, and another server takes the batch over
    batch_lease_s: float = 900.0
    server_id: str = ""  # this server's lease owner id; "" -> <host>:<hash of the state folder> (stable over restarts)

    def __post_init__(self) -> None:
        if self.sample_forget_target not in SAMPLE_TARGETS:
            raise InvalidConfigError(f"sample_forget_target must be one of {', '.join(SAMPLE_TARGETS)}, got {self.sample_forget_target!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ServerConfig":
        known = {f.name: f for f in cls.__dataclass_fields__.values()}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                continue
            default = getattr(cls, name)
            if isinstance(default, tuple):
                kwargs[name] = tuple(str(value).split(","))
            elif isinstance(default, bool):
                if isinstance(value, str) and value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise InvalidConfigError(f"{key} must be true or false, got {value!r}")
                kwargs[name] = value.strip().lower() in ("true", "1", "yes") if isinstance(value, str) else bool(value)
            else:
                kwargs[name] = type(default)(value)
        return cls(**kwargs)


class DeletionCoordinator:
    """Federated training and deletion on one transport, with the ledger and the history on disk.

    Args:
        spec: the federation (benchmark, scenario, seed, clients, partition scheme).
        transport: a :class:`Transport` (``GridTransport`` in the ServerApp, ``InProcessTransport`` in tests).
        state_dir: where the history, the current global model and (by default) the ledger live.
        ledger: a :class:`~erasus_ray.ledger.DeletionLedger`, or None for ``sqlite:///<state_dir>/ledger.db``.
        config: :class:`ServerConfig`.
    """

    def __init__(
        self,
        spec: FederationSpec,
        transport: Transport,
        state_dir: str | os.PathLike,
        *,
        ledger: Any = None,
        config: ServerConfig | None = None,
    ) -> None:
        from erasus_ray.ledger import DeletionLedger, RequestLimits

        self.spec = spec
        self.transport = transport
        self.config = config or ServerConfig()
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = ledger if ledger is not None else DeletionLedger(f"sqlite:///{self.state_dir / 'ledger.db'}")
        self.fed: Federation = load_federation(spec)
        from erasus_ray.federated.partition import build_ownership

        self.registry = build_ownership(self.fed.partitions, self.fed.labels, operators=self.config.operators)
        self.limits = RequestLimits(max_ids=self.config.max_ids, max_requests_per_minute=self.config.max_requests_per_minute)
        self.history = FederatedHistory(self.state_dir / "history", interval=self.config.history_interval)
        self.clients: list[str] = []
        self.stats = {"rounds": 0, "bytes_sent": 0, "bytes_received": 0, "seconds": {}}
        self._pending_acks: dict[str, list[DeleteAck]] = {}
        # the default id is this host and state folder: a server restarted on it resumes its own batches at once (their
        # lease is still its own), while another server (another host or folder) waits for the lease to expire
        self.server_id = self.config.server_id or (
            f"{socket.gethostname()}:{hashlib.sha256(str(self.state_dir.resolve()).encode()).hexdigest()[:12]}"
        )

    # ---------------------------------------------------------------- state on disk

    @property
    def _global_path(self) -> Path:
        return self.state_dir / "global.pt"

    def load_global(self) -> tuple[State, list[str], list[int]]:
        """The current global model, the request ids applied to it and every id deleted from it."""
        if self._global_path.exists():
            saved = torch.load(self._global_path, weights_only=True)
            return saved["state"], list(saved["applied"]), [int(i) for i in saved["deleted_ids"]]
        if self.history.final is None:
            raise InvalidConfigError("no trained global model yet: run train() first")
        return {k: v.clone() for k, v in self.history.final.items()}, [], []

    def save_global(
        self, state: State, applied: list[str], deleted_ids: list[int], results: Mapping[str, Mapping[str, Any]] | None = None
    ) -> None:
        """Write the global model, the request ids it contains, every deleted id and the ledger results of the requests
        applied to it (``results``: this batch's, added to those stored before) in **one** atomic replace: a crash
        after it and before the ledger write loses nothing - the restart records the stored results
        (:meth:`load_results`: coreset ids, model hashes before/after, strategy, metrics)."""
        stored = self.load_results()
        stored.update({rid: dict(r) for rid, r in (results or {}).items()})
        atomic_torch_save(  # atomic: the model, its request ids and their results change together
            {"state": state, "applied": applied, "deleted_ids": sorted(set(int(i) for i in deleted_ids)),
             "results_json": json.dumps(stored, default=_json_default)},
            self._global_path,
        )

    def load_results(self) -> dict[str, dict[str, Any]]:
        """``{request_id: ledger result}`` of every request applied to the saved global model (see :meth:`save_global`);
        empty for a model saved without them."""
        if not self._global_path.exists():
            return {}
        saved = torch.load(self._global_path, weights_only=True)
        return json.loads(saved.get("results_json") or "{}")

    def model(self, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        model = self.fed.model_factory()
        model.load_state_dict(dict(state))
        model.eval()
        return model

    # ---------------------------------------------------------------- messaging helpers

    def _exchange(self, message_type: str, contents: Mapping[str, Any]) -> dict[str, Any]:
        self.stats["bytes_sent"] += sum(content_bytes(c) for c in contents.values())
        replies = self.transport.exchange(message_type, contents, timeout=self.config.round_timeout_s)
        self.stats["bytes_received"] += sum(content_bytes(c) for c in replies.values())
        return replies

    def discover(self) -> list[str]:
        """Ask every node who it is; waits up to ``wait_clients_s`` for ``min_clients``."""
        want = self.config.min_clients or self.spec.n_clients
        deadline = time.monotonic() + self.config.wait_clients_s
        while True:
            self.clients = sorted(set(self.transport.discover(Hello(self.spec))) & set(self.fed.partitions))
            if len(self.clients) >= want or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        log.info("clients: %s", self.clients)
        return self.clients

    def train_round(
        self, state: State, clients: list[str], round_: int, epochs: int, *, exclude_ids: list[int] | None = None,
        message_type: str = MSG_TRAIN, lr: float | None = None,
    ) -> dict[str, tuple[State, float]]:
        """One FedAvg round's local training on ``clients``: ``{client: (state_after, num_examples)}``."""
        exclude = list(exclude_ids) if exclude_ids is not None else self.load_deleted()
        contents = {
            c: TrainInstruction(
                state, self.spec, round_, lr or self.config.lr, epochs, self.config.batch_size, self.config.seed, exclude
            ).to_content()
            for c in clients
        }
        replies = self._exchange(message_type, contents)
        self.stats["rounds"] += 1
        out = {}
        for c, content in replies.items():
            try:
                upd = ModelUpdate.from_content(content, f"{message_type} reply from {c}")
            except ErasusError as err:
                log.warning("dropping a malformed update: %s", err)
                continue
            out[c] = (upd.state, float(upd.num_examples))
        return out

    def load_deleted(self) -> list[int]:
        return self.load_global()[2] if (self._global_path.exists() or self.history.final is not None) else []

    # ---------------------------------------------------------------- 2. training

    def train(self) -> State:
        """FedAvg for ``rounds`` rounds from the common initialisation; resumes from the last stored round.

        Each round's new global model is ``M_t + FedAvg(U_t^k)`` with ``U_t^k = state_k - M_t``: the arithmetic a
        resumed server repeats from the stored updates, so a run interrupted between rounds ends bit-identical to an
        uninterrupted one (a crash test checks it).
        """
        from erasus_ray.federated.fedavg import apply_delta, state_delta

        if self.history.final is not None:
            return self.load_global()[0]
        start = self.history.n_rounds
        state = self.history.checkpoint(start - 1) if start else self.fed.model_factory().state_dict()
        if start:  # redo the last stored round's aggregation from its stored updates
            last = self.history.rounds[start - 1]
            if last["updates"]:
                state = apply_delta(state, fedavg([(u, n) for u, n in last["updates"].values() if n > 0]))
            else:
                start -= 1
        t0 = time.perf_counter()
        for t in range(start, self.config.rounds):
            states = self.train_round(state, self.clients, t, self.config.local_epochs, exclude_ids=[])
            if not states:
                raise ErasusError(f"round {t}: no client answered")
            self.history.record(t, state, states)
            state = apply_delta(state, fedavg([(state_delta(s, state), n) for s, n in states.values() if n > 0]))
            if self.config.collect_every_round:  # requests arriving while the federation trains join the first batch
                self.collect_requests(max_polls=1)
        self.history.finish(state)
        self.stats["seconds"]["train"] = time.perf_counter() - t0
        return state

    # ---------------------------------------------------------------- 3. requests

    def collect_requests(self, max_polls: int = 3) -> list[Any]:
        """``query.delete`` every client until none has new requests; returns the acknowledgements sent.

        Every item of every reply is answered on the client's next ``query.delete``: a request (well-formed or not:
        the ledger stores a malformed one as ``rejected`` with the parser's reason) with its ledger state, a reply
        whose envelope cannot be read (no ``config`` record, a bad ``n_requests``, unexpected records) or a
        ``request.<i>`` that is not a ConfigRecord with a ``scope="message"`` rejection. Each rejection is logged.
        """
        touched = []
        for _ in range(max_polls):
            contents = {c: DeleteQuery(self._pending_acks.pop(c, [])).to_content() for c in self.clients}
            replies = self._exchange(MSG_DELETE, contents)
            new = 0
            for sender, content in replies.items():
                for ack in self._answer_submission(sender, content):
                    touched.append(ack)
                    self._pending_acks.setdefault(sender, []).append(ack)
                    new += ack.scope == "request"
            if new == 0:
                break
        return touched

    def _answer_submission(self, sender: str, content: Any) -> list[DeleteAck]:
        try:
            items = DeleteSubmission.records(content)
        except ErasusError as err:
            log.warning("rejected a malformed %s reply from %s: %s", MSG_DELETE, sender, err)
            return [DeleteAck("", False, "rejected", f"malformed {MSG_DELETE} reply: {err}"[:4000], scope="message")]
        acks = []
        for item in items:
            if isinstance(item, MalformedRecord):
                log.warning("rejected a malformed record in a %s reply from %s: %s", MSG_DELETE, sender, item.reason)
                acks.append(DeleteAck("", False, "rejected", item.reason[:4000], scope="message"))
            else:
                acks.append(self.acknowledge(item, sender))
        return acks

    def acknowledge(self, request: Any, sender: str) -> DeleteAck:
        """Record a request a client's node sent (a :class:`DeletionRequest` or the raw record) and answer it; never
        raises for a bad request (the answer says why)."""
        from erasus_ray.errors import InvalidRequestError

        try:
            entry = self.submit(request, sender=sender)
        except InvalidRequestError as err:  # e.g. a request id reused for different content
            log.warning("refused a request from %s: %s", sender, err)
            rid = getattr(request, "request_id", None) or (request.get("request_id") if hasattr(request, "get") else None)
            rid = rid if isinstance(rid, str) and rid else "?"
            return DeleteAck(rid[:256], False, "refused", str(err)[:2000])
        # the id the client sent: the ledger key may be scoped (<id>#<submitter hash>) when another client used it first
        return DeleteAck(getattr(entry, "client_request_id", None) or entry.request_id, entry.accepted, entry.state, entry.state_reason or "")

    def submit(self, request: Any, *, sender: str | None = None) -> Any:
        """Record and validate a request. ``sender``: the client whose node sent it (None: the operator's console); a
        request in another client's name is refused (``impersonation``) in the same ledger transaction."""
        entry = self.ledger.submit(request, ownership=self.registry, limits=self.limits, sender=sender)
        if entry.state == "rejected":
            log.warning("refused request %s: %s", entry.request_id, entry.state_reason)
        return entry

    # ---------------------------------------------------------------- 4./5. processing, one batch per round

    def resolve(self, entry: Any) -> np.ndarray:
        return self.registry.resolve(entry.request())

    def process_pending(self) -> dict[str, str]:
        """Drive every unfinished request as far as it goes now; returns ``{request_id: state}``.

        First the batches already in flight (scheduled or unlearned: a crash, or a batch waiting for clients - one
        that has not touched the model yet takes in every request validated since), then one new batch with every
        request validated now.
        """
        self._revalidate_received()
        out: dict[str, str] = {}
        for batch_id, members in self._open_batches():
            if self._hold(batch_id):
                out.update(self._drive(batch_id, members, admit_new=True))
        if self.ledger.pending(states=["validated"]):
            first = self.ledger.pending(states=["validated"])[0]
            batch_id = f"batch-{first.seq:06d}"
            entries = self.ledger.schedule_pending(
                batch_id=batch_id, limit=self.config.max_batch or None, round=self.history.n_rounds, **self._lease()
            )
            if entries:  # [] when another live server took this batch first
                out.update(self._drive(batch_id, entries, admit_new=False))
        return out

    def _lease(self) -> dict[str, Any]:
        return {"owner": self.server_id, "lease_s": self.config.batch_lease_s}

    def _hold(self, batch_id: str) -> bool:
        """Take or renew this server's lease on a batch; False (logged) while another live server holds it."""
        if self.ledger.claim_batch(batch_id, self.server_id, lease_s=self.config.batch_lease_s):
            return True
        lease = self.ledger.batch_lease(batch_id)
        log.info("batch %s is run by server %s (lease until %s): left to it", batch_id, lease and lease.owner, lease and lease.expires_at)
        return False

    def _revalidate_received(self) -> None:
        """A crash between recording and judging a request (``received``): judge it again."""
        from erasus_ray.ledger import validate

        for entry in self.ledger.pending(states=["received"]):
            try:
                validate(entry.request(), self.registry)
                self.ledger.transition(entry.request_id, "validated")
            except ErasusError as err:
                self.ledger.transition(entry.request_id, "rejected", reason=str(err)[:2000])

    def _open_batches(self) -> list[tuple[str, list[Any]]]:
        """Batches with a member scheduled or unlearned, oldest first; a request scheduled without a batch id (a
        ledger written before batching) is a batch of its own."""
        batches: dict[str, list[Any]] = {}
        for entry in self.ledger.pending(states=["scheduled", "unlearned"]):
            batches.setdefault(entry.batch_id or f"single-{entry.seq:06d}", []).append(entry)
        return list(batches.items())

    def _drive(self, batch_id: str, members: list[Any], *, admit_new: bool) -> dict[str, str]:
        try:
            scheduled = [e for e in members if e.state == "scheduled"]
            if scheduled:
                state, applied, deleted = self.load_global()
                resumed = [e for e in scheduled if e.request_id in applied]
                if resumed:  # the model already contains them (crash after the update, before the ledger write):
                    # record the results saved with the model (hashes, coreset, metrics), not the update again
                    stored = self.load_results()
                    self.ledger.record_results({
                        e.request_id: {**stored.get(e.request_id, {}), "new_state": "unlearned", "expected": "scheduled",
                                       "resumed": True, "batch": batch_id}
                        for e in resumed
                    })
                todo = [e for e in scheduled if e.request_id not in applied]
                if todo and admit_new and not batch_id.startswith("single-") and not resumed:
                    # nothing of this batch is in the model yet: requests validated since join it (same round)
                    todo += self.ledger.schedule_pending(
                        batch_id=batch_id, round=self.history.n_rounds, joined_waiting_batch=True, **self._lease()
                    )
                if todo and not self._hold(batch_id):
                    return {e.request_id: e.state for e in self._members(batch_id, members)}
                if todo and not self._unlearn_batch(batch_id, todo, state, applied, deleted):
                    return {e.request_id: "scheduled" for e in todo}
            unlearned = [e for e in self._members(batch_id, members) if e.state == "unlearned"]
            if unlearned and self._hold(batch_id):
                self._verify_batch(batch_id, unlearned)
        except ErasusError as err:
            if not self._hold(batch_id):  # another server took the batch over (our lease ran out): its to finish
                log.warning("batch %s: lost the lease while running it (%s); left to its new owner", batch_id, err)
                return {e.request_id: e.state for e in self._members(batch_id, members)}
            log.error("batch %s failed: %s", batch_id, err)
            stuck = [e for e in self._members(batch_id, members) if not e.done]
            self.ledger.record_results({e.request_id: {"new_state": "failed", "reason": str(err)[:2000], "batch": batch_id} for e in stuck})
        states = {e.request_id: e.state for e in self._members(batch_id, members)}
        if all(s in ("verified", "rejected", "failed") for s in states.values()):
            self.ledger.release_batch(batch_id, self.server_id)
        return states

    def _members(self, batch_id: str, members: list[Any]) -> list[Any]:
        if batch_id.startswith("single-"):
            return [self.ledger.get(e.request_id) for e in members]
        return self.ledger.entries(batch_id=batch_id)

    def _wait(self, batch_id: str, todo: list[Any], missing: list[str], why: str) -> bool:
        log.warning("batch %s (%s) waits for clients %s: %s", batch_id, [e.request_id for e in todo], missing, why)
        self.ledger.record_results(
            {e.request_id: {"new_state": "scheduled", "expected": "scheduled", "waiting_for": missing, "batch": batch_id} for e in todo}
        )
        return False

    def _unlearn_batch(self, batch_id: str, todo: list[Any], state: State, applied: list[str], deleted: list[int]) -> bool:
        """One unlearning round for every request of the batch: FedEraser for the clients that leave, one
        ``train.unlearn`` round on the owners of every sample/class id (merged per client), one repair. Saves the
        model with all of the batch's request ids at once; the ledger moves them to ``unlearned`` in one transaction."""
        from erasus_ray.utils import model_hash

        forget = {e.request_id: self.resolve(e) for e in todo}
        leaving = sorted({e.client_id for e in todo if e.level == "client"})
        data_reqs = [e for e in todo if e.level != "client"]
        union = sorted(set().union(*(set(v.tolist()) for v in forget.values())))
        exclude = sorted(set(deleted) | set(union))
        leaving_ids = set().union(*(set(self.fed.partitions[c].tolist()) for c in leaving)) if leaving else set()
        gone = {c for c, ids in self.fed.partitions.items() if set(ids.tolist()) <= set(deleted)}  # left in earlier batches
        # per owning client: ids to drive to the retrained model's 0% (an operator's class) and ids to stop at the
        # global test accuracy (anyone's samples: to the retrained model they look like unseen data, not like 0%)
        full: dict[str, set[int]] = {}
        partial: dict[str, set[int]] = {}
        for e in data_reqs:
            ids = np.setdiff1d(forget[e.request_id], np.asarray(sorted(set(deleted) | leaving_ids), dtype=np.int64))
            is_full = e.level == "class" and e.client_id in self.registry.operators
            for c, owned in self.registry_split(ids).items():
                (full if is_full else partial).setdefault(c, set()).update(owned.tolist())
        owners = sorted(set(full) | set(partial))
        need = set(owners)
        if leaving:  # calibration needs every remaining client that took part
            need |= set(self.fed.partitions) - set(leaving) - gone
        missing = sorted(need - set(self.clients))
        if missing:
            return self._wait(batch_id, todo, missing, "not connected")
        atomic_torch_save(state, self._before_path(batch_id))  # before any update: verification compares against it
        before_hash = model_hash(self.model(state))
        t0 = time.perf_counter()
        new_state = state
        strategies = []
        info: dict[str, Any] = {"batch": batch_id, "batch_requests": [e.request_id for e in todo]}
        if leaving:

            def calibration_round(s: State, clients: list[str], t: int, epochs: int) -> dict:
                return self.train_round(s, [c for c in clients if c not in leaving], t, epochs, exclude_ids=exclude)

            new_state, finfo = federaser_unlearn(
                self.history, leaving, calibration_round, calibration_epochs=self.config.calibration_epochs,
                # stored first-round updates still contain every other id deleted before or in this batch
                calibrate_first=bool(set(exclude) - leaving_ids),
            )
            info.update({k: v for k, v in finfo.items() if k != "stored_rounds"})
            strategies.append("federaser")
        coreset: set[int] = set()
        client_checks: dict[str, list[tuple[set[int], dict[str, Any]]]] = {}  # per client: (group's ids, its verification)
        if owners:
            target = None
            if partial and self.config.sample_forget_target == "test":
                from erasus_ray.evaluation import run_metrics

                test_acc = run_metrics(self.model(new_state), self.fed.task, {"test": self.fed.test}, ["test_acc"])
                target = float(test_acc["test_acc"])
            groups = {c: [(sorted(full.get(c, ())), None), (sorted(partial.get(c, set()) - full.get(c, set())), target)] for c in owners}
            contents = {
                c: UnlearnInstruction.for_groups(
                    new_state, self.spec, batch_id, groups[c],
                    strategy=self.config.strategy, selector=self.config.selector, fraction=self.config.fraction,
                    epochs=self.config.unlearn_epochs, lr=self.config.unlearn_lr, seed=self.config.seed, exclude_ids=deleted,
                    local_heldout=bool(partial) and self.config.sample_forget_target == "heldout",
                ).to_content()
                for c in owners
            }
            replies = self._exchange(MSG_UNLEARN, contents)
            updates = {}
            for c, content in replies.items():
                try:
                    updates[c] = ModelUpdate.from_content(content, f"{MSG_UNLEARN} reply from {c}")
                except ErasusError as err:
                    log.warning("malformed unlearning update from %s: %s", c, err)
            if set(updates) != set(owners):
                return self._wait(batch_id, todo, sorted(set(owners) - set(updates)), "no unlearning update")
            new_state = fedavg([(u.state, max(u.num_examples, 1)) for u in updates.values()])
            coreset = {i for u in updates.values() for i in u.coreset_ids}
            for c, u in updates.items():  # the client reports one verification per non-empty group, in order
                sent = [set(ids) for ids, _ in groups[c] if len(ids)]
                client_checks[c] = list(zip(sent, u.verification))
            repair_clients = [c for c in self.clients if c not in leaving]
            for r in range(self.config.repair_rounds):
                states = self.train_round(
                    new_state, repair_clients, self.history.n_rounds + r, self.config.repair_epochs, exclude_ids=exclude,
                    message_type=MSG_REPAIR, lr=self.config.repair_lr,
                )
                if states:
                    new_state = fedavg([(s, n) for s, n in states.values() if n > 0])
            info.update({"owners": owners, "repair_rounds": self.config.repair_rounds, "forget_target": target})
            strategies.append(self.config.strategy)
        seconds = time.perf_counter() - t0
        after_hash = model_hash(self.model(new_state))
        results = {}
        for e in todo:
            ids = set(forget[e.request_id].tolist())
            results[e.request_id] = {
                "coreset_ids": [] if e.level == "client" else sorted(coreset & ids),
                "strategy": "federaser" if e.level == "client" else self.config.strategy,
                "model_hash_before": before_hash,
                "model_hash_after": after_hash,
                "metrics": {
                    "unlearn_seconds": seconds, "n_forget": len(ids), "batch_size": len(todo), "batch_n_forget": len(union),
                    "batch_strategies": strategies, "selector": self.config.selector, "fraction": self.config.fraction, **info,
                    # the controller's verification of each owning client's run on this batch (per group of ids)
                    "client_verification": _client_records(client_checks, ids),
                },
                "new_state": "unlearned",
                "expected": "scheduled",
                "batch": batch_id,
            }
        # atomic: the model, its request ids and these results; then the ledger (a crash between: _drive restores them)
        self.save_global(new_state, applied + [e.request_id for e in todo], exclude, results)
        self.ledger.record_results(results)
        return True

    def _before_path(self, batch_id: str) -> Path:
        import hashlib

        return self.state_dir / f"before-{hashlib.sha1(batch_id.encode()).hexdigest()[:16]}.pt"

    def registry_split(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        groups: dict[str, list[int]] = {}
        for i in np.asarray(ids).tolist():
            groups.setdefault(self.registry.owner_of(i), []).append(i)
        return {c: np.array(sorted(v), dtype=np.int64) for c, v in groups.items() if c is not None}

    def retrain_baseline(self, deleted: list[int], removed_clients: list[str] | str | None = None) -> State:
        """The federated retrain model without ``deleted`` ids, and without ``removed_clients`` (clients that left):
        FedAvg from the common initialisation for the same rounds and local epochs. When nothing but the leaving
        clients' data was deleted, it rolls back only to the checkpoint before the first of them joined (the exact
        FedEraser baseline, :func:`rollback_retrain`); otherwise to round 0, since every deleted id shaped every round."""
        t0 = time.perf_counter()
        removed = [removed_clients] if isinstance(removed_clients, str) else sorted(removed_clients or [])
        gone = {c for c, ids in self.fed.partitions.items() if set(ids.tolist()) <= set(deleted)}  # nothing left to train on

        def round_fn(s: State, clients: list[str], t: int, epochs: int) -> dict:
            chosen = [c for c in clients if c in self.clients and c not in removed and c not in gone]
            return self.train_round(s, chosen, t, epochs, exclude_ids=deleted)

        removed_ids = set().union(*(set(self.fed.partitions[c].tolist()) for c in removed)) if removed else set()
        if removed and set(deleted) <= removed_ids:
            state, _ = rollback_retrain(self.history, removed, round_fn, epochs=self.config.local_epochs)
        else:
            state = self.history.checkpoint(0)
            for t in range(self.history.n_rounds):
                states = round_fn(state, self.history.rounds[t]["participants"], t, self.config.local_epochs)
                if states:
                    state = fedavg([(s, n) for s, n in states.values() if n > 0])
        self.stats["seconds"]["retrain"] = self.stats["seconds"].get("retrain", 0.0) + time.perf_counter() - t0
        return state

    def _verify_batch(self, batch_id: str, entries: list[Any]) -> None:
        """One federated retrain without every deleted id, then each request of the batch judged against it by
        :func:`verification_checks` (and the batch's union of forget ids measured for the record)."""
        from erasus_ray.evaluation import evaluate
        from erasus_ray.evaluation.verification import combined_verification, gold_rule_record
        from erasus_ray.ledger import verification_result

        state, _, deleted = self.load_global()
        leaving = sorted({e.client_id for e in entries if e.level == "client"})
        gold = self.model(self.retrain_baseline(deleted, leaving))
        after_model = self.model(state)
        path = self._before_path(batch_id)
        before_model = self.model(torch.load(path, weights_only=True)) if path.exists() else None
        retain = self.fed.train.exclude(deleted)
        seed = self.config.seed

        def measure(ids: np.ndarray) -> tuple[dict, dict | None]:
            forget = self.fed.train.subset(ids)
            gold_m = evaluate(gold, forget=forget, retain=retain, test=self.fed.test, task=self.fed.task, seed=seed)
            kw = dict(forget=forget, retain=retain, test=self.fed.test, task=self.fed.task, gold_metrics=gold_m, seed=seed)
            return evaluate(after_model, **kw), (evaluate(before_model, **kw) if before_model is not None else None)

        forget = {e.request_id: self.resolve(e) for e in entries}
        batch: dict[str, Any] = {}
        # for the record: the batch's union of forget ids, and every id deleted so far (what the retrain model lacks)
        scopes = [("deleted", np.asarray(sorted(deleted), dtype=np.int64))]
        if len(entries) > 1:
            scopes.insert(0, ("batch", np.unique(np.concatenate(list(forget.values())))))
        for scope, ids in scopes:
            u_after, u_before = measure(ids)
            batch[f"{scope}_n_forget"] = int(len(ids))
            batch.update({f"{scope}_after_{k}": u_after[k] for k in ("avg_gap", "forget_acc", "gold_forget_acc", "mia_svc_efficacy", "gold_mia_svc_efficacy")})
            if u_before is not None:
                batch.update({f"{scope}_before_{k}": u_before[k] for k in ("avg_gap", "forget_acc", "mia_svc_efficacy")})
        results = {}
        for e in entries:
            after, before = measure(forget[e.request_id])
            metrics: dict[str, Any] = {f"after_{k}": v for k, v in after.items()}
            if before is not None:
                metrics.update({f"before_{k}": v for k, v in before.items()})
            ok, checks, why = verification_checks(
                after, before, len(forget[e.request_id]), floor=self.config.verify_tolerance, close_fraction=self.config.verify_close_fraction
            )
            metrics.update(batch)
            metrics.update({
                "verify_rule": VERIFY_RULE.format(close=self.config.verify_close_fraction), "verify_checks": checks,
                "verify_tolerance": checks["forget_acc"]["tolerance"],
            })
            # the server's rule against the retrain model and every owning client's controller verification of its
            # ids decide together (a client's run that measured nothing does not count)
            server = gold_rule_record(ok, checks, why, close_fraction=self.config.verify_close_fraction)
            verdict = combined_verification(server, (e.metrics or {}).get("client_verification") or {})
            results[e.request_id] = verification_result(
                verdict, expected="unlearned", metrics=metrics, batch=batch_id, gap_forget_acc=after["gap_forget_acc"],
                avg_gap=after["avg_gap"],
                **({} if verdict["passed"] else {"reason": f"not verified against the federated retrain model: {verdict['why_failed']}"}))
        self.ledger.record_results(results)

    # ---------------------------------------------------------------- the whole server

    def run(self) -> dict[str, str]:
        """Discover, train (or resume; requests are collected between rounds), then per pass: collect requests and
        process every pending one as one batch (with retries for batches waiting on clients)."""
        self.discover()
        self.train()
        for p in range(self.config.process_passes):
            self.collect_requests()
            self.process_pending()
            if not self.ledger.pending():
                break
            if p + 1 < self.config.process_passes:
                time.sleep(self.config.pass_wait_s)
                self.discover()
        self.collect_requests(max_polls=1)  # deliver the last acks
        atomic_write_text(self.state_dir / "stats.json", json.dumps(self.stats, indent=2))
        return {e.request_id: e.state for e in self.ledger.entries()}


def _client_records(client_checks: Mapping[str, list[tuple[set[int], dict[str, Any]]]], ids: set[int]) -> dict[str, list[dict]]:
    """Per owning client, the verifications of its groups that hold some of ``ids`` (one request's forget ids)."""
    out = {c: [rec for group, rec in checks if group & ids] for c, checks in sorted(client_checks.items())}
    return {c: recs for c, recs in out.items() if recs}


def _json_default(value: Any) -> Any:
    """numpy / torch scalars and arrays in stored results as plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    return str(value)


class InProcessTransport:
    """Calls the client functions directly (records still go through ``to_content``/``from_content``): the protocol
    without Flower processes. ``down``: client ids that do not answer (fault tests)."""

    def __init__(self, spec: FederationSpec, outbox: str | os.PathLike | None = None, down: set[str] | None = None) -> None:
        self.spec = spec
        self.outbox = outbox
        self.down = set(down or ())

    def discover(self, hello: Any) -> list[str]:
        from erasus_ray.federated.client_app import client_hello
        from erasus_ray.federated.partition import client_name

        names = [client_name(k) for k in range(self.spec.n_clients)]
        return [HelloReply.from_content(client_hello(Hello.from_content(hello.to_content()), c).to_content()).client_id for c in names if c not in self.down]

    def exchange(self, message_type: str, contents: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]:
        from erasus_ray.federated import client_app as ca

        handlers = {
            MSG_DELETE: lambda c, x: ca.client_delete_query(DeleteQuery.from_content(x), c, self.outbox),
            MSG_TRAIN: lambda c, x: ca.client_train(TrainInstruction.from_content(x), c),
            MSG_REPAIR: lambda c, x: ca.client_train(TrainInstruction.from_content(x, MSG_REPAIR), c),
            MSG_UNLEARN: lambda c, x: ca.client_unlearn(UnlearnInstruction.from_content(x), c),
            MSG_HELLO: lambda c, x: ca.client_hello(Hello.from_content(x), c),
        }
        return {c: handlers[message_type](c, x).to_content() for c, x in contents.items() if c not in self.down}
