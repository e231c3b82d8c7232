"""The deletion service as a Ray Serve application: a FastAPI ingress deployment (:func:`~erasus_ray.serve.api.create_app`
built on each replica) and an unlearning-worker deployment (one replica, a Ray actor running :class:`WorkerLoop`).

Both rebuild their :class:`~erasus_ray.serve.service.DeletionService` from the same config, so they share only the
ledger (the queue) and the published versions' folder: the worker publishes, the ingress replicas notice the new
``versions.json`` on their next ``/predict``. On one machine that is a local folder and SQLite; on a cluster both must
be shared (a network folder, a PostgreSQL ledger).

Example:
    >>> from ray import serve
    >>> config = ServeConfig(state_dir="serve-state")
    >>> serve.start(http_options=http_options(config))
    >>> serve.run(build(config), name="erasus", route_prefix="/")

Cost: each replica loads the benchmark (cached model: seconds) and opens the ledger once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from erasus_ray.serve.config import ServeConfig

#: what each replica reserves: the bundled models are tiny, and a 2-CPU machine must fit the proxy, ingress and worker
REPLICA_CPUS = 0.5


def _config(config: ServeConfig | Mapping[str, Any]) -> dict[str, Any]:
    cfg = config if isinstance(config, ServeConfig) else ServeConfig.from_mapping(dict(config))
    cfg.validate()
    data = cfg.to_dict()
    # replicas do not share the driver's working directory: every path they open must be absolute
    data["state_dir"] = str(Path(cfg.state_dir).resolve())
    if cfg.ledger and "://" not in cfg.ledger:
        data["ledger"] = str(Path(cfg.ledger).resolve())
    return data


def http_options(config: ServeConfig) -> dict[str, Any]:
    """``serve.start(http_options=...)`` for ``config``: host, port and, with TLS configured, Ray Serve's proxy
    ``ssl_keyfile`` / ``ssl_certfile`` (absolute: the proxy actor does not share the driver's directory)."""
    options: dict[str, Any] = {"host": config.host, "port": config.port}
    if config.tls:
        options.update(ssl_keyfile=str(Path(config.ssl_keyfile).resolve()), ssl_certfile=str(Path(config.ssl_certfile).resolve()))
    return options


def build(config: ServeConfig | Mapping[str, Any]) -> Any:
    """The Serve application (``serve.run(build(config))``): the ingress bound to the worker deployment."""
    from ray import serve

    data = _config(config)

    def asgi_app() -> Any:  # evaluated on each ingress replica
        from erasus_ray.serve.api import create_app
        from erasus_ray.serve.service import DeletionService

        _one_thread()
        return create_app(DeletionService(ServeConfig(**data)))

    ingress = serve.deployment(name="deletions", ray_actor_options={"num_cpus": REPLICA_CPUS})(serve.ingress(asgi_app)())
    worker = serve.deployment(name="unlearning_worker", num_replicas=1, ray_actor_options={"num_cpus": REPLICA_CPUS})(WorkerDeployment)
    return ingress.bind(worker.bind(data))


def app_builder(args: dict[str, str]) -> Any:
    """The application for Ray's CLI (``serve run erasus_ray.serve.app:app_builder config=serve.yaml``, or a Serve
    config file's ``import_path``): ``args["config"]`` is the serve YAML (the embedded defaults when absent). Host, port
    and TLS of the proxy belong to the Serve config / ``serve start`` there, not to this YAML."""
    path = args.get("config")
    return build(ServeConfig.load(path) if path else ServeConfig())


class WorkerDeployment:
    """The unlearning worker inside a Serve replica: polls the ledger in a thread (:class:`WorkerLoop`)."""

    def __init__(self, data: dict[str, Any]) -> None:
        from erasus_ray.serve.service import DeletionService
        from erasus_ray.serve.worker import UnlearningWorker, WorkerLoop

        _one_thread()
        self.service = DeletionService(ServeConfig(**data))
        self.loop = WorkerLoop(UnlearningWorker(self.service), self.service.config.poll_s).start()

    def rounds(self) -> int:
        """Unlearning rounds that found work since the replica started."""
        return self.loop.rounds

    def pool_actors(self) -> list[str]:
        """Ids of the warm scoring pool's actors (empty before the first scored round): they stay the same across
        rounds while the pool is warm."""
        pool = self.loop.worker._pool
        return [] if pool is None else [h._actor_id.hex() for h in pool._handles]

    def __del__(self) -> None:
        self.loop.stop(timeout=5.0)


def _one_thread() -> None:
    import torch

    # tiny models: one intra-op thread is fastest and leaves the machine's other cores to the other replicas
    torch.set_num_threads(1)
