"""Every output file is written atomically: a writer killed at any point leaves the old file or the new one, whole.

Two kinds of test: SIGKILL a forked writer at random points of a loop of large writes (bounded trials, a fixed seed),
and, per writer, an interrupted write (fsync fails before publication) that must leave the old file untouched.
"""

import json
import multiprocessing
import os
import random
import select
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from erasus_ray.runners import RunReport
from erasus_ray.selectors import Coreset
from erasus_ray.unlearner import UnlearningResult
from erasus_ray.utils import atomic, model_hash

_FORK = multiprocessing.get_context("fork")


def _result(width: int, fill: float, note_mb: int = 0) -> UnlearningResult:
    """A result whose model is filled with ``fill``; ``note_mb`` of config text make its JSON large to write (and
    cheap to encode, so a random kill mostly lands in the write)."""
    model = nn.Linear(width, width)
    with torch.no_grad():
        model.weight.fill_(fill)
        model.bias.fill_(fill)
    ids = np.arange(10, dtype=np.int64)
    return UnlearningResult(model=model, coreset=Coreset(ids=ids, weights=np.ones(10)), timings={"total": fill},
                            config={"fill": fill, "note": str(fill) * (note_mb << 20)}, report=RunReport(),
                            model_hash_after=model_hash(model))


def _write_forever(write_version, ready_fd: int) -> None:
    """The forked writer: alternate versions 0 and 1 forever; say 'ready' after each of the first two complete
    writes (the parent times one whole write from them)."""
    version = 0
    for _ in range(2):
        write_version(version)
        os.write(ready_fd, b"r")
        version = 1 - version
    while True:
        write_version(version)
        version = 1 - version


def _kill_at_random_points(folder: Path, write_version, check, trials: int, window_s: float, seed: int) -> int:
    """Fork a writer ``trials`` times, SIGKILL it a random time after its second whole write (uniform over
    ``window_s`` or over one whole write as timed between its first two, whichever is longer: on a loaded machine a
    write can take longer than ``window_s``, and kills inside a fixed window would all land before the file is
    opened), run ``check`` on what is left. Returns how many kills landed during a write (a temp file was left
    behind). While none has, up to ``3 * trials`` more trials run."""
    rng = random.Random(seed)
    mid_write = 0
    done = 0
    while done < trials or (mid_write == 0 and done < 4 * trials):
        done += 1
        read_fd, write_fd = os.pipe()
        proc = _FORK.Process(target=_write_forever, args=(write_version, write_fd), daemon=True)
        proc.start()
        os.close(write_fd)
        try:
            ready, _, _ = select.select([read_fd], [], [], 120)
            assert ready and os.read(read_fd, 1) == b"r", "the writer never finished its first write"
            start = time.monotonic()
            ready, _, _ = select.select([read_fd], [], [], 120)
            assert ready and os.read(read_fd, 1) == b"r", "the writer never finished its second write"
            one_write = time.monotonic() - start  # sizes the window only: nothing is asserted on time
            select.select([], [], [], rng.uniform(0, max(window_s, one_write)))  # sleep
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            os.close(read_fd)
        leftovers = list(folder.glob(".*.tmp"))
        mid_write += bool(leftovers)
        check()
        for tmp in leftovers:
            tmp.unlink()
    return mid_write


def test_sigkill_during_large_writes_leaves_the_old_or_the_new_file_whole(tmp_path):
    versions = [b"A" * (24 << 20), b"B" * (24 << 20)]
    target = tmp_path / "blob.bin"

    def write_version(v: int) -> None:
        with atomic.atomic_open(target, "wb") as fh:
            for start in range(0, len(versions[v]), 1 << 20):  # chunked, as real writers write
                fh.write(versions[v][start:start + (1 << 20)])

    def check() -> None:
        assert target.read_bytes() in versions, "a killed write left a truncated or mixed file"

    mid_write = _kill_at_random_points(tmp_path, write_version, check, trials=10, window_s=0.3, seed=0)
    assert mid_write >= 1, "no kill landed during a write: the test proved nothing"


def test_sigkill_during_results_json_leaves_valid_json(tmp_path):
    results = [_result(4, 0.0, note_mb=8), _result(4, 1.0, note_mb=8)]
    texts = [r.to_json() for r in results]
    target = tmp_path / "results.json"

    def check() -> None:
        assert target.read_text() in texts, "a killed to_json left a truncated results file"

    mid_write = _kill_at_random_points(tmp_path, lambda v: results[v].to_json(target), check, trials=8, window_s=0.3, seed=1)
    assert mid_write >= 1, "no kill landed during a write: the test proved nothing"


def test_sigkill_during_job_publish_never_leaves_results_without_their_model(tmp_path):
    results = [_result(1500, 0.0), _result(1500, 1.0)]  # 9 MB of weights each

    def check() -> None:
        state = torch.load(tmp_path / "model.pt", weights_only=True)  # always whole after the first publish
        doc_path = tmp_path / "results.json"
        if doc_path.exists():
            doc = json.loads(doc_path.read_text())
            model = nn.Linear(1500, 1500)
            model.load_state_dict(state)
            assert doc["model_hash_after"] == model_hash(model), "results.json describes a model not on disk"
            assert doc["model_file"] == "model.pt"

    mid_write = _kill_at_random_points(tmp_path, lambda v: results[v].save(tmp_path), check, trials=8, window_s=0.4, seed=2)
    assert mid_write >= 1, "no kill landed during a write: the test proved nothing"


@pytest.fixture
def interrupted_writes(monkeypatch):
    """Every atomic write fails just before publication (as a crash there would): the old file must survive."""
    def fail(_fd: int) -> None:
        raise OSError("simulated crash before the file is published")

    monkeypatch.setattr(atomic.os, "fsync", fail)


def _old(path: Path) -> bytes:
    path.write_bytes(b"old content")
    return path.read_bytes()


def test_interrupted_results_json_keeps_the_old_file(tmp_path, interrupted_writes):
    path = tmp_path / "results.json"
    old = _old(path)
    with pytest.raises(OSError, match="simulated"):
        _result(3, 0.5).to_json(path)
    assert path.read_bytes() == old
    assert not list(tmp_path.glob(".*.tmp")), "a failed write removes its temp file"


def test_interrupted_job_publish_leaves_no_results_for_a_missing_model(tmp_path, interrupted_writes):
    model_path, results_path = tmp_path / "model.pt", tmp_path / "results.json"
    old_model = _old(model_path)
    _old(results_path)
    with pytest.raises(OSError, match="simulated"):
        _result(3, 0.5).save(tmp_path)
    assert model_path.read_bytes() == old_model, "the old model stays whole"
    assert not results_path.exists(), "the old results no longer describe the model on disk, so they are gone"


@pytest.mark.parametrize("name", ["save_json", "plot_rows", "write_csv"])
def test_interrupted_report_files_keep_the_old_file(tmp_path, interrupted_writes, name):
    from erasus_ray.cli import report

    rows = [{"label": "a", "metrics": {"forget_acc": 0.5, "avg_gap": 0.1}, "timings": {"total": 1.0}}]
    path = tmp_path / {"save_json": "r.json", "plot_rows": "p.png", "write_csv": "r.csv"}[name]
    old = _old(path)
    call = {
        "save_json": lambda: report.save_json(rows, path),
        "plot_rows": lambda: report.plot_rows(rows, ["forget_acc"], path, "t"),
        "write_csv": lambda: report.write_csv([{"a": 1.0}], path),
    }[name]
    with pytest.raises(OSError, match="simulated"):
        call()
    assert path.read_bytes() == old


def test_interrupted_cache_of_a_trained_model_is_not_taken_for_a_complete_one(tmp_path, interrupted_writes):
    from erasus_ray.benchmarks.base import _train_cached
    from erasus_ray.data import as_id_dataset
    from erasus_ray.tasks import ClassificationTask
    from erasus_ray.training import TrainRecipe

    data = as_id_dataset(torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,))))
    path = tmp_path / "model.pt"
    with pytest.raises(OSError, match="simulated"):
        _train_cached(path, lambda: nn.Linear(3, 2), data, ClassificationTask(), TrainRecipe(epochs=1), "t")
    assert not path.exists() and not path.with_suffix(".json").exists()


def test_atomic_write_keeps_default_permissions_and_replaces(tmp_path):
    path = tmp_path / "f.txt"
    atomic.atomic_write_text(path, "one")
    atomic.atomic_write_text(path, "two")
    assert path.read_text() == "two"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
