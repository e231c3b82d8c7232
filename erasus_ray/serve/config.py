"""The deletion service's configuration (``erasus-ray serve --config serve.yaml``): one dataclass whose fields are
the YAML keys, checked by :meth:`ServeConfig.validate` before anything starts (each error names the key).

Cost: nothing heavy; the model and data are built by :class:`~erasus_ray.serve.service.DeletionService`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erasus_ray.config_files import config_from_mapping, load_config
from erasus_ray.errors import InvalidConfigError

#: bundled benchmarks the service can serve today: classifiers (``/predict``) and the causal-LM ``authors``
#: (``/generate``; ``scenario: forget10``, ``benchmark_options: {variant: ci}`` for the small model)
SERVABLE_BENCHMARKS = ("wine", "iris", "breast_cancer", "digits", "authors")
#: never 8000 (Flower's SuperLink) nor 8265 (Ray's dashboard)
DEFAULT_PORT = 8321
#: what the worker does with a batch too small for its verification to detect anything (see ``on_low_power``)
LOW_POWER_POLICIES = ("accept", "batch", "fail")


@dataclass
class ServeConfig:
    """Settings of the deletion service.

    Attributes:
        benchmark, scenario, seed, benchmark_options: the bundled model and data served (``load_benchmark(benchmark,
            scenario, seed, **benchmark_options)``); its original model is version 0. Default: ``digits`` (the 8x8
            handwritten digits MLP, 1437 train / 360 test), as issue 18 asks; it starts as fast as the smaller
            ``wine`` (measured in a fresh process on the loaded 2-core machine: ``load_benchmark`` 9.4 s vs 8.9 s, the
            cached model and the imports dominate) and its 360 held-out samples give the verification more power.
        state_dir: folder of the published model versions (``versions.json`` + ``v<N>.pt``).
        ledger: the ledger's SQLAlchemy URL or SQLite path (default ``<state_dir>/ledger.db``): the only queue.
        clients: the train ids are split round-robin among ``client-0`` ... ``client-<clients-1>`` (the ownership
            registry); a real deployment would load its own partition.
        operators: ids with the operator role (class deletion, rollback, every request visible).
        host, port: where Serve's HTTP proxy listens (127.0.0.1 and 8321 by default).
        batch_size: most requests one unlearning round takes from the ledger.
        poll_s: how often the worker looks for validated requests.
        max_ids, max_requests_per_minute: the ledger's request limits (:class:`~erasus_ray.ledger.RequestLimits`).
        unlearner: keyword arguments of :class:`~erasus_ray.ErasusUnlearner` (``strategy``, ``selector``,
            ``budget_steps``, ...); ``progress`` is always off.
        max_detectable_auc: the verification must be able to detect a membership AUC this far from 0.5 at the size
            of the batch (the target's :meth:`~erasus_ray.evaluation.verification.Target.power`); a smaller batch has
            low power: on 3-12 ids the held-out test already passes on the original model. None: no check.
        on_low_power: ``accept`` (run and verify; the record says "indistinguishable at n=..., detectable AUC >=
            ..."), ``batch`` (leave the requests validated, noting the power on each, until the pending requests
            together reach the power or the oldest has waited ``low_power_wait_s``; then verify on the union, the
            record saying its power) or ``fail`` (end them ``failed`` with that statement; never unlearned).
        low_power_wait_s: how long ``batch`` holds a low-power batch for more requests.
        scoring_pool: :class:`~erasus_ray.distributed.PoolSpec` fields of the worker's warm scoring pool (its actors
            start on the first round that scores a coreset under Ray and stay alive for the next rounds); None: score
            in the worker's process. Small by default: the Serve proxy and replicas share the machine.
        ssl_keyfile, ssl_certfile: PEM files: serve HTTPS (Ray Serve's proxy and the standalone uvicorn server);
            both or neither.
    """

    benchmark: str = "digits"
    scenario: str = "class"
    seed: int = 0
    benchmark_options: dict[str, Any] = field(default_factory=dict)
    state_dir: str = "serve-state"
    ledger: str | None = None
    clients: int = 4
    operators: list[str] = field(default_factory=lambda: ["operator"])
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    batch_size: int = 16
    poll_s: float = 1.0
    max_ids: int = 10_000
    max_requests_per_minute: int | None = 60
    unlearner: dict[str, Any] = field(default_factory=dict)
    max_detectable_auc: float | None = 0.8
    on_low_power: str = "accept"
    low_power_wait_s: float = 300.0
    scoring_pool: dict[str, Any] | None = field(default_factory=lambda: {"num_actors": 1, "num_cpus": 0.5})
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None

    def validate(self) -> None:
        if self.benchmark not in SERVABLE_BENCHMARKS:
            raise InvalidConfigError(f"benchmark must be one of {list(SERVABLE_BENCHMARKS)}, got {self.benchmark!r}")
        _positive_int("clients", self.clients)
        _positive_int("batch_size", self.batch_size)
        _positive_int("max_ids", self.max_ids)
        if self.max_requests_per_minute is not None:
            _positive_int("max_requests_per_minute", self.max_requests_per_minute)
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 1 <= self.port <= 65535:
            raise InvalidConfigError(f"port must be an integer in 1..65535, got {self.port!r}")
        if not isinstance(self.poll_s, (int, float)) or isinstance(self.poll_s, bool) or not self.poll_s > 0:
            raise InvalidConfigError(f"poll_s must be a positive number of seconds, got {self.poll_s!r}")
        if not isinstance(self.operators, list) or not self.operators or not all(isinstance(o, str) for o in self.operators):
            raise InvalidConfigError(f"operators must be a non-empty list of ids, got {self.operators!r}")
        if not isinstance(self.benchmark_options, dict):
            raise InvalidConfigError(f"benchmark_options must be a mapping of load_benchmark keywords, got {type(self.benchmark_options).__name__}")
        if not isinstance(self.unlearner, dict):
            raise InvalidConfigError(f"unlearner must be a mapping of ErasusUnlearner keywords, got {type(self.unlearner).__name__}")
        if not isinstance(self.state_dir, str) or not self.state_dir:
            raise InvalidConfigError(f"state_dir must be a folder path, got {self.state_dir!r}")
        if self.scoring_pool is not None:
            from erasus_ray.distributed import PoolSpec

            if not isinstance(self.scoring_pool, dict):
                raise InvalidConfigError(f"scoring_pool must be a mapping of PoolSpec fields or null, got {self.scoring_pool!r}")
            try:
                PoolSpec(**self.scoring_pool)
            except TypeError as err:
                raise InvalidConfigError(f"scoring_pool: {err}") from None
        self._validate_power()
        self._validate_tls()

    def _validate_power(self) -> None:
        auc = self.max_detectable_auc
        if auc is not None and (not _number(auc) or not 0.5 < auc <= 1.0):
            raise InvalidConfigError(f"max_detectable_auc must be a number in (0.5, 1] or null, got {auc!r}")
        if self.on_low_power not in LOW_POWER_POLICIES:
            raise InvalidConfigError(f"on_low_power must be one of {list(LOW_POWER_POLICIES)}, got {self.on_low_power!r}")
        if not _number(self.low_power_wait_s) or self.low_power_wait_s < 0:
            raise InvalidConfigError(f"low_power_wait_s must be a number of seconds >= 0, got {self.low_power_wait_s!r}")

    def _validate_tls(self) -> None:
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise InvalidConfigError("ssl_keyfile and ssl_certfile go together: give both (HTTPS) or neither (HTTP)")
        for name in ("ssl_keyfile", "ssl_certfile"):
            path = getattr(self, name)
            if path is not None and not (isinstance(path, str) and Path(path).is_file()):
                raise InvalidConfigError(f"{name} must be an existing PEM file, got {path!r}")

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def ledger_url(self) -> str:
        return self.ledger if self.ledger else str(Path(self.state_dir) / "ledger.db")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, data: Any) -> "ServeConfig":
        return config_from_mapping(cls, data, "serve config")

    @classmethod
    def load(cls, path: str | Path) -> "ServeConfig":
        return load_config(cls, path, "serve config")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidConfigError(f"{name} must be a positive integer, got {value!r}")
