"""Job configs over streams (``data.streaming`` / a factory returning an IterableDataset, incl. ``datasets``
streaming): the coreset scored in one pass equals the in-memory route's, verification covers every row, and what
needs random access is refused naming the key."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import yaml

from erasus_ray.cli import main
from erasus_ray.errors import InvalidConfigError, InvalidDataError
from erasus_ray.jobs import UserJobConfig, run_user_job
from erasus_ray.jobs.stream_job import Reservoir

from test_jobs_own_data import mlp_job  # noqa: F401  (fixture: trained MLP checkpoint, factory module, CSV)

STREAM_FACTORY = textwrap.dedent('''
    import datasets

    def parquet_stream(path):
        return datasets.load_dataset("parquet", data_files=path, split="train", streaming=True)

    def saved(path):
        return datasets.load_from_disk(path)
''')


def _write(folder, job, name="job.yaml"):
    (folder / name).write_text(yaml.safe_dump(job))
    return folder / name


def _run(folder, job, name):
    job = {**job, "output": name}
    assert main(["unlearn", "--config", str(_write(folder, job, f"{name}.yaml")), "--no-progress"]) == 0
    return json.loads((folder / name / "results.json").read_text())


def test_streamed_coreset_equals_the_in_memory_one_and_metrics_cover_every_row(mlp_job):
    folder, job, (ids, x, y, _), frame = mlp_job
    frame.to_parquet(folder / "samples.parquet")
    job = {**job, "data": {**job["data"], "path": "samples.parquet", "forget": {"where": "label == 2 and sample_id < 3000"},
                           "heldout": {"where": "label != 2 and sample_id >= 3400"}},
           "selector": "loss", "k": 12, "fraction": None, "runner": {"epochs": 2, "lr": 1e-3}}
    memory = _run(folder, job, "memory")
    streamed = _run(folder, {**job, "data": {**job["data"], "streaming": True, "chunk_rows": 37, "stream_sample": 64}},
                    "streamed")
    # the same 12 ids, though the stream came in chunks of 37 rows and was never read whole
    assert sorted(streamed["data"]["stream_coreset"]["ids"]) == sorted(memory["coreset"]["ids"])
    assert streamed["data"]["streamed"] and streamed["data"]["stream_coreset"]["n_seen"] == memory["data"]["n_forget"]
    assert [streamed["data"][f"n_{s}"] for s in ("forget", "retain", "heldout")] == \
        [memory["data"][f"n_{s}"] for s in ("forget", "retain", "heldout")]
    assert streamed["data"]["n_retain_sampled"] == 64  # the retain steps drew from a 64-row sample of the stream
    # the one-pass verification measures the original model exactly as the in-memory evaluation does
    for key in ("forget_acc", "retain_acc", "test_acc", "forget_loss"):
        assert streamed["metrics_before"][key] == pytest.approx(memory["metrics_before"][key], abs=1e-5)
    assert streamed["metrics_after"]["forget_loss"] > streamed["metrics_before"]["forget_loss"]
    assert (folder / "streamed" / "model.pt").is_file()


def test_datasets_stream_and_save_to_disk_are_sources_with_ids_from_the_id_column(mlp_job):
    import datasets

    folder, job, (ids, x, y, _), frame = mlp_job
    frame.to_parquet(folder / "samples.parquet")
    datasets.Dataset.from_pandas(frame).shuffle(seed=1).save_to_disk(str(folder / "saved"))
    (folder / "own_streams.py").write_text(STREAM_FACTORY)
    forget = ids[(y == 1)][:30].tolist()
    base = {**job, "data": {**job["data"], "forget": forget}, "selector": "el2n", "k": 8, "fraction": None,
            "runner": {"epochs": 1, "lr": 1e-3}}
    base["data"].pop("path")
    # a datasets streaming IterableDataset: streamed automatically (the factory returns a stream)
    streamed = _run(folder, {**base, "data": {**base["data"], "factory": "own_streams:parquet_stream",
                                              "factory_args": {"path": str(folder / "samples.parquet")}}}, "hfstream")
    # a real save_to_disk folder (shuffled: row order is not id order), in memory and streamed
    saved = _run(folder, {**base, "data": {**base["data"], "path": "saved"}}, "saved")
    saved_streamed = _run(folder, {**base, "data": {**base["data"], "path": "saved", "streaming": True}}, "saved_stream")
    # a map-style datasets.Dataset from a factory is read as a table
    loaded = _run(folder, {**base, "data": {**base["data"], "factory": "own_streams:saved",
                                            "factory_args": {"path": str(folder / "saved")}}}, "loaded")
    assert streamed["data"]["streamed"] and saved_streamed["data"]["streamed"] and "streamed" not in saved["data"]
    expected = sorted(saved["coreset"]["ids"])
    assert set(expected) <= set(forget) and len(expected) == 8
    for doc in (streamed, saved_streamed):
        assert sorted(doc["data"]["stream_coreset"]["ids"]) == expected and doc["data"]["n_forget"] == 30
    assert sorted(loaded["coreset"]["ids"]) == expected and sorted(loaded["data"]["forget_ids"]) == sorted(forget)
    # the rows come in the shuffled order save_to_disk wrote (select/shuffle applied), not the frame's
    assert loaded["data"]["forget_ids"] == saved["data"]["forget_ids"] != sorted(forget)


@pytest.mark.parametrize("change, error, message", [
    (lambda j: j.update(selector="k_center"), InvalidConfigError, r"selector: 'k_center' needs every forget sample"),
    (lambda j: j.update(k=None, fraction="auto"), InvalidConfigError, r"fraction: 'auto' grows the coreset"),
    (lambda j: j.update(strategy="retrain"), InvalidConfigError, r"strategy: 'retrain' retrains from scratch"),
    (lambda j: j["data"].update(path="samples.npz"), InvalidConfigError, r"data.streaming: a npz file is read whole"),
    (lambda j: j["data"].update(forget=[1000, 3]), InvalidDataError, r"data.forget: 1 id\(s\) are not in the data: \[3\]"),
    (lambda j: j["data"].update(streaming="yes"), InvalidConfigError, r"data.streaming: must be true or false"),
])
def test_streamed_jobs_refuse_what_needs_random_access_before_any_forward_pass(mlp_job, change, error, message, monkeypatch):
    folder, job, (ids, x, y, _), frame = mlp_job
    np.savez(folder / "samples.npz", sample_id=ids, x=x, label=y)
    job = {**job, "data": {**job["data"], "streaming": True}, "selector": "loss", "k": 5}
    change(job)
    import erasus_ray.jobs.stream_job as stream_job

    def no_forward(*args, **kwargs):
        raise AssertionError("a forward pass ran before the config was refused")

    monkeypatch.setattr(stream_job, "stream_top_k", no_forward)
    with pytest.raises(error, match=message):
        run_user_job(UserJobConfig.from_dict(job, folder), progress=False)


def test_the_refusal_guard_patches_the_scoring_pass_a_valid_job_reaches(mlp_job, monkeypatch):
    """Control for the test above: with a valid streamed job the patched scoring pass is reached (and raises)."""
    folder, job, _, _ = mlp_job
    import erasus_ray.jobs.stream_job as stream_job

    monkeypatch.setattr(stream_job, "stream_top_k", lambda *a, **k: (_ for _ in ()).throw(AssertionError("scored")))
    with pytest.raises(AssertionError, match="scored"):
        run_user_job(UserJobConfig.from_dict({**job, "data": {**job["data"], "streaming": True}, "selector": "loss",
                                              "k": 5}, folder), progress=False)


def test_reservoir_is_a_seeded_uniform_sample():
    counts = np.zeros(100)
    for seed in range(300):
        sample = Reservoir(10, seed)
        for i in range(100):
            sample.offer(i, None)
        counts[sample.ids] += 1
        assert len(set(sample.ids)) == 10
    assert counts.min() > 10 and counts.max() < 60  # each item kept ~30 times in 300 draws of 10 of 100
    again = Reservoir(10, 7)
    first = Reservoir(10, 7)
    for i in range(100):
        again.offer(i, None)
        first.offer(i, None)
    assert again.ids == first.ids
