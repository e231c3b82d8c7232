"""`ray job submit` against a real local head (127.0.0.1), ended by PID - never `ray stop`."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_runs_unlearn_config(tmp_path):
    pytest.importorskip("ray")
    import tempfile

    port, dash = _free_port(), _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "HF_HUB_OFFLINE": "1",
           "RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "180"}  # loaded 2-core CI machines
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--num-cpus=2", f"--temp-dir={ray_tmp}", "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        out = tmp_path / "results"
        deadline = time.time() + 300
        while True:  # wait until the job server answers (its port opens before its modules are ready)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/jobs/", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (OSError, http.client.HTTPException):
                pass
            if time.time() > deadline or head.poll() is not None:
                raise RuntimeError("the Ray head's job server did not come up")
            time.sleep(2)
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dash}", f"--working-dir={ROOT}", "--",
             str(BIN / "erasus-ray"), "unlearn", "--config", "examples/configs/digits_class.yaml", "--out", str(out), "--no-progress"],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        doc = json.loads((out / "results.json").read_text())
        assert doc["config"]["strategy"] == "grad_diff" and doc["metrics"]["forget_acc"] <= 0.05
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)  # the head and everything it started, by PID
            head.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
