"""The unlearning worker: takes validated requests from the ledger in a batch, unlearns them closed-loop on a copy of
the served model version, records the verification in the ledger, and publishes a new version only when verified.

One round (:meth:`UnlearningWorker.run_once`):

1. ``schedule_pending`` moves up to ``batch_size`` validated requests to ``scheduled`` under one batch id (one
   transaction); requests a crashed round left ``scheduled`` or ``unlearned`` are resumed first, and those a
   published version on the served lineage already serves (the crash fell between publishing and recording) are
   recorded verified without a second run; the others are run again.
2. The served version ``v`` is loaded as a fresh model (a copy: the replicas keep serving ``v``).
3. Forget set = the ids the batch's requests resolve to; retain set = the train ids minus those and minus every id
   version ``v`` already forgot. ``ErasusUnlearner(copy, **config.unlearner).fit(forget, retain, heldout_data=test)``.
4. Verified: publish version ``v+1`` (parent ``v``), then record every request ``verified`` with the version in one
   transaction. Not verified, or the run raised: every request ends ``failed`` with the reason and ``v`` stays served.

:class:`WorkerLoop` repeats rounds every ``poll_s`` in a thread; in Ray Serve it runs inside its own deployment
replica (a Ray actor, :mod:`erasus_ray.serve.app`).

Cost: one ``ErasusUnlearner.fit`` per round (seconds on wine/digits) plus a few ledger transactions.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import numpy as np

from erasus_ray.ledger import LedgerEntry, verification_result
from erasus_ray.serve.service import DeletionService

logger = logging.getLogger("erasus_ray.serve")


class UnlearningWorker:
    """Runs unlearning rounds for ``service`` (plain class: call :meth:`run_once`; tests drive it directly)."""

    def __init__(self, service: DeletionService, worker_id: str | None = None) -> None:
        self.service = service
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:8]}"
        self._pool: Any = None  # the warm scoring pool (under Ray), kept between rounds
        service.reopen_rolled_back(self.worker_id)  # a rollback that crashed before reopening its requests

    def take_batch(self) -> list[LedgerEntry]:
        """Requests a crashed round left ``scheduled`` (resumed first), else a new batch of validated ones - unless
        the low-power policy holds or fails it (:meth:`_low_power`)."""
        ledger = self.service.ledger
        stuck = ledger.entries(states=["scheduled", "unlearned"])  # a round that died before recording its outcome
        if stuck:
            return stuck[: self.service.config.batch_size]
        pending = ledger.entries(states=["validated"])[: self.service.config.batch_size]
        if not pending or self._low_power(pending):
            return []
        batch_id = f"serve-{uuid.uuid4().hex[:12]}"
        return ledger.schedule_pending(request_ids=[e.request_id for e in pending], batch_id=batch_id, worker=self.worker_id)

    def power(self, entries: list[LedgerEntry]) -> dict[str, Any] | None:
        """What the run's target could detect on the union of ``entries``' forget ids (its
        :meth:`~erasus_ray.evaluation.verification.Target.power`, with ``low`` set against ``max_detectable_auc``),
        or None where the target models no power. Cost: resolving the target (no forward pass)."""
        from erasus_ray.control import ControlConfig
        from erasus_ray.evaluation.verification import resolve_target

        service, cfg = self.service, self.service.config
        forget_ids = sorted({int(i) for e in entries for i in service.ownership.resolve(e.request())})
        train, test = service.benchmark.train, service.benchmark.test
        retain = train.subset([int(i) for i in train.ids if int(i) not in set(forget_ids)])
        target = resolve_target(cfg.unlearner.get("target", "auto"), task=service.task, forget=train.subset(forget_ids),
                                retain=retain, heldout=test, gold=None).target
        n_heldout = min(len(test), ControlConfig().heldout_samples)
        power = None if target is None else target.power(len(forget_ids), n_heldout)
        if power is not None:
            power["low"] = cfg.max_detectable_auc is not None and power["detectable"] > cfg.max_detectable_auc
        return power

    def _low_power(self, pending: list[LedgerEntry]) -> bool:
        """Apply ``on_low_power`` to a batch too small to verify; True: nothing to run now. ``batch`` notes the
        power on each request it holds (once per batch size) so a client reading its request sees why it waits."""
        cfg = self.service.config
        if cfg.max_detectable_auc is None or cfg.on_low_power == "accept":
            return False
        power = self.power(pending)
        if power is None or not power["low"]:
            return False
        ledger = self.service.ledger
        if cfg.on_low_power == "fail":
            ledger.record_results({e.request_id: {"new_state": "failed", "expected": "validated", "code": "low_power",
                                                  "reason": f"verification power too low: {power['statement']}",
                                                  "metrics": {"power": power}} for e in pending})
            return True
        if time.time() - min(e.received_at for e in pending) >= cfg.low_power_wait_s:
            return False  # waited long enough: verify on the union, the record saying its power
        noted = {e.request_id: {"metrics": {"power": power}} for e in pending
                 if (e.metrics or {}).get("power", {}).get("n_forget") != power["n_forget"]}
        ledger.record_results(noted)
        return True

    def run_once(self) -> dict[str, Any] | None:
        """One round; returns what happened (``None`` when nothing was pending)."""
        batch = self.take_batch()
        if not batch:
            return None
        batch = self._finish_published(batch)
        if not batch:
            return {"published": None, "requests": [], "resumed": True}
        parent = self.service.versions.current
        try:
            result, forget_ids = self._unlearn(batch, parent)
        except Exception as err:  # noqa: BLE001 - a failed run fails its requests, never the worker
            logger.exception("unlearning round for %d request(s) raised", len(batch))
            self._fail(batch, f"unlearning raised {type(err).__name__}: {str(err)[:300]}")
            return {"published": None, "requests": [e.request_id for e in batch], "error": str(err)}
        if result.verified is not True:
            self._record(batch, result, parent, None)
            return {"published": None, "requests": [e.request_id for e in batch], "verification": result.verification}
        forgotten = set(self.service.versions.meta(parent)["forgotten_ids"]) | set(forget_ids)
        version = self.service.versions.publish(result.model, parent=parent, forgotten_ids=forgotten,
                                                request_ids=[e.request_id for e in batch],
                                                verification=result.verification)
        self._record(batch, result, parent, version)
        return {"published": version, "requests": [e.request_id for e in batch], "verification": result.verification}

    def _finish_published(self, batch: list[LedgerEntry]) -> list[LedgerEntry]:
        """Record as verified the requests a version already serves (the worker died between publishing it and
        recording them), without unlearning them twice; return the rest of the batch."""
        versions = self.service.versions
        # only versions the served model descends from: a rolled-back version's requests are owed again
        lineage = versions.lineage()
        published = {rid: v for v in lineage for rid in versions.meta(v)["request_ids"]}
        ledger = self.service.ledger
        for entry in batch:
            version = published.get(entry.request_id)
            if version is None and entry.state == "unlearned":  # died between recording unlearned and failed: run again
                ledger.transition(entry.request_id, "scheduled", expected="unlearned", resumed=True)
            if version is None:
                continue
            meta = versions.meta(version)
            if entry.state == "scheduled":
                ledger.record_result(entry.request_id, new_state="unlearned", expected="scheduled", resumed=True)
            extra = {"metrics": {"model_version": version, "from_version": meta["parent"]}}
            ledger.record_results({entry.request_id: verification_result(meta["verification"], **extra)})
        return [e for e in batch if e.request_id not in published]

    def _unlearn(self, batch: list[LedgerEntry], parent: int) -> tuple[Any, list[int]]:
        from erasus_ray import ErasusUnlearner

        service = self.service
        forget_ids = sorted({int(i) for e in batch for i in service.ownership.resolve(e.request())})
        excluded = set(forget_ids) | set(service.versions.meta(parent)["forgotten_ids"])
        train = service.benchmark.train
        retain_ids = [int(i) for i in train.ids if int(i) not in excluded]
        model = service.versions.load(parent)  # a fresh copy of the served version
        kwargs = {"task": service.task, **service.config.unlearner, "progress": False}  # the benchmark's adapter
        pool = self.pool()
        if pool is not None and "pool_spec" not in kwargs:
            kwargs["pool_spec"] = pool  # scored on warm actors: a round pays no actor start-up
            kwargs["execution"] = {"distributed": "ray", **(kwargs.get("execution") or {})}
        result = ErasusUnlearner(model, **kwargs).fit(
            forget_data=train.subset(forget_ids), retain_data=train.subset(retain_ids), heldout_data=service.benchmark.test)
        return result, forget_ids

    def pool(self) -> Any:
        """The warm :class:`~erasus_ray.distributed.ScoringPool` (``config.scoring_pool``), or None outside Ray or
        when configured off. Its actors start on the first select that scores under Ray and live until :meth:`close`."""
        spec = self.service.config.scoring_pool
        if spec is None:
            return None
        import ray

        if not ray.is_initialized():
            return None
        if self._pool is None:
            from erasus_ray.distributed import PoolSpec, ScoringPool

            self._pool = ScoringPool(PoolSpec(**spec))
        return self._pool

    def close(self) -> None:
        """End the warm pool's actors."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _record(self, batch: list[LedgerEntry], result: Any, parent: int, version: int | None) -> None:
        """Unlearned then verified/failed per the verification, for the whole batch in two transactions."""
        ledger = self.service.ledger
        common = {"strategy": str(result.config.get("strategy")), "model_hash_before": result.model_hash_before,
                  "model_hash_after": result.model_hash_after}
        coreset = set(int(i) for i in result.coreset.ids)
        # each request records the part of the batch's coreset that is its own: the rest are other clients' ids
        own = {e.request_id: sorted(coreset & {int(i) for i in self.service.ownership.resolve(e.request())}) for e in batch}
        ledger.record_results({e.request_id: {**common, "coreset_ids": own[e.request_id], "new_state": "unlearned",
                                              "expected": "scheduled"} for e in batch})
        # model_version: the version that serves the deletion (None: not published); from_version: what it started on
        extra: dict[str, Any] = {"metrics": {"model_version": version, "from_version": parent}}
        power = result.verification.get("power")
        cfg = self.service.config
        low = power and cfg.max_detectable_auc is not None and power["detectable"] > cfg.max_detectable_auc
        if low and result.verified is True:  # a failure keeps its failing criteria as the reason
            extra["reason"] = f"low verification power: {power['statement']}"
        if version is None and result.verified is None:
            # nothing measurable: never published, so the request cannot stay owed as if it were done
            self._fail(batch, f"not verified: {result.verification.get('why', 'no measurable target')}", expected="unlearned")
            return
        ledger.record_results({e.request_id: verification_result(result.verification, **extra) for e in batch})

    def _fail(self, batch: list[LedgerEntry], reason: str, expected: str = "scheduled") -> None:
        self.service.ledger.record_results({e.request_id: {"new_state": "failed", "reason": reason, "expected": expected}
                                            for e in batch})


class WorkerLoop:
    """:meth:`UnlearningWorker.run_once` every ``poll_s`` seconds in a daemon thread until :meth:`stop`."""

    def __init__(self, worker: UnlearningWorker, poll_s: float) -> None:
        self.worker = worker
        self.poll_s = poll_s
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="erasus-unlearning-worker", daemon=True)

    def start(self) -> "WorkerLoop":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self.worker.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                done = self.worker.run_once()
            except Exception:  # noqa: BLE001 - the ledger keeps the requests; try again next poll
                logger.exception("unlearning round failed; retrying in %.1f s", self.poll_s)
                done = None
            if done is not None:
                self.rounds += 1
                continue  # more may be pending: no wait
            self._stop.wait(self.poll_s)
