"""`ray job submit` against a real local head (127.0.0.1), ended by PID - never `ray stop`."""

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_ray_head(num_cpus: int = 2):
    """A Ray head on 127.0.0.1 (free ports, private temp dir), yielding ``(gcs_address, dashboard_url, env)``; ended
    by PID afterwards - never ``ray stop``. ``env``: the environment to run ``ray``/``erasus-ray`` commands with."""
    import tempfile

    port, dash, agent = _free_port(), _free_port(), _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "HF_HUB_OFFLINE": "1",
           "RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "180"}  # loaded 2-core CI machines
    env.pop("RAY_ADDRESS", None)
    # Not --block: under --block any Ray subprocess that dies (e.g. the client server timing out on a loaded
    # machine) takes the whole head down. Every process of this head has our private temp dir on its command
    # line, which is how the test finds and ends them by PID afterwards.
    try:
        start = subprocess.run(
            [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", f"--ray-client-server-port={_free_port()}", f"--num-cpus={num_cpus}", f"--temp-dir={ray_tmp}",
             # The job agent's HTTP port defaults to 52365 for every Ray instance on the machine; the session's
             # in-process Ray (tests/conftest.py) already holds it, and an agent that cannot bind stays alive
             # without ever registering, so every submit answered "No available agent" (the old CI flake).
             f"--dashboard-agent-listen-port={agent}"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
        deadline = time.time() + 300
        # Wait until the job server answers (its port opens before its modules are ready) and the job agent,
        # which runs the submitted jobs, listens (it registers itself with the head right after binding).
        for url, what in ((f"http://127.0.0.1:{dash}/api/jobs/", "job server"), (f"http://127.0.0.1:{agent}/", "job agent")):
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=5) as resp:
                        resp.read()
                    break
                except urllib.error.HTTPError:  # the agent answers 404 on "/": it is up
                    if what == "job agent":
                        break
                except (OSError, http.client.HTTPException):
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"the Ray head's {what} did not come up ({url})")
                time.sleep(2)
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", env
    finally:
        _end_processes_mentioning(ray_tmp)


def ray_job_submit(dashboard, env, command, timeout=600, working_dir=ROOT):
    """``ray job submit --address=<dashboard> --working-dir=<working_dir> -- <command>`` (the repo by default). Ray's transient "No available
    agent to submit job, please try again later" reply (the agent's registration lagging its port) is retried for
    up to three minutes, then fails naming it; any other outcome is returned as is."""
    busy = "No available agent to submit job"
    deadline = time.time() + 180
    while True:
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", f"--address={dashboard}", f"--working-dir={working_dir}", "--", *command],
            env=env, capture_output=True, text=True, timeout=timeout,
        )
        if job.returncode == 0 or busy not in job.stdout + job.stderr:
            return job
        if time.time() > deadline:
            pytest.fail(f"the Ray head's job agent stayed unavailable for 3 minutes ({busy!r}): {job.stderr[-1000:]}")
        time.sleep(5)


@pytest.fixture(scope="module")
def ray_head():
    """One loopback head for this module's jobs (each job gets its own working dir and output folder): starting a
    head and waiting for its job agent costs 15-30 s on a loaded 2-core machine."""
    pytest.importorskip("ray")
    with local_ray_head() as (_, dashboard, env):
        yield dashboard, env


@pytest.mark.slow
def test_ray_job_submit_runs_unlearn_config(tmp_path, ray_head):
    dashboard, env = ray_head
    out = tmp_path / "results"
    job = ray_job_submit(dashboard, env, [str(BIN / "erasus-ray"), "unlearn", "--config", "examples/configs/digits_class.yaml",
                                          "--out", str(out), "--no-progress"])
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["strategy"] == "grad_diff" and doc["metrics"]["forget_acc"] <= 0.05


def _submit_example_folder(tmp_path: Path, name: str, head):
    """A copy of examples/<name> with its job's files written (tests/test_examples.py's ``example_job``), shipped
    with ``ray job submit --working-dir`` to a loopback head running ``erasus-ray unlearn --config job.yaml --out``;
    checks the job ran in Ray's copy of the folder and returns ``(folder, out, module)``."""
    from test_examples import example_job

    folder, module = example_job(tmp_path, name)
    out = tmp_path / "results"
    dashboard, env = head
    job = ray_job_submit(dashboard, env, [str(BIN / "erasus-ray"), "unlearn", "--config", "job.yaml", "--out", str(out),
                                          "--no-progress"], working_dir=folder)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert not (folder / "out").exists()  # the job ran in Ray's copy of the folder, not in ours
    return folder, out, module


@pytest.mark.slow
def test_ray_job_submit_runs_the_own_data_example_folder(tmp_path, ray_head):
    """examples/own_data (checkpoint, Parquet table and factory module written into a copy) shipped with
    ``--working-dir``: the job imports its factory from the shipped folder and writes to ``--out``, which forgot
    class 2 in the table's ids (the same checks as the local run in tests/test_examples.py)."""
    from test_examples import check_own_data_output

    folder, out, module = _submit_example_folder(tmp_path, "own_data", ray_head)
    check_own_data_output(folder, out, module)


@pytest.mark.slow
def test_ray_job_submit_runs_the_own_hf_example_folder(tmp_path, ray_head):
    """examples/own_hf (a save_pretrained BERT folder, a tokenizer folder and a save_to_disk dataset written into a
    copy) shipped with ``--working-dir``: ``--out`` holds a ``model/`` folder that reloads with ``from_pretrained``
    and forgot topic 2, and results in the dataset's ids (the same checks as the local run in tests/test_examples.py)."""
    from test_examples import check_own_hf_output

    folder, out, _ = _submit_example_folder(tmp_path, "own_hf", ray_head)
    check_own_hf_output(folder, out)


def _end_processes_mentioning(marker: str) -> None:
    """SIGTERM, then SIGKILL, every process whose command line contains ``marker`` (this test's Ray head)."""
    import psutil

    procs = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
