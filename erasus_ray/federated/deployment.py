"""Start a local Flower deployment - one ``flower-superlink`` and N ``flower-supernode`` processes on 127.0.0.1 -
and submit the deletion app with ``flwr run``. Used by the end-to-end tests and by ``examples/federated``.

Every process is started by :class:`LocalDeployment` and ended by its PID (never by name). ``tls=True`` generates a
throw-away CA and server certificate with the ``cryptography`` package; ``auth=True`` turns on SuperNode
authentication (``--enable-supernode-auth``) with an EC key pair per SuperNode whose public key is registered at the
SuperLink with ``flwr supernode register`` before the node starts.

Environment: telemetry off, no runtime dependency installation, a private ``FLWR_HOME`` (its ``config.toml`` names
the SuperLink connection ``e2e``). Cost: ~60 s for a SuperLink, 3 SuperNodes and one short run on the 2-core machines.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from erasus_ray.federated.simulation import flower_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else (shutil.which(name) or name)


def make_tls(folder: Path) -> dict[str, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost (PEM files in ``folder``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    folder.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "erasus-ray test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    )
    return paths


def make_node_keys(folder: Path, name: str) -> dict[str, Path]:
    """An EC (SECP384R1) key pair for SuperNode authentication, both in OpenSSH format (what flower-supernode loads)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = folder / f"{name}", folder / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return {"private": priv, "public": pub}


class LocalDeployment:
    """A SuperLink and SuperNodes on 127.0.0.1, each a child process ended by PID in :meth:`stop`."""

    def __init__(self, workdir: str | os.PathLike, *, tls: bool = False, auth: bool = False, extra_env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tls = make_tls(self.workdir / "tls") if tls else None
        self.auth = auth
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = flower_env(flwr_home=str(self.workdir / "flwr-home"))
        self.env.update(extra_env or {})
        Path(self.env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
        conn = [f'[superlink]\ndefault = "e2e"\n\n[superlink.e2e]\naddress = "{self.address}"\n']
        conn.append(f'root-certificates = "{self.tls["ca"]}"\n' if self.tls else "insecure = true\n")
        (Path(self.env["FLWR_HOME"]) / "config.toml").write_text("".join(conn))
        self.procs: dict[str, subprocess.Popen] = {}

    def _tls_or_insecure(self, server: bool) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        if server:
            return ["--ssl-ca-certfile", str(self.tls["ca"]), "--ssl-certfile", str(self.tls["cert"]), "--ssl-keyfile", str(self.tls["key"])]
        return ["--root-certificates", str(self.tls["ca"])]

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_superlink(self) -> None:
        cmd = [_bin("flower-superlink"), *self._tls_or_insecure(True), "--host", "127.0.0.1", "--port", str(self.port),
               "--database", str(self.workdir / "superlink.db"), "--disable-runtime-dependency-installation"]
        if self.auth:
            cmd.append("--enable-supernode-auth")
        self._start("superlink", cmd)
        self.wait_port(self.port)

    def register_node(self, keys: dict[str, Path]) -> subprocess.CompletedProcess:
        """``flwr supernode register <public key> e2e``: allow this key to connect (auth mode)."""
        return subprocess.run([_bin("flwr"), "supernode", "register", str(keys["public"]), "e2e"], env=self.env,
                              cwd=self.workdir, capture_output=True, text=True, timeout=120)

    def start_supernode(self, partition_id: int, n: int, *, outbox: str, keys: dict[str, Path] | None = None, name: str | None = None) -> subprocess.Popen:
        name = name or f"supernode-{partition_id}"
        cmd = [_bin("flower-supernode"), *self._tls_or_insecure(False), "--superlink", self.address,
               "--port", str(free_port()), "--node-config", f'partition-id={partition_id} num-partitions={n} outbox="{outbox}"']
        if keys is not None:
            cmd += ["--auth-supernode-private-key", str(keys["private"]), "--auth-supernode-public-key", str(keys["public"])]
        return self._start(name, cmd)

    def run_app(self, app_dir: str | os.PathLike, run_config: dict[str, Any], timeout: float = 600) -> subprocess.CompletedProcess:
        """``flwr run <app_dir> e2e --stream`` with run-config overrides; returns when the run ends."""
        overrides = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        cmd = [_bin("flwr"), "run", str(app_dir), "e2e", "--stream", "--run-config", overrides]
        return subprocess.run(cmd, env=self.env, cwd=self.workdir, capture_output=True, text=True, timeout=timeout)

    def start_run(self, app_dir: str | os.PathLike, run_config: dict[str, Any]) -> subprocess.Popen:
        """Like :meth:`run_app` but returns at once (output in ``flwr-run.log``): for tests that act mid-run."""
        overrides = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        return self._start("flwr-run", [_bin("flwr"), "run", str(app_dir), "e2e", "--stream", "--run-config", overrides])

    def wait_for_log(self, name: str, text: str, timeout: float = 900.0) -> None:
        """Block until ``text`` appears in process ``name``'s log."""
        path = self.workdir / f"{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and text in path.read_text(errors="replace"):
                return
            time.sleep(0.5)
        raise TimeoutError(f"{text!r} did not appear in {path} within {timeout} s")

    def wait_port(self, port: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s; see {self.workdir}/superlink.log")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, sig)  # its own session: the node and the ClientApp processes it spawned
            proc.wait(timeout=30)

    def stop(self) -> None:
        for name in list(self.procs):
            try:
                self.kill(name, signal.SIGTERM)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.kill(name, signal.SIGKILL)

    def __enter__(self) -> "LocalDeployment":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
