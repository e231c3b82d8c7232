"""Continual unlearning on digits: each request unlearns only the newly marked ids, earlier batches stay forgotten,
utility is tracked per request, every request is verified in the ledger by its run's own controller verification and,
with a retrain baseline, the gold rule: both must hold (a no-op is never verified, and when nothing was measured a
request stops at 'unlearned'); rebounded batches replay their coreset exactly when it is still
valid; the default ledger is a durable file."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("sqlalchemy")

from erasus_ray.continual import NO_BASELINE, ContinualUnlearner, UnlearningDataset  # noqa: E402
from erasus_ray.errors import InvalidConfigError, InvalidDataError, InvalidRequestError  # noqa: E402
from erasus_ray.evaluation.classification import per_sample_stats  # noqa: E402
from erasus_ray.ledger import DeletionLedger  # noqa: E402
from erasus_ray.training import train_model  # noqa: E402
from erasus_ray.unlearner import UnlearningResult  # noqa: E402
from erasus_ray.utils import clone_model  # noqa: E402
from erasus_ray.utils.common import model_hash  # noqa: E402


@pytest.fixture(autouse=True)
def _default_ledger(tmp_path, monkeypatch):
    """ledger=None means the durable default file: point it at the test's tmp dir, never the working tree."""
    monkeypatch.setenv("ERASUS_RAY_LEDGER", str(tmp_path / "default-ledger.db"))


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
    retrains = []

    def retrain(dataset: UnlearningDataset):  # the verification baseline: retrained without every id marked so far
        retrains.append(len(dataset.retain))
        return train_model(bench.model_factory(), dataset.retain, bench.task, bench.recipe)

    cu = ContinualUnlearner(
        bench.original, strategy="grad_diff", selector="el2n", fraction=0.2, seed=0, progress=False,
        ledger=str(db), test_data=bench.test, gold=retrain,
    )
    r1 = cu.incremental_fit(ds, reason="digit 3", gold=bench.gold)  # the benchmark's retrain without digit 3
    after1 = {"a": _acc(bench, r1.model, ids3), "b": _acc(bench, r1.model, ids5)}
    ds.mark_forget(ids5)
    r2 = cu.incremental_fit(ds, previous_result=r1, reason="digit 5")  # baseline: retrain() without 3 and 5
    return {"bench": bench, "ds": ds, "cu": cu, "r1": r1, "r2": r2, "ids3": ids3, "ids5": ids5, "after1": after1, "db": db,
            "retrains": retrains}


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
    # request 2's baseline was retrained once, without digits 3 and 5
    assert t["retrains"] == [len(t["ds"].retain)]
    assert r1.verified is True and r2.verified is True
    with DeletionLedger(t["db"]) as led:  # reopened from disk
        entries = led.entries()
        assert [e.request_id for e in entries] == [r1.request_id, r2.request_id]
        assert [e.state for e in entries] == ["verified", "verified"]
        for e in entries:  # verified means measured: the forget accuracy is within tolerance of the retrain's
            checks = e.metrics["verify_checks"]["forget_acc"]
            assert checks["passed"] and e.metrics["verified"] is True and "Agresti-Coull" in e.metrics["verify_rule"]
            assert checks["gold"] < 0.05 and checks["before"] > 0.95 and checks["gap_after"] < 0.1
            assert e.metrics["after_gold_forget_acc"] == checks["gold"] and "mia_svc_efficacy" in e.metrics["verify_checks"]
            # the gold rule and the run's own controller verification (digit 3, then 5: a whole class each) both held
            assert e.metrics["verification"]["target"] == "gold" and e.metrics["verification"]["passed"] is True
            assert [(p["target"], p["passed"]) for p in e.metrics["verification"]["parts"]["controller"]] == [("class", True)]
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

    assert r.history[-1]["replay_skipped"] == {}

    # the same rebound, but some samples of that coreset were purged (erased after request 1): no longer valid, so
    # not replayed, and the history says why
    ds_purged = UnlearningDataset(bench.train, forget_indices=ids3)
    ds_purged.mark_forget(ids8)
    gone = ds_purged.purge(r1.batches[0].coreset_ids[:3])
    assert len(gone) == 3 and not set(gone.tolist()) & set(ds_purged.data.ids.tolist())
    assert not set(gone.tolist()) & set(ds_purged.retain.ids.tolist())  # purged ids never become retain data
    cu_p = ContinualUnlearner(bench.original, strategy="grad_diff", selector="el2n", fraction=0.2, seed=0, progress=False)
    r_p = cu_p.incremental_fit(ds_purged, previous_result=rebounded)
    assert r_p.replayed == [] and set(r_p.coreset.ids.tolist()) <= set(ids8.tolist())
    why = r_p.history[-1]["replay_skipped"][r1.request_id]
    assert "rebounded" in why and "3 of its" in why and "purged" in why
    assert cu_p.ledger.history(r_p.request_id)[2].details["replay_skipped"] == {r1.request_id: why}
    assert _acc(bench, r_p.model, ids3) > 0.5  # digit 3 stays learned: nothing replayed it

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


# ---- verification: "verified" is measured ---------------------------------------------------------------------------
def _no_op(cu: ContinualUnlearner):
    """A strategy run that changes nothing (what a broken unlearner looks like)."""

    def fit(forget, retain, coreset=None, **kwargs):
        h = model_hash(cu.engine.model)
        return UnlearningResult(clone_model(cu.engine.model), coreset, {}, {}, None, model_hash_before=h, model_hash_after=h)

    return fit


def test_a_no_op_unlearner_is_never_verified(digits_class, monkeypatch) -> None:
    bench = digits_class
    ids3 = bench.forget_ids  # the class scenario's forget set: every training 3; bench.gold never saw one
    runs = {}
    for name, kwargs in {
        "gold": {"gold": bench.gold},
        "gold_metrics": {"gold_metrics": {"forget_acc": _acc(bench, bench.gold, ids3)}},
        "none": {},
    }.items():
        cu = ContinualUnlearner(bench.original, strategy="grad_diff", selector=None, progress=False, ledger="sqlite://")
        monkeypatch.setattr(cu.engine, "fit", _no_op(cu))
        r = cu.incremental_fit(UnlearningDataset(bench.train, forget_indices=ids3), request_id=f"noop-{name}", **kwargs)
        runs[name] = (r, cu.ledger.get(f"noop-{name}"))
    for name in ("gold", "gold_metrics"):
        r, entry = runs[name]
        assert r.verified is False and entry.state == "failed", (name, entry.state, entry.state_reason)
        assert entry.state_reason.startswith("not verified: gold target: forget_acc gap"), entry.state_reason
        check = entry.metrics["verify_checks"]["forget_acc"]
        assert check["gap_after"] > 0.9 and not check["passed"]  # the original still knows every 3
    r, entry = runs["none"]  # no baseline: it ran, it is not verified, and the ledger says why
    assert r.verified is None and entry.state == "unlearned" and entry.state_reason == NO_BASELINE
    assert r.step_result is not None and entry.coreset_ids == ids3.tolist()


def test_verification_arguments_are_checked(digits_class) -> None:
    bench = digits_class
    cu = ContinualUnlearner(bench.original, selector=None, progress=False, ledger=False)
    ds = UnlearningDataset(bench.train, forget_indices=bench.forget_ids[:5])
    with pytest.raises(InvalidConfigError, match="gold_metrics"):
        cu.incremental_fit(ds, gold_metrics={"forget_acc": 1.5})
    with pytest.raises(InvalidConfigError, match="gold must be"):
        cu.incremental_fit(ds, gold="retrain")  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match="gold must be"):
        ContinualUnlearner(bench.original, ledger=False, gold=3)  # type: ignore[arg-type]


def test_two_marks_before_one_fit_are_served_as_one_request(digits_class, tmp_path) -> None:
    bench = digits_class
    y = _labels(bench)
    ids8 = np.sort(bench.train.ids[y == 8])
    first, second = ids8[:15], ids8[30:45][::-1]  # the second batch arrives unsorted
    ds = UnlearningDataset(bench.train, forget_indices=first)
    ds.mark_forget(second)
    assert [b.tolist() for b in ds.batches] == [first.tolist(), np.sort(second).tolist()]
    cu = ContinualUnlearner(bench.original, strategy="grad_diff", selector=None, seed=0, progress=False, ledger=tmp_path / "two.db")
    r = cu.incremental_fit(ds, request_id="both")
    union = np.union1d(first, second)
    assert np.array_equal(r.new_ids, union) and np.array_equal(r.processed_ids, union)
    assert np.array_equal(np.sort(r.coreset.ids), union)  # selector=None: the whole request is the coreset
    assert len(r.history) == 1 and r.history[0]["n_new"] == 30
    [entry] = cu.ledger.entries()
    assert entry.request_id == "both" and entry.ids == union.tolist() and entry.coreset_ids == union.tolist()
    assert entry.state == "unlearned" and entry.state_reason == NO_BASELINE  # no baseline was given
    # ids 15..29 of the class were never marked: they are retain data, not forgotten
    assert not set(ids8[15:30].tolist()) & set(r.processed_ids.tolist()) and set(ids8[15:30].tolist()) <= set(ds.retain.ids.tolist())
    assert cu.incremental_fit(ds) is r  # nothing new


def test_purge_is_only_for_forgotten_ids(digits_class) -> None:
    bench = digits_class
    ds = UnlearningDataset(bench.train, forget_indices=bench.forget_ids[:5])
    with pytest.raises(InvalidDataError, match="not marked"):
        ds.purge([int(bench.forget_ids[10])])
    ds.purge(bench.forget_ids[:2])
    assert len(ds.mark_forget(bench.forget_ids[:2])) == 0  # still marked, no error
    with pytest.raises(InvalidDataError, match="purged before they were unlearned"):
        ContinualUnlearner(bench.original, selector=None, progress=False, ledger=False).incremental_fit(ds)


def test_the_default_ledger_is_a_durable_file(digits_class, tmp_path, monkeypatch) -> None:
    bench = digits_class
    target = tmp_path / "env-ledger.db"
    monkeypatch.setenv("ERASUS_RAY_LEDGER", str(target))
    cu = ContinualUnlearner(bench.original, strategy="grad_diff", selector=None, progress=False)
    r = cu.incremental_fit(UnlearningDataset(bench.train, forget_indices=bench.forget_ids[:5]), request_id="durable-1")
    cu.ledger.close()
    with DeletionLedger(target) as led:  # another process would see it
        assert led.get("durable-1").state == "unlearned" and led.get("durable-1").ids == bench.forget_ids[:5].tolist()
        assert r.request_id == "durable-1"
    monkeypatch.delenv("ERASUS_RAY_LEDGER")
    monkeypatch.chdir(tmp_path)
    cu2 = ContinualUnlearner(bench.original, selector=None, progress=False)
    assert cu2.ledger.url == f"sqlite:///{tmp_path / 'erasus-ledger.db'}" and (tmp_path / "erasus-ledger.db").exists()
    cu2.ledger.close()


# ---- verification: the run's own controller verification, and the gold rule when a baseline is given --------------
def _request(bench, ids, rid, *, fit_kwargs=None, **kwargs):
    cu = ContinualUnlearner(bench.original, strategy="grad_diff", selector=None, seed=0, progress=False, ledger="sqlite://", **kwargs)
    r = cu.incremental_fit(UnlearningDataset(bench.train, forget_indices=ids), request_id=rid, **(fit_kwargs or {}))
    return r, cu.ledger.get(rid), [x.to_state for x in cu.ledger.history(rid)]


def test_a_heldout_set_without_gold_is_verified_by_the_runs_own_verification(digits_random10) -> None:
    bench = digits_random10
    ids = np.sort(bench.forget_ids)[:40]  # no whole class: only the held-out set (test_data) makes the run measurable
    r, entry, states = _request(bench, ids, "heldout", test_data=bench.test)
    own = r.step_result.verification
    assert own["target"] == "heldout" and own["passed"] is True
    assert r.verified is True and entry.state == "verified" and entry.metrics["verified"] is True and states[-1] == "verified"
    assert entry.metrics["verification"]["target"] == "heldout" and entry.metrics["verification"]["criteria"] == own["criteria"]
    # the same request without the held-out set measured nothing: it stops at 'unlearned' and says why
    r0, entry0, _ = _request(bench, ids, "none")
    assert r0.step_result.verification["passed"] is None and r0.verified is None
    assert entry0.state == "unlearned" and entry0.state_reason == NO_BASELINE


@pytest.fixture(scope="module")
def short_class_run(digits_class):
    """Forgetting digit 3 with a one-step budget: the controller's class target fails (forget accuracy ~0.9 > 0)."""
    return _request(digits_class, digits_class.forget_ids, "short", budget_steps=1)


def test_a_run_that_fails_its_criteria_is_failed_with_them_in_the_ledger(short_class_run) -> None:
    r, entry, states = short_class_run
    own = r.step_result.verification
    assert own["target"] == "class" and own["passed"] is False
    assert r.verified is False and entry.state == "failed"
    [criterion] = [c for c in own["criteria"] if not c["passed"]]
    assert f"class target: {criterion['name']}={criterion['value']:.4g} outside" in entry.state_reason, entry.state_reason
    assert states == ["received", "validated", "scheduled", "unlearned", "failed"]


def test_with_gold_both_the_gold_rule_and_the_runs_verification_must_hold(digits_class, digits_random10, short_class_run) -> None:
    # the gold rule passes (the baseline's forget accuracy is what the short run reached), the run's own target fails
    short = short_class_run[0]
    bench = digits_class
    reached = short.history[-1]["batches"][short.request_id]["forget_acc"]
    r, entry, _ = _request(bench, bench.forget_ids, "gold-ok", budget_steps=1, fit_kwargs={"gold_metrics": {"forget_acc": reached}})
    verification = entry.metrics["verification"]
    assert verification["target"] == "gold" and all(c["passed"] for c in verification["criteria"])
    assert verification["parts"]["controller"][0]["passed"] is False
    assert r.verified is False and entry.state == "failed" and "controller: class target failed" in entry.state_reason
    # the run's own target holds, the gold rule fails (a baseline that got every forgotten sample wrong)
    ids = np.sort(digits_random10.forget_ids)[:40]
    r, entry, _ = _request(digits_random10, ids, "gold-bad", test_data=digits_random10.test, fit_kwargs={"gold_metrics": {"forget_acc": 0.0}})
    assert r.step_result.verification["passed"] is True
    assert r.verified is False and entry.state == "failed" and entry.state_reason.startswith("not verified: gold target: forget_acc gap")
    assert "controller" not in entry.state_reason
