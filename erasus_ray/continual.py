"""Continual unlearning: deletion requests keep arriving; each call unlearns only what is new.

:class:`UnlearningDataset` is a training set plus a growing set of ids marked to forget (each
:meth:`~UnlearningDataset.mark_forget` call is one batch). :meth:`ContinualUnlearner.incremental_fit` unlearns the ids
marked since the last call as **one** deletion request (one ledger entry, one coreset selection, one strategy run, on
top of the model the previous call returned), then measures every batch forgotten so far, the retain set and,
optionally, a test set, so utility is tracked request after request (``result.history``).

This is the "sequential/continual unlearning" setting of e.g. Nguyen et al. 2022 ("A survey of machine unlearning",
section on continual removal) and the ``ContinualUnlearner`` of the erasus 0.2 README; no single paper is implemented.
Choices we made:

- **Only new ids are unlearned.** The forget set of request *t* is ``marked - already_processed``; the retain set is
  every unmarked id (so samples forgotten earlier are never used as retain data again).
- **Reuse of earlier coresets (the rule).** An earlier batch's stored coreset is *reused* - its ids join the current
  request's coreset as replay, with their stored weights and without re-scoring - exactly when (a) it is still valid:
  every id in it is still marked to forget and its raw sample is still in the dataset (not erased with
  :meth:`UnlearningDataset.purge`: a gradient step needs the sample), and (b) that batch has *rebounded*: measured on
  the current model just before the new request (on its samples still stored), its forget accuracy is higher than when
  it was last measured by more than ``rebound_tolerance`` (default 0.05). Batches that did not rebound are left alone:
  pushing an already-forgotten batch again with a gradient-ascent objective overshoots and costs utility. A rebounded
  batch whose coreset is no longer valid is not replayed, and the history says why (``replay_skipped``). Replay is off
  with ``replay=False``.
- **Verification.** Each request's verdict combines two measurements, the way the federated coordinator combines its
  server's rule with its clients' runs (:func:`erasus_ray.evaluation.verification.combined_verification`): the run's
  own verification by the closed-loop controller (``result.verification`` of the request's
  :class:`~erasus_ray.ErasusUnlearner` run: the ``class`` target when the request is a whole class, else ``heldout``
  with ``test_data`` as the held-out set, or the target given) and, when a baseline is given, the federated rule
  against it (:func:`~erasus_ray.evaluation.verification.verification_checks`, ``VERIFY_RULE``, as a record by
  :func:`~erasus_ray.evaluation.verification.gold_rule_record`): on the request's new ids, the forget accuracy (and,
  with ``test_data``, the SVC MIA efficacy) of the unlearned model must be within tolerance of the baseline's
  (max(``verify_tolerance``, the 95% Agresti-Coull half-width)), or unlearning must have closed at least
  ``verify_close_fraction`` of the previous model's gap. The baseline is ``gold`` (a model retrained without every id
  marked so far, or a callable returning one for the dataset) or ``gold_metrics`` (the baseline's metrics on the
  request's new ids: ``forget_acc``, optionally ``mia_svc_efficacy``). Both must hold (one that measured nothing does
  not count): ``verified``; either failing: ``failed`` with the failing criteria as the reason. **When neither measured
  anything** (no whole class, no ``test_data``, no baseline) **the request stops at ``unlearned``**, its ledger reason
  saying so: nothing is marked verified unmeasured.
- **Ledger.** Every request goes through :class:`~erasus_ray.ledger.DeletionLedger`: submitted (``validated``),
  ``scheduled``, ``unlearned`` (coreset ids, strategy, model hashes before/after, timings), then ``verified`` /
  ``failed`` (recorded with :meth:`~erasus_ray.ledger.DeletionLedger.record_verification`: the combined verification
  in ``metrics["verification"]``, the metrics and the checks) or, with nothing measured, left ``unlearned``. A strategy error moves it to
  ``failed`` with the error and re-raises. Default (``ledger=None``): the durable SQLite file
  :func:`~erasus_ray.ledger.default_ledger_url` - ``$ERASUS_RAY_LEDGER``, else ``./erasus-ledger.db``, the file
  ``erasus-ray ledger list`` reads without ``--db`` (its path is logged). ``ledger="sqlite://"`` keeps it in memory,
  ``ledger=False`` records nothing.

Cost per request: one selection over the new ids (the selector's cost), one strategy run on the coreset (+ replay),
and forward passes over the forgotten ids, the retain set (capped at ``max_eval_samples``, seeded) and the test set.

Example:
    >>> ds = UnlearningDataset(train_set, forget_indices=[0, 5, 12])
    >>> cu = ContinualUnlearner(model, strategy="grad_diff", selector="el2n", fraction=0.5, progress=False,
    ...                         ledger="sqlite:///deletions.db", gold=lambda ds: retrain(ds.retain))
    >>> r1 = cu.incremental_fit(ds)
    >>> ds.mark_forget([42, 88])
    >>> r2 = cu.incremental_fit(ds, previous_result=r1)     # unlearns 42 and 88 only
    >>> [h["n_new"] for h in r2.history], cu.ledger.counts()
    ([3, 2], {'verified': 2})
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from torch import nn

from erasus_ray.data import IdDataset, as_id_dataset
from erasus_ray.errors import ErasusError, InvalidConfigError, InvalidDataError, InvalidRequestError
from erasus_ray.evaluation.classification import per_sample_stats
from erasus_ray.selectors import Coreset, Selector
from erasus_ray.strategies import Strategy
from erasus_ray.evaluation.verification import (
    VERIFY_RULE, combined_verification, gold_rule_record, verification_checks, verification_record,
)
from erasus_ray.unlearner import ErasusUnlearner, UnlearningResult

log = logging.getLogger("erasus_ray.continual")
NO_BASELINE = (
    "not verified: the run had no measurable target (the forget set is not a whole removed class and no test_data= "
    "was given as its held-out set) and no verification baseline was given (gold= a model retrained without the "
    "forgotten ids, or gold_metrics= its metrics on them); the request stops at 'unlearned'"
)


def _as_id_array(ids: Iterable[int], name: str) -> np.ndarray:
    try:
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
    except TypeError:
        raise InvalidDataError(f"{name} must be a list of integer ids, got {type(ids).__name__}") from None
    arr = arr.reshape(-1)
    if arr.size and arr.dtype.kind not in "iu":
        raise InvalidDataError(f"{name} must hold integer ids, got dtype {arr.dtype}")
    return arr.astype(np.int64)


class UnlearningDataset:
    """A training set and the ids marked to forget so far.

    Args:
        base: a Dataset, Subset, DataLoader or :class:`~erasus_ray.data.IdDataset`; ids as everywhere in erasus-ray
            (a plain dataset's row index, or its ``ids`` attribute).
        forget_indices: ids to mark now (the first batch); ``[]`` for none yet.

    Attributes:
        data: the stored samples as an :class:`IdDataset` (without the purged ones).
        batches: the id arrays of each :meth:`mark_forget` call that marked something new, in order.
        purged: ids whose stored sample was erased (:meth:`purge`); they stay marked.
    """

    def __init__(self, base: Any, forget_indices: Iterable[int] = ()) -> None:
        self.data: IdDataset = as_id_dataset(base)
        self._marked: set[int] = set()
        self.purged: set[int] = set()
        self.batches: list[np.ndarray] = []
        self.mark_forget(forget_indices, _name="forget_indices")

    def purge(self, ids: Iterable[int] | None = None) -> np.ndarray:
        """Erase the stored samples of ids already marked to forget (default: every marked id), e.g. once their
        request is unlearned and the raw data must go. They stay marked - never retain data again - but can no longer
        be replayed or measured. Returns the newly purged ids (sorted); an id not marked raises
        :class:`InvalidDataError` (purging is for forgotten data, not a way to drop training data)."""
        arr = self.forget_ids if ids is None else _as_id_array(ids, "ids")
        not_marked = sorted({int(i) for i in arr} - self._marked)
        if not_marked:
            raise InvalidDataError(f"ids: {len(not_marked)} id(s) are not marked to forget, purge only forgotten ids: {not_marked[:20]}")
        new = np.setdiff1d(np.unique(arr), np.fromiter(self.purged, dtype=np.int64, count=len(self.purged)))
        self.purged.update(int(i) for i in new)
        self.data = self.data.exclude(new)
        return new

    def stored(self, ids: Iterable[int]) -> np.ndarray:
        """The ids (in order) whose sample is still stored (not purged)."""
        arr = _as_id_array(ids, "ids")
        return arr[~np.isin(arr, np.fromiter(self.purged, dtype=np.int64, count=len(self.purged)))]

    def mark_forget(self, ids: Iterable[int], *, _name: str = "ids") -> np.ndarray:
        """Mark ids to forget; returns the newly marked ones (sorted). Unknown ids raise :class:`InvalidDataError`."""
        arr = _as_id_array(ids, _name)
        known = self.data.row_of()
        unknown = [int(i) for i in arr if int(i) not in known and int(i) not in self.purged]
        if unknown:
            raise InvalidDataError(f"{_name}: {len(unknown)} id(s) are not in the dataset: {unknown[:20]}")
        new = np.unique(arr[~np.isin(arr, np.fromiter(self._marked, dtype=np.int64, count=len(self._marked)))])
        if len(new):
            self._marked.update(int(i) for i in new)
            self.batches.append(new)
        return new

    @property
    def forget_ids(self) -> np.ndarray:
        """Every id marked so far, sorted."""
        return np.sort(np.fromiter(self._marked, dtype=np.int64, count=len(self._marked)))

    @property
    def forget(self) -> IdDataset:
        """View of the marked samples still stored (sorted by id)."""
        return self.data.subset(self.stored(self.forget_ids))

    @property
    def retain(self) -> IdDataset:
        """View of every sample not marked to forget."""
        return self.data.exclude(self.forget_ids)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return (f"UnlearningDataset(n={len(self.data)}, forget={len(self._marked)}, batches={len(self.batches)}, "
                f"purged={len(self.purged)})")


@dataclass
class ForgottenBatch:
    """One processed request: its ids, the coreset it ran on and its forget metrics when last measured (after its
    request, or after a replay brought it back)."""

    request_id: str
    ids: np.ndarray
    coreset_ids: np.ndarray
    coreset_weights: np.ndarray
    forget_acc: float
    forget_loss: float


@dataclass
class ContinualResult:
    """The state after a request; pass it as ``previous_result`` to the next :meth:`ContinualUnlearner.incremental_fit`.

    Attributes:
        model: the model with every request so far unlearned.
        request_id: the ledger id of this request (None when nothing new was marked).
        new_ids: ids unlearned by this request.
        processed_ids: every id unlearned so far.
        coreset: what the strategy ran on in this request (new coreset + replayed ones).
        replayed: request ids whose stored coreset was reused (rebounded batches with a valid coreset).
        batches: every processed request, oldest first.
        history: one dict per request: ``n_new``, ``n_coreset``, ``replayed``, ``replay_skipped`` (rebounded batches
            whose coreset was no longer valid, with why), per-batch ``forget_acc``/``forget_loss`` (``batches``),
            ``forget_acc`` over all forgotten ids still stored, ``retain_acc``, ``retain_loss``, ``test_acc``,
            ``verified`` (True / False / None: nothing measured), ``verification`` (the combined record: the gold rule
            and the run's own controller verification), ``verify`` (the gold rule's checks), ``seconds``.
        step_result: the :class:`UnlearningResult` of this request's strategy run.
        verified: this request's verdict: True (the run's own target and, with a baseline, the gold rule held), False
            (one failed: the ledger says ``failed``), None (nothing measured: ``unlearned``).
    """

    model: nn.Module
    request_id: str | None
    new_ids: np.ndarray
    processed_ids: np.ndarray
    coreset: Coreset | None
    replayed: list[str]
    batches: list[ForgottenBatch]
    history: list[dict[str, Any]]
    step_result: UnlearningResult | None = None
    info: dict[str, Any] = field(default_factory=dict)
    verified: bool | None = None


class ContinualUnlearner:
    """Unlearn deletion requests as they arrive, each on top of the last result.

    Args:
        model: the trained model (not modified; each request works on a copy of the previous result's model).
        strategy, selector: as in :class:`~erasus_ray.unlearner.ErasusUnlearner`.
        ledger: a :class:`~erasus_ray.ledger.DeletionLedger`, a SQLAlchemy URL / SQLite path, None for the durable
            default (``$ERASUS_RAY_LEDGER``, else ``./erasus-ledger.db``), or False for none.
        client_id: who the ledger records as the requester (and whose namespace the request ids are in).
        test_data: optional held-out set: measured after each request (``test_acc``), the held-out set of each run's
            controller (its ``heldout`` target where a request is not a whole class), and with a baseline it adds the
            SVC MIA efficacy to the gold rule.
        gold: the verification baseline for every request: a model retrained without every id marked so far, or a
            callable ``gold(dataset) -> model`` called once per request (e.g. retrain on ``dataset.retain``).
            ``incremental_fit(gold=..., gold_metrics=...)`` overrides it per request. None: the run's own
            verification alone decides.
        verify_tolerance, verify_close_fraction: the verification rule's floor and closed-gap fraction (the federated
            coordinator's ``ServerConfig`` defaults, 0.05 and 0.9).
        replay: reuse rebounded batches' coresets (see the module docstring for the rule).
        rebound_tolerance: how much a batch's forget accuracy may rise above its last measured value before it is replayed.
        max_eval_samples: cap on the retain samples measured per request (a seeded subset); None measures all.
        **unlearner_kwargs: everything else :class:`ErasusUnlearner` takes (``fraction``, ``k``, ``seed``, ``lr``,
            ``epochs``, ``progress``, ``task``, strategy hyperparameters, ...).

    Example:
        >>> cu = ContinualUnlearner(model, strategy="grad_diff", selector="el2n", fraction=0.5, seed=0, gold=retrain)
        >>> r = cu.incremental_fit(UnlearningDataset(train, forget_indices=ids_a))
    """

    def __init__(
        self,
        model: nn.Module,
        strategy: Strategy | str = "grad_diff",
        selector: Selector | str | None = "el2n",
        *,
        ledger: Any = None,
        client_id: str = "operator",
        test_data: Any = None,
        gold: nn.Module | Callable[[UnlearningDataset], nn.Module] | None = None,
        verify_tolerance: float = 0.05,
        verify_close_fraction: float = 0.9,
        replay: bool = True,
        rebound_tolerance: float = 0.05,
        max_eval_samples: int | None = 5000,
        **unlearner_kwargs: Any,
    ) -> None:
        if unlearner_kwargs.get("inplace"):
            raise InvalidConfigError("inplace=True is not supported: each request works on a copy of the last model")
        self.engine = ErasusUnlearner(model, strategy=strategy, selector=selector, **unlearner_kwargs)
        self.model = model
        if not (isinstance(rebound_tolerance, (int, float)) and 0 <= rebound_tolerance <= 1):
            raise InvalidConfigError(f"rebound_tolerance must be in [0, 1], got {rebound_tolerance!r}")
        if not (isinstance(verify_tolerance, (int, float)) and 0 <= verify_tolerance <= 1):
            raise InvalidConfigError(f"verify_tolerance must be in [0, 1], got {verify_tolerance!r}")
        if not (isinstance(verify_close_fraction, (int, float)) and 0 < verify_close_fraction <= 1):
            raise InvalidConfigError(f"verify_close_fraction must be in (0, 1], got {verify_close_fraction!r}")
        if max_eval_samples is not None and (not isinstance(max_eval_samples, int) or max_eval_samples < 1):
            raise InvalidConfigError(f"max_eval_samples must be a positive integer or None, got {max_eval_samples!r}")
        if gold is not None and not (isinstance(gold, nn.Module) or callable(gold)):
            raise InvalidConfigError(f"gold must be an nn.Module, a callable dataset -> model, or None, got {type(gold).__name__}")
        self.replay = bool(replay)
        self.rebound_tolerance = float(rebound_tolerance)
        self.verify_tolerance = float(verify_tolerance)
        self.verify_close_fraction = float(verify_close_fraction)
        self.max_eval_samples = max_eval_samples
        self.client_id = client_id
        self.gold = gold
        self.test_data = None if test_data is None else as_id_dataset(test_data)
        self.ledger = self._open_ledger(ledger)
        self.last_result: ContinualResult | None = None

    @staticmethod
    def _open_ledger(ledger: Any) -> Any:
        if ledger is False:
            return None
        try:
            from erasus_ray.ledger import DeletionLedger, default_ledger_url
        except ImportError as err:  # SQLAlchemy is in the [fl] extra
            raise InvalidConfigError(
                f"the deletion ledger needs SQLAlchemy ({err}); pip install 'erasus-ray[fl]', or pass ledger=False"
            ) from None
        if ledger is None:
            url = default_ledger_url()
            log.info("continual unlearning records its requests in the ledger %s (set $ERASUS_RAY_LEDGER or ledger=)", url)
            return DeletionLedger(url)
        if isinstance(ledger, str) or hasattr(ledger, "__fspath__"):
            return DeletionLedger(ledger)
        if isinstance(ledger, DeletionLedger):
            return ledger
        raise InvalidConfigError(f"ledger must be a DeletionLedger, a URL, None or False, got {type(ledger).__name__}")

    # ---- measurement ----------------------------------------------------------------------------------------------
    def _stats(self, model: nn.Module, data: IdDataset) -> tuple[float, float]:
        if len(data) == 0:
            return float("nan"), float("nan")
        s = per_sample_stats(model, self.engine.task, data)
        return float(np.mean(s["correct"])), float(np.mean(s["loss"]))

    def _stored_stats(self, model: nn.Module, dataset: UnlearningDataset, ids: np.ndarray) -> tuple[float, float]:
        """Forget metrics on the ids whose samples are still stored (NaN when every one was purged)."""
        return self._stats(model, dataset.data.subset(dataset.stored(ids)))

    def _retain_eval(self, retain: IdDataset) -> IdDataset:
        if self.max_eval_samples is not None and len(retain) > self.max_eval_samples:
            rng = np.random.default_rng(self.engine.seed)
            retain = retain.subset(np.sort(rng.choice(retain.ids, self.max_eval_samples, replace=False)))
        return retain

    def _verify(
        self, before: nn.Module, after: nn.Module, forget: IdDataset, retain: IdDataset, gold: nn.Module | None,
        gold_metrics: Mapping[str, float] | None,
    ) -> tuple[bool | None, dict[str, Any], str]:
        """Judge the request with the federated coordinator's rule against the baseline: ``(ok, report, the failing
        metrics)``; ``(None, {...}, why not)`` when there is no baseline or the task has no forget accuracy."""

        if gold is None and gold_metrics is None:
            return None, {}, NO_BASELINE
        if gold_metrics is not None:
            gm = dict(gold_metrics)
        elif self.test_data is not None:
            from erasus_ray.evaluation import evaluate

            gm = evaluate(gold, forget=forget, retain=retain, test=self.test_data, task=self.engine.task, seed=self.engine.seed)
        else:
            gm = {"forget_acc": self._stats(gold, forget)[0]}

        def measure(model: nn.Module) -> dict[str, float]:
            if self.test_data is not None:
                from erasus_ray.evaluation import evaluate

                return evaluate(model, forget=forget, retain=retain, test=self.test_data, task=self.engine.task, gold_metrics=gm, seed=self.engine.seed)
            acc = self._stats(model, forget)[0]
            out = {"forget_acc": acc}
            if "forget_acc" in gm:
                out.update(gold_forget_acc=float(gm["forget_acc"]), gap_forget_acc=abs(acc - float(gm["forget_acc"])))
            return out

        m_after, m_before = measure(after), measure(before)
        try:
            ok, checks, why = verification_checks(
                m_after, m_before, len(forget), floor=self.verify_tolerance, close_fraction=self.verify_close_fraction
            )
        except ErasusError as err:  # e.g. a causal-LM task: no forget accuracy to compare
            return None, {"after": m_after}, f"not verified: {err}; the request stops at 'unlearned'"
        report = {
            "verify_rule": VERIFY_RULE.format(close=self.verify_close_fraction), "verify_checks": checks,
            "verified": ok, "after": m_after, "before": m_before,
        }
        return ok, report, why

    def _verdict(self, own: Mapping[str, Any], gold_ok: bool | None, verify: Mapping[str, Any], gold_why: str) -> dict[str, Any]:
        """The request's verification: the run's own controller verification (``own``) and, when a baseline measured
        something, the gold rule as a record, combined as the federated coordinator combines its server's rule and the
        clients' runs (:func:`~erasus_ray.evaluation.verification.combined_verification`): both must hold; one that
        measured nothing does not count; neither measured -> ``passed`` None."""
        if gold_ok is None:
            return combined_verification(own, {})
        gold = gold_rule_record(gold_ok, verify["verify_checks"], gold_why, close_fraction=self.verify_close_fraction)
        return combined_verification(gold, {"controller": [own]} if own else {})

    # ---- the request ----------------------------------------------------------------------------------------------
    def incremental_fit(
        self,
        dataset: UnlearningDataset,
        previous_result: ContinualResult | None = None,
        *,
        request_id: str | None = None,
        reason: str = "",
        gold: nn.Module | None = None,
        gold_metrics: Mapping[str, float] | None = None,
    ) -> ContinualResult:
        """Unlearn the ids marked since the last request, as one ledger request, and verify it: the run's own controller
        verification and, when a baseline is known, the gold rule (module docstring).

        Args:
            dataset: the :class:`UnlearningDataset` with its current marks (every :meth:`~UnlearningDataset.mark_forget`
                call since the last request is served together).
            previous_result: the state to continue from; None continues from this unlearner's last result (or the
                original model on the first call).
            request_id: the ledger's idempotency key (default: ``continual-<random>``); an id this ``client_id``
                already used is refused (:class:`InvalidRequestError` ``conflict``).
            reason: recorded in the ledger.
            gold: this request's baseline, a model retrained without every id marked so far (overrides the
                constructor's ``gold``).
            gold_metrics: or the baseline's metrics on this request's new ids (``forget_acc`` in [0, 1], optionally
                ``mia_svc_efficacy``), e.g. measured elsewhere.

        Returns the new :class:`ContinualResult` (``verified`` says the verdict); when nothing new is marked, the
        previous one unchanged.
        """
        if not isinstance(dataset, UnlearningDataset):
            raise InvalidDataError(f"dataset must be an UnlearningDataset, got {type(dataset).__name__}")
        if gold is not None and not isinstance(gold, nn.Module):
            raise InvalidConfigError(f"gold must be an nn.Module (a model retrained without the forgotten ids), got {type(gold).__name__}")
        if gold_metrics is not None:
            acc = gold_metrics.get("forget_acc") if isinstance(gold_metrics, Mapping) else None
            if not isinstance(acc, (int, float)) or isinstance(acc, bool) or not 0.0 <= float(acc) <= 1.0:
                raise InvalidConfigError(f"gold_metrics must be a mapping with 'forget_acc' in [0, 1], got {gold_metrics!r}")
        state = previous_result if previous_result is not None else self.last_result
        model = state.model if state is not None else self.model
        processed = state.processed_ids if state is not None else np.zeros(0, dtype=np.int64)
        batches = list(state.batches) if state is not None else []
        history = list(state.history) if state is not None else []
        forget_ids = dataset.forget_ids
        not_marked = np.setdiff1d(processed, forget_ids)
        if len(not_marked):
            raise InvalidDataError(
                f"previous_result unlearned {len(not_marked)} id(s) this dataset does not mark to forget "
                f"(e.g. {not_marked[:10].tolist()}): pass the same UnlearningDataset"
            )
        new_ids = np.setdiff1d(forget_ids, processed)
        if len(new_ids) == 0:
            if state is None:
                raise InvalidDataError("no ids are marked to forget: call dataset.mark_forget([...]) first")
            return state
        lost = np.setdiff1d(new_ids, dataset.stored(new_ids))
        if len(lost):
            raise InvalidDataError(
                f"{len(lost)} id(s) were purged before they were unlearned (e.g. {lost[:10].tolist()}): unlearn first, then purge"
            )
        retain = dataset.retain
        if self.engine.strategy.needs_retain and len(retain) == 0:
            raise InvalidDataError(f"strategy {self.engine.strategy.name!r} needs retain data, and every id is marked")

        rid = request_id or f"continual-{uuid.uuid4().hex[:16]}"
        key = rid  # the ledger's key (scoped when another client already holds rid)
        if self.ledger is not None:
            from erasus_ray.ledger import DeletionRequest, console_submitter

            # a local caller submits as the console (no sender): its requests live in the console's namespace
            if self.ledger.find(rid, client_id=console_submitter(self.client_id)) is not None:
                raise InvalidRequestError(f"request_id {rid!r} is already in the ledger; use a new one", code="conflict", request_id=rid)
            entry = self.ledger.submit(DeletionRequest(rid, self.client_id, "sample", ids=new_ids.tolist(), reason=reason))
            if entry.state != "validated":
                raise InvalidRequestError(f"the ledger rejected {rid!r}: {entry.state_reason}", code=entry.error_code or "malformed", request_id=rid)
            key = entry.request_id

        start = time.perf_counter()
        # the rule for reusing earlier coresets: rebounded, and still valid (module docstring)
        replayed: list[ForgottenBatch] = []
        skipped: dict[str, str] = {}
        if self.replay and batches:
            marked = set(forget_ids.tolist())
            for batch in batches:
                stored_ids = dataset.stored(batch.ids)
                if len(stored_ids) == 0:
                    continue  # nothing left to measure or replay
                acc, _ = self._stats(model, dataset.data.subset(stored_ids))
                if not acc > batch.forget_acc + self.rebound_tolerance:
                    continue
                coreset_ids = batch.coreset_ids.tolist()
                unmarked = [i for i in coreset_ids if i not in marked]
                purged = len(coreset_ids) - len(dataset.stored(batch.coreset_ids))
                if unmarked or purged:
                    why = f"rebounded (forget_acc {batch.forget_acc:.3f} -> {acc:.3f}) but its coreset is no longer valid: " + (
                        f"{purged} of its {len(coreset_ids)} samples were purged" if purged else f"{len(unmarked)} id(s) no longer marked"
                    )
                    skipped[batch.request_id] = why
                    log.warning("not replaying %s: %s", batch.request_id, why)
                    continue
                replayed.append(batch)
        if self.ledger is not None:
            self.ledger.transition(
                key, "scheduled", expected="validated", step=len(history) + 1, n_new=len(new_ids),
                replay=[b.request_id for b in replayed], replay_skipped=skipped,
            )
        try:
            forget_new = dataset.data.subset(new_ids).sorted()
            t0 = time.perf_counter()
            new_coreset = self.engine._coreset(model, forget_new, retain, adaptive=False)  # fixed: replayed coresets join it
            select_s = time.perf_counter() - t0
            if replayed:
                replay_ids = np.concatenate([b.coreset_ids for b in replayed])
                keep = ~np.isin(replay_ids, new_coreset.ids)
                replay_ids = replay_ids[keep]
                replay_w = np.concatenate([b.coreset_weights for b in replayed])[keep]
                coreset = Coreset(
                    ids=np.concatenate([new_coreset.ids, replay_ids]).astype(np.int64),
                    weights=np.concatenate([np.asarray(new_coreset.weights, dtype=np.float64), replay_w]),
                    scores=new_coreset.scores,
                    selector=new_coreset.selector,
                    info={**new_coreset.info, "replayed": [b.request_id for b in replayed], "n_replay": int(len(replay_ids))},
                )
                forget_data = dataset.data.subset(np.union1d(new_ids, replay_ids))
            else:
                coreset, forget_data = new_coreset, forget_new
            self.engine.model = model
            # test_data is the run's held-out set: the controller's "heldout" target where the request is not a class
            step = self.engine.fit(forget_data, retain, coreset=coreset, heldout_data=self.test_data)
        except Exception as err:
            if self.ledger is not None:
                self.ledger.transition(key, "failed", reason=f"{type(err).__name__}: {str(err)[:500]}")
            raise
        finally:
            self.engine.model = self.model
        step.timings["select"] = step.timings.get("select", 0.0) + select_s
        step.timings["total"] = step.timings.get("total", 0.0) + select_s
        if gold is None and gold_metrics is None and self.gold is not None:
            gold = self.gold if isinstance(self.gold, nn.Module) else self.gold(dataset)
            if not isinstance(gold, nn.Module):
                raise InvalidConfigError(f"the gold callable must return an nn.Module, got {type(gold).__name__}")
        own = verification_record(step.verification or {})  # the run's own controller verification
        measurable = gold is not None or gold_metrics is not None or own.get("passed") is not None
        if self.ledger is not None:
            self.ledger.record_result(
                key,
                coreset_ids=coreset.ids.tolist(),
                strategy=self.engine.strategy.name,
                model_hash_before=step.model_hash_before,
                model_hash_after=step.model_hash_after,
                new_state="unlearned",
                expected="scheduled",
                timings=step.timings,
                **({} if measurable else {"reason": NO_BASELINE}),
            )

        new_model = step.model
        retain_eval = self._retain_eval(retain)
        gold_ok, verify, gold_why = self._verify(model, new_model, dataset.data.subset(new_ids), retain_eval, gold, gold_metrics)
        verification = self._verdict(own, gold_ok, verify, gold_why)
        verified = verification["passed"]
        acc_new, loss_new = self._stats(new_model, dataset.data.subset(new_ids))
        new_batch = ForgottenBatch(
            request_id=key,
            ids=new_ids,
            coreset_ids=np.asarray(new_coreset.ids, dtype=np.int64),
            coreset_weights=np.asarray(new_coreset.weights, dtype=np.float64),
            forget_acc=acc_new,
            forget_loss=loss_new,
        )
        replayed_ids = {b.request_id for b in replayed}
        per_batch: dict[str, dict[str, float]] = {}
        updated: list[ForgottenBatch] = []
        for batch in batches:
            acc, loss = self._stored_stats(new_model, dataset, batch.ids)
            per_batch[batch.request_id] = {"forget_acc": acc, "forget_loss": loss}
            if batch.request_id in replayed_ids:  # its reference level is what replay brought it back to
                batch = ForgottenBatch(batch.request_id, batch.ids, batch.coreset_ids, batch.coreset_weights, acc, loss)
            updated.append(batch)
        per_batch[key] = {"forget_acc": acc_new, "forget_loss": loss_new}
        updated.append(new_batch)
        all_forgotten = np.union1d(processed, new_ids)
        forget_acc, forget_loss = self._stored_stats(new_model, dataset, all_forgotten)
        retain_acc, retain_loss = self._stats(new_model, retain_eval)
        record: dict[str, Any] = {
            "request_id": key,
            "step": len(history) + 1,
            "n_new": int(len(new_ids)),
            "n_coreset": int(len(coreset)),
            "replayed": [b.request_id for b in replayed],
            "replay_skipped": skipped,
            "batches": per_batch,
            "forget_acc": forget_acc,
            "forget_loss": forget_loss,
            "retain_acc": retain_acc,
            "retain_loss": retain_loss,
            "verified": verified,
            "verification": verification,
            "verify": verify,
            "seconds": time.perf_counter() - start,
            "timings": dict(step.timings),
            "model_hash_after": step.model_hash_after,
        }
        if self.test_data is not None:
            record["test_acc"], record["test_loss"] = self._stats(new_model, self.test_data)
        history.append(record)
        metrics: dict[str, Any] = {k: record[k] for k in ("forget_acc", "forget_loss", "retain_acc", "retain_loss", "test_acc") if k in record}
        metrics["new_forget_acc"] = acc_new
        if verify:
            metrics.update({f"after_{k}": v for k, v in verify["after"].items()})
            metrics.update({f"before_{k}": v for k, v in verify.get("before", {}).items()})
            metrics.update({k: verify[k] for k in ("verify_rule", "verify_checks") if k in verify})
        verdict = f"not verified: {verification['why_failed']}" if verified is False else "" if verified else gold_why or NO_BASELINE
        if self.ledger is not None:  # the verdict decides the state: verified / failed (the failing criteria) / stays unlearned
            self.ledger.record_verification(key, verification, expected="unlearned", metrics=metrics,
                                            **({"reason": verdict} if verified is False else {}))
        if verified is False:
            log.warning("request %s unlearned but %s", key, verdict)
        result = ContinualResult(
            model=new_model,
            request_id=key,
            new_ids=new_ids,
            processed_ids=all_forgotten,
            coreset=coreset,
            replayed=[b.request_id for b in replayed],
            batches=updated,
            history=history,
            step_result=step,
            info={"model_hash_before": step.model_hash_before, "model_hash_after": step.model_hash_after, "verdict": verdict},
            verified=verified,
        )
        self.last_result = result
        return result
