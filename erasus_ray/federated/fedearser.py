"""Client-level deletion: FedEraser calibration from stored per-round updates, and the exact baseline.

FedEraser - Liu, Ma, Yang, Wang, Liu, "FedEraser: Enabling Efficient Client-Level Data Removal from Federated
Learning Models", IEEE/ACM IWQoS 2021. During training the server stores, every ``interval`` rounds, the global
model ``M_t`` and each client's update ``U_t^k``. To remove client ``u`` it rebuilds the model from the round ``u``
joined: at each stored round ``t_j`` the remaining clients run *calibration training* (fewer local epochs, paper:
half) from the unlearned model ``M~_t`` and send ``U^_t^k``; the server keeps the stored update's magnitude and the
new update's direction,

    U~_t^k = ||U_t^k|| * U^_t^k / ||U^_t^k||,        M~_{t_{j+1}} = M~_{t_j} + sum_k n_k U~_t^k / sum_k n_k.

Choices where the paper leaves freedom: norms are taken per parameter tensor (as in the authors' released code,
which calibrates layer by layer); the average is FedAvg-weighted by the clients' sample counts (the paper uses a
plain mean over K-1 clients, equal for balanced partitions); at the first stored round ``M~ = M`` so the stored
updates of the remaining clients are applied as they are (no calibration training needed there, as in the paper's
Algorithm 1). Cost: ``ceil(rounds / interval) - 1`` calibration rounds of ``calibration_epochs`` local epochs on the
remaining clients, vs ``rounds`` full rounds for retraining.

Exact baseline (:func:`rollback_retrain`): roll back to the last global checkpoint before ``u`` joined and run
FedAvg for the same rounds without ``u`` - the federated retrain model the result is verified against.

Example:
    >>> history = FederatedHistory(folder)           # filled by the server during training
    >>> state = federaser_unlearn(history, "client-3", train_round, calibration_epochs=1)
    >>> gold = rollback_retrain(history, "client-3", train_round, epochs=2)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.federated.fedavg import apply_delta, fedavg, state_delta
from erasus_ray.utils.atomic import atomic_torch_save, atomic_write_text

State = dict[str, torch.Tensor]
#: ``train_round(global_state, client_ids, round, epochs) -> {client_id: (state_after, num_examples)}``
TrainRound = Callable[[State, list[str], int, int], Mapping[str, tuple[State, float]]]


class FederatedHistory:
    """Per-round global checkpoints and per-client updates, kept on disk so a restarted server can still erase.

    ``record(t, global_before, client_states)`` stores ``M_t`` always and the clients' updates
    ``U_t^k = state_k - M_t`` on rounds where ``t % interval == 0``. Files: ``round-<t>.pt`` and ``index.json``.
    """

    def __init__(self, folder: str | os.PathLike | None = None, interval: int = 1) -> None:
        if not isinstance(interval, int) or interval < 1:
            raise InvalidConfigError(f"interval must be a positive integer, got {interval!r}")
        self.folder = None if folder is None else Path(folder)
        self.interval = interval
        self.rounds: dict[int, dict] = {}
        self.final: State | None = None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._load()

    def _load(self) -> None:
        assert self.folder is not None
        index = self.folder / "index.json"
        if not index.exists():
            return
        meta = json.loads(index.read_text())
        self.interval = int(meta["interval"])
        for t in meta["rounds"]:
            self.rounds[int(t)] = torch.load(self.folder / f"round-{t}.pt", weights_only=True)
        if meta.get("final"):
            self.final = torch.load(self.folder / "final.pt", weights_only=True)

    def _save_index(self) -> None:
        if self.folder is None:
            return
        atomic_write_text(self.folder / "index.json",
                          json.dumps({"interval": self.interval, "rounds": sorted(self.rounds), "final": self.final is not None}))

    def record(self, round_: int, global_before: Mapping[str, torch.Tensor], client_states: Mapping[str, tuple[State, float]]) -> None:
        keep = round_ % self.interval == 0
        entry = {
            "global": {k: v.detach().clone() for k, v in global_before.items()},
            "updates": {c: (state_delta(s, global_before), float(n)) for c, (s, n) in client_states.items()} if keep else {},
            "participants": sorted(client_states),
        }
        self.rounds[int(round_)] = entry
        if self.folder is not None:
            atomic_torch_save(entry, self.folder / f"round-{round_}.pt")
            self._save_index()

    def finish(self, final_state: Mapping[str, torch.Tensor]) -> None:
        """Store the model after the last round (training is complete)."""
        self.final = {k: v.detach().clone() for k, v in final_state.items()}
        if self.folder is not None:
            atomic_torch_save(self.final, self.folder / "final.pt")
            self._save_index()

    @property
    def n_rounds(self) -> int:
        return 0 if not self.rounds else max(self.rounds) + 1

    def checkpoint(self, round_: int) -> State:
        """The global model at the start of ``round_`` (``M_t``)."""
        if round_ not in self.rounds:
            raise InvalidDataError(f"no checkpoint for round {round_}; stored: {sorted(self.rounds)}")
        return {k: v.clone() for k, v in self.rounds[round_]["global"].items()}

    def joined_round(self, client_id: str) -> int:
        """First round ``client_id`` took part in; the rollback point of the exact baseline."""
        for t in sorted(self.rounds):
            if client_id in self.rounds[t]["participants"]:
                return t
        raise InvalidDataError(f"client {client_id!r} never took part in training; known rounds: {sorted(self.rounds)}")

    def stored_rounds(self, start: int = 0) -> list[int]:
        return [t for t in sorted(self.rounds) if t >= start and self.rounds[t]["updates"]]


def _norm(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64).norm()


def calibrate(
    old_updates: Mapping[str, tuple[Mapping[str, torch.Tensor], float]],
    new_updates: Mapping[str, tuple[Mapping[str, torch.Tensor], float]],
) -> State:
    """FedEraser's calibrated aggregate: ``sum_k n_k ||U_k|| U^_k / ||U^_k|| / sum_k n_k`` per tensor.

    ``old_updates``: the stored updates ``U_k`` (magnitudes); ``new_updates``: calibration updates ``U^_k``
    (directions) with their weights ``n_k``. Clients missing from ``old_updates`` are an error; a zero calibration
    update contributes zero.
    """
    missing = sorted(set(new_updates) - set(old_updates))
    if missing:
        raise InvalidDataError(f"no stored update for client(s) {missing}: they did not take part in that round")
    if not new_updates:
        raise InvalidDataError("calibrate needs at least one client's calibration update")
    total = sum(float(n) for _, n in new_updates.values())
    if total <= 0:
        raise InvalidDataError("calibration weights must have a positive sum")
    out: State = {}
    for client, (new, n) in new_updates.items():
        old = old_updates[client][0]
        for name, direction in new.items():
            length = _norm(old[name])
            scale = length / _norm(direction) if _norm(direction) > 0 else torch.zeros((), dtype=torch.float64)
            term = direction.to(torch.float64) * scale * (float(n) / total)
            out[name] = out[name] + term if name in out else term
    return {k: v.to(next(iter(new_updates.values()))[0][k].dtype) for k, v in out.items()}


def _removed_set(removed: str | Iterable[str]) -> set[str]:
    out = {removed} if isinstance(removed, str) else set(removed)
    if not out:
        raise InvalidDataError("name at least one client to remove")
    return out


def federaser_unlearn(
    history: FederatedHistory, removed: str | Iterable[str], train_round: TrainRound, *, calibration_epochs: int = 1,
    calibrate_first: bool = False,
) -> tuple[State, dict]:
    """Rebuild the global model without the ``removed`` client(s) from the stored updates (FedEraser; several clients
    leaving in one batch are removed in one rebuild from the first round any of them joined). Returns the state and a
    report (calibration rounds run, clients used). ``calibrate_first``: calibrate the first stored round too (needed
    when other data was deleted since training, so the stored updates are no longer valid as they are)."""
    gone = _removed_set(removed)
    start = min(history.joined_round(c) for c in sorted(gone))
    stored = history.stored_rounds(start)
    if not stored:
        raise InvalidDataError("the history stores no client updates: record training with FederatedHistory first")
    model = history.checkpoint(start)
    calibration_rounds = 0
    for j, t in enumerate(stored):
        old = {c: u for c, u in history.rounds[t]["updates"].items() if c not in gone}
        if not old:
            continue
        if j == 0 and t == start and not calibrate_first:
            # M~_t == M_t here: the stored updates of the remaining clients are already valid for it.
            new_delta = fedavg([(u, n) for u, n in old.values()]) if sum(n for _, n in old.values()) > 0 else None
        else:
            states = train_round(model, sorted(old), t, calibration_epochs)
            new = {c: (state_delta(s, model), float(n)) for c, (s, n) in states.items() if c in old and n > 0}
            new_delta = calibrate(old, new) if new else None
            calibration_rounds += 1
        if new_delta is not None:
            # Updates between stored rounds (interval > 1) are folded into the next stored one by FedEraser.
            model = apply_delta(model, new_delta)
    return model, {"calibration_rounds": calibration_rounds, "stored_rounds": stored, "start_round": start}


def rollback_retrain(
    history: FederatedHistory, removed: str | Iterable[str], train_round: TrainRound, *, epochs: int, rounds: int | None = None
) -> tuple[State, dict]:
    """The exact baseline: the checkpoint before the first of ``removed`` joined, then FedAvg without them for the
    remaining rounds."""
    gone = _removed_set(removed)
    start = min(history.joined_round(c) for c in sorted(gone))
    total = history.n_rounds if rounds is None else int(rounds)
    model = history.checkpoint(start)
    for t in range(start, total):
        clients = [c for c in history.rounds.get(t, {"participants": []})["participants"] if c not in gone]
        if not clients:
            continue
        states = train_round(model, clients, t, epochs)
        model = fedavg([(s, n) for s, n in states.values() if n > 0])
    return model, {"rollback_round": start, "retrain_rounds": total - start}
