"""Run the deletion ServerApp and ClientApp with Flower's simulation runtime (Ray backend) in a subprocess.

Flower's simulation calls ``ray.shutdown()`` when it ends, which would tear down a Ray cluster the caller shares, so
:func:`run_simulation_subprocess` starts ``python -m erasus_ray.federated.simulation`` with the settings in a JSON
file and the Flower environment (telemetry off, no runtime dependency installation, a private ``FLWR_HOME``).

Cost on the 2-core project machines: ~30 s of Ray/Flower start-up plus the rounds.

Example:
    >>> result = run_simulation_subprocess({"n-clients": 10, "rounds": 5}, state_dir="fl-state", outbox="outbox")
    >>> result.returncode, DeletionLedger("sqlite:///fl-state/ledger.db").counts()
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping


def flower_env(base: Mapping[str, str] | None = None, flwr_home: str | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    # The SuperLink / SuperNode spawn flower-superexec, flwr-serverapp and flwr-clientapp by name: this venv first.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env.update(
        {
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_HOME": flwr_home or env.get("FLWR_HOME") or tempfile.mkdtemp(prefix="flwr-home-"),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_AUTH_MODE": "disabled",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    return env


def run_simulation_subprocess(
    config: Mapping[str, Any], *, state_dir: str | os.PathLike, outbox: str | os.PathLike, timeout: float = 900, num_cpus: int = 2
) -> subprocess.CompletedProcess:
    """Run one simulation (``n-clients`` virtual SuperNodes) to completion; returns the finished process."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = state_dir / "sim-config.json"
    # simulated SuperNodes have no registered keys: nothing to bind, so node-auth is off unless the caller says otherwise
    cfg_path.write_text(json.dumps({"node-auth": False, **dict(config), "state-dir": str(state_dir)}))
    env = flower_env()
    env.update({"ERASUS_FL_CONFIG": str(cfg_path), "ERASUS_FL_OUTBOX": str(outbox), "ERASUS_FL_STATE": str(state_dir)})
    cmd = [sys.executable, "-m", "erasus_ray.federated.simulation", "--config", str(cfg_path), "--num-cpus", str(num_cpus)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def ray_init_args(num_cpus: int) -> dict[str, Any]:
    """The ``ray.init`` arguments of a simulation: ``address="local"``, always a Ray instance of its own. Without it
    Ray joins the cluster named in ``/tmp/ray/ray_current_cluster`` (written by ``ray start --head`` with the default
    temp dir and by ``ray.cluster_utils.Cluster``) and then refuses Flower's ``num_cpus`` ("When connecting to an
    existing cluster, num_cpus and num_gpus must not be provided"): seen when a test's ``Cluster`` was up beside a
    simulation."""
    return {"address": "local", "num_cpus": int(num_cpus), "include_dashboard": False, "log_to_driver": True,
            "object_store_memory": 256 * 1024**2}


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="federated deletion under Flower's simulation runtime")
    parser.add_argument("--config", required=True)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args(argv)
    cfg = json.loads(Path(args.config).read_text())
    if "node-auth" not in cfg and "node_auth" not in cfg:  # simulated nodes are not authenticated: nothing to bind
        fd, merged = tempfile.mkstemp(prefix="erasus-fl-sim-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump({**cfg, "node-auth": False}, fh)
        args.config = merged
    os.environ["ERASUS_FL_CONFIG"] = args.config
    import torch

    torch.set_num_threads(1)
    from flwr.simulation import run_simulation

    from erasus_ray.federated.client_app import app as client_app
    from erasus_ray.federated.server_app import app as server_app

    n = int(json.loads(Path(args.config).read_text()).get("n-clients", 10))
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=n,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": ray_init_args(args.num_cpus)},
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main())
