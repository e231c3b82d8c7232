"""The deletion service without Ray (``erasus-ray serve --standalone``): the FastAPI app under uvicorn and the
unlearning worker in a thread of the same process. For one machine, tests and TLS checks; Ray Serve
(:mod:`erasus_ray.serve.app`) adds replicas and a worker actor on a cluster. Both read the same config and files, so
either can serve a state folder the other wrote.

Example:
    >>> run_standalone(ServeConfig(state_dir="serve-state"))   # blocks; Ctrl-C stops

Cost: the service's start-up (loading the benchmark: seconds); no Ray start (~6-9 s saved).
"""

from __future__ import annotations

from typing import Any

from erasus_ray.serve.config import ServeConfig


def uvicorn_server(config: ServeConfig, service: Any = None) -> Any:
    """A ``uvicorn.Server`` for the app over ``service`` (built from ``config`` when None), on ``config.host`` /
    ``port``, HTTPS when ``config`` names ``ssl_keyfile`` / ``ssl_certfile``. ``server.run()`` blocks; a test runs it
    in a thread and sets ``server.should_exit``."""
    import uvicorn

    from erasus_ray.serve.api import create_app
    from erasus_ray.serve.service import DeletionService

    config.validate()
    app = create_app(service if service is not None else DeletionService(config))
    tls = {"ssl_keyfile": config.ssl_keyfile, "ssl_certfile": config.ssl_certfile} if config.tls else {}
    return uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", **tls))


def run_standalone(config: ServeConfig) -> None:
    """Serve ``config`` until interrupted: uvicorn in the foreground, :class:`WorkerLoop` in a daemon thread."""
    from erasus_ray.serve.service import DeletionService
    from erasus_ray.serve.worker import UnlearningWorker, WorkerLoop

    service = DeletionService(config)
    loop = WorkerLoop(UnlearningWorker(service), config.poll_s).start()
    try:
        uvicorn_server(config, service).run()
    finally:
        loop.stop(timeout=30.0)
        service.close()
