"""Continual unlearning on digits: each request unlearns only the newly marked ids, earlier batches stay forgotten,
utility is tracked per request, every request is verified in the ledger; rebounded batches replay their coreset."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("sqlalchemy")

from erasus_ray.continual import ContinualUnlearner, UnlearningDataset  # noqa: E402
from erasus_ray.errors import InvalidDataError, InvalidRequestError  # noqa: E402
from erasus_ray.evaluation.classification import per_sample_stats  # noqa: E402
from erasus_ray.ledger import DeletionLedger  # noqa: E402
from erasus_ray.utils import clone_model  # noqa: E402


def _labels(bench) -> np.ndarray:
    return bench.train.base.y[torch.as_tensor(bench.train.positions)].numpy()


def _acc(bench, model, ids) -> float:
    return float(per_sample_stats(model, bench.task, bench.train.subset(ids))["correct"].mean())


@pytest.fixture(scope="module")
def two_requests(digits_class, tmp_path_factory):
    """Request 1 forgets digit 3 (the benchmark's forget set), request 2 later forgets digit 5."""
    bench = digits_class
    y = _labels(bench)
    ids3, ids5 = np.sort(bench.train.ids[y == 3]), np.sort(bench.train.ids[y == 5])
    db = tmp_path_factory.mktemp("continual") / "ledger.db"
    ds = UnlearningDataset(bench.train, forget_indices=ids3)
    cu = ContinualUnlearner(
        bench.original, strategy="grad_diff", selector="el2n", fraction=0.2, seed=0, progress=False,
        ledger=str(db), test_data=bench.test,
    )
    r1 = cu.incremental_fit(ds, reason="digit 3")
    after1 = {"a": _acc(bench, r1.model, ids3), "b": _acc(bench, r1.model, ids5)}
    ds.mark_forget(ids5)
    r2 = cu.incremental_fit(ds, previous_result=r1, reason="digit 5")
    return {"bench": bench, "ds": ds, "cu": cu, "r1": r1, "r2": r2, "ids3": ids3, "ids5": ids5, "after1": after1, "db": db}


def test_second_request_processes_only_new_ids_and_both_batches_stay_forgotten(two_requests) -> None:
    t = two_requests
    bench, r1, r2, ids3, ids5 = t["bench"], t["r1"], t["r2"], t["ids3"], t["ids5"]
    orig3, orig5 = _acc(bench, bench.original, ids3), _acc(bench, bench.original, ids5)
    assert orig3 > 0.95 and orig5 > 0.95

    # request 1: digit 3 forgotten like the gold model (0% on 3), digit 5 untouched
    assert _acc(bench, bench.gold, ids3) < 0.05
    assert t["after1"]["a"] < 0.1
    assert t["after1"]["b"] > 0.9
    # request 2 ran on the new ids only, on top of request 1's model
    assert np.array_equal(r2.new_ids, ids5)
    assert set(r2.coreset.ids.tolist()) <= set(ids5.tolist()) and r2.replayed == []
    assert r2.step_result.model_hash_before == r1.step_result.model_hash_after
    assert np.array_equal(r2.processed_ids, np.union1d(ids3, ids5))
    # both batches forgotten after request 2; retain utility holds
    assert _acc(bench, r2.model, ids5) < 0.1
    assert _acc(bench, r2.model, ids3) < 0.1
    retain = t["ds"].retain
    assert _acc(bench, r2.model, retain.ids) > 0.95

    # utility tracked per request
    h = r2.history
    assert [x["n_new"] for x in h] == [len(ids3), len(ids5)]
    assert h[0]["forget_acc"] < 0.1 and h[1]["batches"][r1.request_id]["forget_acc"] < 0.1
    assert h[1]["batches"][r2.request_id]["forget_acc"] < 0.1
    assert all(x["retain_acc"] > 0.95 for x in h) and "test_acc" in h[1]


def test_both_requests_verified_in_the_durable_ledger(two_requests) -> None:
    t = two_requests
    r1, r2 = t["r1"], t["r2"]
    with DeletionLedger(t["db"]) as led:  # reopened from disk
        entries = led.entries()
        assert [e.request_id for e in entries] == [r1.request_id, r2.request_id]
        assert [e.state for e in entries] == ["verified", "verified"]
        assert entries[0].ids == t["ids3"].tolist() and entries[1].ids == t["ids5"].tolist()
        assert entries[1].coreset_ids == sorted(r2.coreset.ids.tolist())
        assert entries[1].model_hash_before == entries[0].model_hash_after
        assert entries[1].metrics["new_forget_acc"] < 0.1 and entries[1].reason == "digit 5"
        assert [x.to_state for x in led.history(r2.request_id)] == ["received", "validated", "scheduled", "unlearned", "verified"]
        assert led.check_integrity() == []


def test_no_new_marks_is_a_no_op_and_bad_input_is_refused(two_requests) -> None:
    t = two_requests
    cu, ds, r2 = t["cu"], t["ds"], t["r2"]
    assert cu.incremental_fit(ds, previous_result=r2) is r2
    assert len(cu.ledger.entries()) == 2
    assert len(ds.mark_forget(t["ids5"][:3])) == 0  # already marked
    with pytest.raises(InvalidDataError, match="not in the dataset"):
        ds.mark_forget([10**9])
    with pytest.raises(InvalidDataError, match="does not mark"):
        cu.incremental_fit(UnlearningDataset(t["bench"].train, forget_indices=t["ids3"][:5]), previous_result=r2)
    with pytest.raises(InvalidDataError, match="no ids are marked"):
        ContinualUnlearner(t["bench"].original, ledger=False).incremental_fit(UnlearningDataset(t["bench"].train))
    assert ds.retain.ids.size + ds.forget_ids.size == len(ds) and not set(ds.retain.ids) & set(ds.forget_ids)


def test_rebounded_batch_replays_its_stored_coreset(two_requests) -> None:
    """If an earlier batch comes back (here: the model is reset to the original), its stored coreset is reused."""
    t = two_requests
    bench, r1 = t["bench"], t["r1"]
    ids3 = t["ids3"]
    y = _labels(bench)
    ids8 = np.sort(bench.train.ids[y == 8])[:40]
    ds = UnlearningDataset(bench.train, forget_indices=ids3)
    rebounded = dataclasses.replace(r1, model=clone_model(bench.original))  # digit 3 at 100% again
    ds.mark_forget(ids8)
    cu = ContinualUnlearner(bench.original, strategy="grad_diff", selector="el2n", fraction=0.2, seed=0, progress=False)
    r = cu.incremental_fit(ds, previous_result=rebounded)
    assert r.replayed == [r1.request_id]
    assert np.array_equal(r.new_ids, ids8)
    assert set(r1.batches[0].coreset_ids.tolist()) <= set(r.coreset.ids.tolist())
    assert r.coreset.info["n_replay"] == len(r1.batches[0].coreset_ids)
    assert _acc(bench, r.model, ids3) < 0.1  # the replay forgot digit 3 again
    # 40 of the ~140 eights: the rest of the class stays in the retain set, so they drop, not to zero
    assert _acc(bench, r.model, ids8) < _acc(bench, bench.original, ids8) - 0.2

    cu_off = ContinualUnlearner(bench.original, strategy="grad_diff", selector="el2n", fraction=0.2, seed=0, progress=False, replay=False)
    r_off = cu_off.incremental_fit(ds, previous_result=rebounded)
    assert r_off.replayed == [] and set(r_off.coreset.ids.tolist()) <= set(ids8.tolist())
    assert _acc(bench, r_off.model, ids3) > 0.5  # without replay digit 3 stays learned: the replay did the forgetting


def test_a_failing_request_is_marked_failed_in_the_ledger(digits_class, monkeypatch) -> None:
    bench = digits_class
    cu = ContinualUnlearner(bench.original, strategy="grad_diff", selector=None, progress=False)
    ds = UnlearningDataset(bench.train, forget_indices=bench.forget_ids[:10])

    def boom(*args, **kwargs):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(cu.engine, "fit", boom)
    with pytest.raises(RuntimeError, match="worker lost"):
        cu.incremental_fit(ds, request_id="req-fail")
    entry = cu.ledger.get("req-fail")
    assert entry.state == "failed" and "worker lost" in entry.state_reason
    with pytest.raises(InvalidRequestError) as info:  # the same request id cannot be reused
        cu.incremental_fit(ds, request_id="req-fail")
    assert info.value.code == "conflict"
