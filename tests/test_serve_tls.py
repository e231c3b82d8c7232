"""TLS through the serve config: the standalone server (uvicorn, no Ray) on 127.0.0.1 with a self-signed certificate
made here; Ray Serve's proxy gets the same files through :func:`erasus_ray.serve.app.http_options`."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from erasus_ray.errors import InvalidConfigError
from erasus_ray.serve import DeletionService, ServeConfig


def _self_signed(folder):
    """A key and a certificate for 127.0.0.1 (its IP in the SAN, as TLS clients check), valid for a day."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    keyfile, certfile = folder / "key.pem", folder / "cert.pem"
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(keyfile), str(certfile)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tls_files_go_together_and_must_exist(tmp_path):
    keyfile, certfile = _self_signed(tmp_path)
    with pytest.raises(InvalidConfigError, match="ssl_keyfile and ssl_certfile go together"):
        ServeConfig(ssl_certfile=certfile).validate()
    with pytest.raises(InvalidConfigError, match="ssl_keyfile must be an existing PEM file"):
        ServeConfig(ssl_keyfile=str(tmp_path / "nope.pem"), ssl_certfile=certfile).validate()
    config = ServeConfig(ssl_keyfile=keyfile, ssl_certfile=certfile)
    config.validate()
    assert config.url == "https://127.0.0.1:8321" and ServeConfig().url == "http://127.0.0.1:8321"
    from erasus_ray.serve.app import http_options

    assert http_options(config) == {"host": "127.0.0.1", "port": 8321, "ssl_keyfile": keyfile, "ssl_certfile": certfile}
    assert "ssl_keyfile" not in http_options(ServeConfig())
    assert ServeConfig().port not in (8000, 8265)  # Flower's SuperLink, Ray's dashboard


def test_standalone_server_serves_https_with_the_configured_certificate(tmp_path):
    from erasus_ray.benchmarks import load_benchmark
    from erasus_ray.serve.standalone import uvicorn_server

    keyfile, certfile = _self_signed(tmp_path)
    config = ServeConfig(benchmark="wine", state_dir=str(tmp_path / "state"), port=_free_port(), ssl_keyfile=keyfile, ssl_certfile=certfile)
    service = DeletionService(config, benchmark=load_benchmark("wine", scenario="class", seed=0))
    key = service.keys.add("client-0")
    server = uvicorn_server(config, service)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):  # bounded wait for the listening socket (no timed assertion)
            if server.started:
                break
            time.sleep(0.05)
        assert server.started
        with httpx.Client(base_url=config.url, verify=ssl.create_default_context(cafile=certfile), timeout=10.0) as https:
            r = https.get("/v1/model", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200 and r.json()["model_version"] == 0
            assert https.get("/v1/model").status_code == 401
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port gets no answer
            httpx.get(f"http://127.0.0.1:{config.port}/v1/model", timeout=1.0)
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate refuses it
            httpx.get(f"{config.url}/v1/model", timeout=5.0)
    finally:
        server.should_exit = True
        thread.join(10)
        service.close()
