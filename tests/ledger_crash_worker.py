"""A deletion server reduced to its ledger protocol, for the crash-safety test (tests/test_ledger.py).

``serve(db, model_path, requests, owners, kill_at)`` submits every request (clients retry after a crash, so all are
resubmitted on each start), then drives each pending request validated -> scheduled -> unlearned -> verified. The
"model" is a JSON file: per dataset id a weight (1.0 = learned, 0.0 = forgotten) and a touch count, plus the list of
requests it contains with the model hashes before/after. Unlearning a request zeroes its ids' weights; the file is
replaced atomically (write, fsync, rename), and a resumed ``scheduled`` request whose id the model already lists is not
applied again - the pattern a real server follows to unlearn exactly once (erasus_ray/ledger/ledger.py docstring).

``kill_at``: SIGKILL this process at the kill_at-th crash point (between any two durable operations); 0 = never.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any


class _Points:
    def __init__(self, kill_at: int) -> None:
        self.kill_at = kill_at
        self.n = 0

    def __call__(self) -> None:
        self.n += 1
        if self.n == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def model_digest(model: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(model["weights"], sort_keys=True).encode()).hexdigest()


def load_model(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def save_model(path: Path, model: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        json.dump(model, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def serve(db: str, model_path: str, requests: list[dict[str, Any]], owners: dict[str, list[int]], kill_at: int = 0) -> None:
    from erasus_ray.ledger import DeletionLedger, OwnershipRegistry, RequestLimits

    point = _Points(kill_at)
    path = Path(model_path)
    registry = OwnershipRegistry(owners)
    limits = RequestLimits(max_ids=50, max_requests_per_minute=None)
    ledger = DeletionLedger(db)
    for raw in requests:
        ledger.submit(raw, registry, limits)
        point()
    for entry in ledger.pending():
        rid, state = entry.request_id, entry.state
        if state == "validated":
            ledger.transition(rid, "scheduled", expected="validated")
            point()
            state = "scheduled"
        if state == "scheduled":
            model = load_model(path)
            done = {a["request_id"]: a for a in model["applied"]}
            if rid not in done:
                before = model_digest(model)
                for i in entry.ids or []:
                    model["weights"][str(i)] = 0.0
                    model["touches"][str(i)] = model["touches"].get(str(i), 0) + 1
                model["applied"].append({"request_id": rid, "before": before, "after": model_digest(model)})
                point()
                save_model(path, model)
                point()
                done[rid] = model["applied"][-1]
            ledger.record_result(
                rid,
                coreset_ids=(entry.ids or [])[::2],
                strategy="zero_weights",
                model_hash_before=done[rid]["before"],
                model_hash_after=done[rid]["after"],
                new_state="unlearned",
                expected="scheduled",
            )
            point()
            state = "unlearned"
        if state == "unlearned":
            model = load_model(path)
            forgotten = all(model["weights"][str(i)] == 0.0 for i in entry.ids or [])
            if forgotten:
                ledger.transition(rid, "verified", expected="unlearned", forget_weight=0.0)
            else:
                ledger.transition(rid, "failed", expected="unlearned", reason="weights not zero after unlearning")
            point()
    ledger.close()
