"""A streamed job's verification covers the whole forget stream: the target is judged on every forget row's loss
(not on the coreset the unlearner saw), the measurement equals the in-memory one, and the closed loop over the
stream grows the coreset with the target's failing rows until the whole-stream verdict holds or its rounds run out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from erasus_ray.cli import main
from erasus_ray.control import ControlConfig
from erasus_ray.data import as_id_dataset
from erasus_ray.errors import InvalidConfigError
from erasus_ray.evaluation.verification import Probe, resolve_target
from erasus_ray.jobs import UserJobConfig
from erasus_ray.jobs.run import build_dataset, load_job_data
from erasus_ray.jobs.stream_job import ItemDataset, StreamJudge, collect_pass, stream_target, verify_pass
from erasus_ray.tasks import get_task

from test_jobs_own_data import mlp_job  # noqa: F401  (fixture: trained MLP checkpoint, factory module, CSV)


def _streamed(folder, job, frame, name, **data):
    frame.to_parquet(folder / "samples.parquet")
    job = {**job, "output": name, "data": {**job["data"], "path": "samples.parquet", "streaming": True,
                                           "chunk_rows": 37, "stream_sample": 64, **data}}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(job))
    assert main(["unlearn", "--config", str(folder / f"{name}.yaml"), "--no-progress"]) == 0
    return json.loads((folder / name / "results.json").read_text())


# two classes to forget (2 and 3: 200 rows), a coreset of 4 rows: unlearned alone, it leaves most of the rest predicted
TWO_CLASSES = {"forget": {"where": "label >= 2"}}
CLOSED_LOOP = {"strategy": "grad_diff", "selector": "loss", "k": 4, "fraction": None, "target": "auto"}


def test_the_closed_loop_over_the_stream_grows_the_coreset_until_every_forget_row_passes(mlp_job):
    folder, job, (ids, x, y, _), frame = mlp_job
    doc = _streamed(folder, {**job, **CLOSED_LOOP}, frame, "grown", **TWO_CLASSES)
    v = doc["verification"]
    assert v["mode"] == "stream_closed_loop" and v["target"] == "class" and v["classes"] == [2, 3]
    assert v["scope"] == "all 200 forget rows of the stream"
    first, last = v["rounds"][0], v["rounds"][-1]
    # round 0: the unlearner's own loop passed on its 4-row coreset, yet most forget rows were still predicted right
    assert v["coreset_runs"][0]["passed"] is True
    assert first["coreset"] == 4 and first["passed"] is False and "forget_acc" in first["failing"]
    # each round added failing forget rows (at most doubling the coreset) and the last one passed on the whole stream
    growth = v["coreset_growth"]
    assert len(growth) >= 2 and all(b == a + r["added"] and 0 < r["added"] <= a
                                    for a, b, r in zip(growth, growth[1:], v["rounds"]))
    assert last["passed"] is True and doc["verified"] is True and v["stopped"].startswith("verified")
    final = np.array(doc["data"]["final_coreset_ids"])
    assert len(final) == growth[-1] and set(doc["data"]["stream_coreset"]["ids"]) <= set(final.tolist())
    assert np.isin(final, ids[y >= 2]).all()  # grown only with forget rows
    # the whole-stream criterion is what metrics_after measures over every forget row
    forget_acc = next(c for c in v["criteria"] if c["name"] == "forget_acc")
    assert forget_acc["value"] == pytest.approx(doc["metrics_after"]["forget_acc"]) and forget_acc["passed"]
    assert doc["metrics_before"]["forget_acc"] > 0.9


def test_when_the_rounds_run_out_the_job_says_not_verified_and_why(mlp_job):
    folder, job, _, frame = mlp_job
    doc = _streamed(folder, {**job, **CLOSED_LOOP}, frame, "norounds", stream_rounds=0, **TWO_CLASSES)
    v = doc["verification"]
    assert doc["verified"] is False and v["passed"] is False
    assert v["coreset_runs"][0]["passed"] is True  # the old, coreset-only verdict would have said verified
    assert [r["coreset"] for r in v["rounds"]] == [4] and v["rounds"][0]["added"] == 0
    assert "0 closed-loop round(s) over the stream spent (data.stream_rounds)" in v["stopped"]
    assert doc["metrics_after"]["forget_acc"] > next(c["high"] for c in v["criteria"] if c["name"] == "forget_acc")


@pytest.mark.parametrize("selection, target", [
    ({"forget": {"where": "label == 2 and sample_id < 3000"}, "heldout": {"where": "label != 2 and sample_id >= 3400"}},
     "heldout"),
    ({"forget": {"class": 2}, "heldout": {"where": "label != 2 and sample_id >= 3400"}}, "class"),
])
def test_the_whole_stream_verdict_equals_the_in_memory_one(mlp_job, selection, target):
    folder, job, (ids, x, y, model), frame = mlp_job
    frame.to_parquet(folder / "samples.parquet")
    data = {**job["data"], "path": "samples.parquet", **selection}
    memory_cfg = UserJobConfig.from_dict({**job, **CLOSED_LOOP, "data": data, "target": target}, folder)
    stream_cfg = UserJobConfig.from_dict({**job, **CLOSED_LOOP, "data": {**data, "streaming": True, "chunk_rows": 37,
                                                                         "stream_sample": 400}, "target": target}, folder)
    task = get_task("auto", model)
    # in memory: the unlearner's probe over the whole table
    held = load_job_data(memory_cfg, task, None)
    forget, retain, heldout = (as_id_dataset(d) for d in (held.forget, held.retain, held.heldout))
    probe = Probe(task, forget, retain, heldout, seed=0)
    resolved = resolve_target(target, task=task, forget=forget, retain=retain, heldout=heldout, gold=None, probe=probe)
    memory = probe.measure(model)
    resolved.target.prepare(memory, None)
    expected = resolved.target.verdict(memory)
    # streamed: per-row forget losses from one pass, the samples (here every retain / held-out row) in memory
    build = lambda chunk, row_ids: build_dataset(stream_cfg, chunk, row_ids, task, None)  # noqa: E731
    sets = collect_pass(stream_cfg, build, forget.ids[:4])
    measured = verify_pass(stream_cfg, build, task, {"model": model})
    streamed = stream_target(stream_cfg, task, measured.labels, *sets)
    judge = StreamJudge(streamed, ControlConfig(), task, sets[1], sets[2], seed=0)
    judge.begin(measured.forget["model"], model)
    got = judge.judge(measured.forget["model"], model)
    assert type(streamed.target) is type(resolved.target) and streamed.target.describe() == resolved.target.describe()
    assert np.array_equal(np.sort(measured.forget["model"].ids), np.sort(forget.ids))  # every forget row, once
    assert [c.name for c in got.verdict.criteria] == [c.name for c in expected.criteria]
    for mine, theirs in zip(got.verdict.criteria, expected.criteria):
        assert (mine.value, mine.low, mine.high, mine.passed) == pytest.approx((theirs.value, theirs.low, theirs.high, theirs.passed))
    assert set(streamed.target.failing_ids(got.measurement).tolist()) == set(resolved.target.failing_ids(memory).tolist())
    assert len(streamed.target.failing_ids(got.measurement)) > 0  # the comparison covered failing rows too


def test_stream_rounds_is_checked_and_a_coreset_cannot_make_one_class_of_several_the_target(mlp_job):
    folder, job, (ids, x, y, model), frame = mlp_job
    frame.to_parquet(folder / "samples.parquet")
    job = {**job, **CLOSED_LOOP}
    data = {**job["data"], "path": "samples.parquet", "streaming": True, **TWO_CLASSES}
    with pytest.raises(InvalidConfigError, match="data.stream_rounds"):
        UserJobConfig.from_dict({**job, "data": {**data, "stream_rounds": -1}}, folder)
    cfg = UserJobConfig.from_dict({**job, "data": data, "target": "class"}, folder)
    task = get_task("auto", model)
    build = lambda chunk, row_ids: build_dataset(cfg, chunk, row_ids, task, None)  # noqa: E731
    only_class_2 = ids[y == 2][:4]
    sets = collect_pass(cfg, build, only_class_2)
    labels = verify_pass(cfg, build, task, {"model": model}).labels
    assert stream_target(cfg, task, labels, *sets).target.classes.tolist() == [2, 3]  # not the coreset's [2]
    # a forget set that is not whole classes: "class" is refused, though the coreset is of class 2 and the retain
    # sample (here: made to) holds no class-2 row - the stream's retain rows do
    mixed = UserJobConfig.from_dict({**job, "data": {**data, "forget": {"where": "label == 2 and sample_id < 3000"}},
                                     "target": "class"}, folder)
    coreset, retain, heldout = collect_pass(mixed, build, only_class_2)
    keep = [j for j, item in enumerate(retain.items) if int(item[1]) != 2]
    no_class_2 = ItemDataset(retain.ids[keep].tolist(), [retain.items[j] for j in keep])
    assert len(keep) < len(retain)
    with pytest.raises(InvalidConfigError, match="target 'class' cannot be evaluated"):
        stream_target(mixed, task, verify_pass(mixed, build, task, {"model": model}).labels, coreset, no_class_2, heldout)
