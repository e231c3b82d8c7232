"""A job on the user's own model and data: the ``model:`` / ``data:`` / ``output:`` YAML of ``erasus-ray unlearn
--config`` (the benchmark jobs of :mod:`erasus_ray.experiment` have ``benchmark:`` instead).

Example (paths relative to the YAML file's folder)::

    model: {path: mlp.pt, factory: "mymodels:make_mlp", factory_args: {width: 64}}
    data:
      path: samples.csv            # or .parquet / .jsonl / .npz / a save_to_disk folder, or factory:
      id_column: sample_id         # stable ids: results speak in them
      label_column: label
      forget: {class: 2}           # or [ids], {id_file: f.txt}, {where: "age > 60 and site == 'b'"}
      heldout: {where: "split == 'test'"}   # optional; retain: the rest (default)
      streaming: false             # true: read in chunks, never whole (see erasus_ray.jobs.stream_job)
      stream_rounds: 3             # streamed: closed-loop rounds judged on the whole forget stream (0: none)
    strategy: grad_diff
    output: runs/forget-class-2    # the unlearned model (input format), results.json, metrics.png

Every key is checked before any data is read or model built (:meth:`UserJobConfig.validate`): an unknown key (with
the closest known one), a missing file, a factory that does not import, a malformed forget selection, a strategy or
selector refusing its parameters - each an :class:`InvalidConfigError` naming the key and the file. Data-dependent
checks (a non-unique id column, forget ids absent from the data) follow when the table is read, still before any
forward pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erasus_ray.checks import check_int, check_known_keys, check_real, check_seed
from erasus_ray.config_files import field_names, load_yaml_mapping
from erasus_ray.errors import InvalidConfigError
from erasus_ray.jobs._imports import load_callable
from erasus_ray.jobs.rows import SELECTION_KEYS
from erasus_ray.jobs.tables import source_kind

MODEL_KEYS = ("path", "factory", "factory_args", "tokenizer")
DATA_KEYS = ("path", "split", "factory", "factory_args", "id_column", "label_column", "features", "text_column",
             "target_column", "forget", "retain", "heldout", "streaming", "chunk_rows", "stream_sample",
             "stream_rounds")
#: selector name -> (score, order) of :func:`~erasus_ray.jobs.streaming.stream_top_k`; ``default`` is ``loss``
STREAM_SELECTORS: dict[str, tuple[str, str]] = {"loss": ("loss", "high"), "el2n": ("el2n", "high"),
                                                 "default": ("loss", "high")}
#: strategies that train from (a fresh model on) the whole retain set: a sample of it would silently change them
WHOLE_RETAIN_STRATEGIES = {"retrain": "retrains from scratch on the whole retain set",
                           "sisa": "retrains the affected shards on their whole retain data"}
#: top-level keys that mark a YAML as a job on the user's own model and data
OWN_DATA_KEYS = ("model", "data")


@dataclass
class UserJobConfig:
    """A job on a user's model and data. ``model`` / ``data``: see the module docstring; the other keys mean what
    they mean in a benchmark job and in :class:`~erasus_ray.ErasusUnlearner` (``runner:`` and ``execution:`` are the
    fields of :class:`~erasus_ray.runners.RunnerConfig` / :class:`~erasus_ray.settings.ExecutionConfig`)."""

    model: dict[str, Any] | str = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    task: str = "auto"
    strategy: str = "grad_diff"
    strategy_params: dict[str, Any] = field(default_factory=dict)
    selector: str | None = "default"
    selector_params: dict[str, Any] = field(default_factory=dict)
    fraction: float | str | None = "auto"
    k: int | None = None
    target: str | dict[str, Any] = "auto"
    seed: int = 0
    runner: dict[str, Any] = field(default_factory=dict)
    execution: dict[str, Any] = field(default_factory=dict)
    output: str | None = None
    #: the folder relative paths are read from (the YAML's folder); not a key
    _base_dir: Path = field(default=Path("."), repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: str | Path = ".") -> "UserJobConfig":
        """Check the keys, build, :meth:`validate`; relative paths are resolved against ``base_dir``."""
        if not isinstance(data, dict):
            raise InvalidConfigError(f"a job config must be a mapping, got {type(data).__name__}")
        check_known_keys("job config", data, field_names(cls))
        cfg = cls(**data)
        cfg._base_dir = Path(base_dir)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> "UserJobConfig":
        """Load a job YAML; every error names the file (see :mod:`erasus_ray.config_files`)."""
        return from_mapping(load_yaml_mapping(path, "config"), path)

    def validate(self) -> None:
        """Every key's type, the files and factories named, the selections' form, and that the strategy, selector
        and settings accept their parameters; each failure an :class:`InvalidConfigError` naming the key."""
        if isinstance(self.model, str):
            self.model = {"path": self.model}
        for key in ("model", "data", "strategy_params", "selector_params", "runner", "execution"):
            if not isinstance(getattr(self, key), dict):
                raise InvalidConfigError(f"{key}: must be a mapping, got {getattr(self, key)!r}")
        self._check_model()
        self._check_data()
        check_seed("seed", self.seed)
        if self.k is not None:
            check_int("k", self.k, low=1)
        if self.fraction != "auto":
            check_real("fraction", self.fraction, low=0.0, high=1.0, low_open=True, none_ok=True)
        if self.output is not None and not isinstance(self.output, str):
            raise InvalidConfigError(f"output: must be a folder path, got {self.output!r}")
        from erasus_ray.experiment import JOB_OWNED_RUNNER_KEYS, _build
        from erasus_ray.selectors import get_selector
        from erasus_ray.settings import section_settings
        from erasus_ray.strategies import get_strategy

        _build("strategy_params", get_strategy, self.strategy, self.strategy_params)
        if self.selector not in (None, "default"):
            _build("selector_params", get_selector, self.selector, self.selector_params)
        section_settings("runner", self.runner, exclude=JOB_OWNED_RUNNER_KEYS,
                         hint=" (seed is the job's top-level seed; progress is the CLI's --no-progress)")
        section_settings("execution", self.execution)
        if self.data.get("streaming"):
            check_streamable(self, self.selector, self.k)

    def path(self, value: Any) -> Path:
        """``value`` (a config path) resolved against the YAML's folder."""
        return self._base_dir / str(value)

    def _check_model(self) -> None:
        check_known_keys("model", self.model, MODEL_KEYS)
        if self.model.get("path") is None and self.model.get("factory") is None:
            raise InvalidConfigError("model: give path (a Hugging Face folder or a checkpoint) and/or factory")
        if self.model.get("path") is not None and not self.path(self.model["path"]).exists():
            raise InvalidConfigError(f"model.path: {self.path(self.model['path'])} does not exist")
        if self.model.get("factory") is not None:
            load_callable(self.model["factory"], "model.factory", self._base_dir)
        if not isinstance(self.model.get("factory_args", {}), dict):
            raise InvalidConfigError(f"model.factory_args: must be a mapping, got {self.model['factory_args']!r}")

    def _check_data(self) -> None:
        data = self.data
        check_known_keys("data", data, DATA_KEYS)
        if (data.get("path") is None) == (data.get("factory") is None):
            raise InvalidConfigError("data: give exactly one of path (a file or save_to_disk folder) and factory")
        if data.get("path") is not None:
            where = self.path(data["path"])
            if not where.exists():
                raise InvalidConfigError(f"data.path: {where} does not exist")
            source_kind(where)
        else:
            load_callable(data["factory"], "data.factory", self._base_dir)
        if not isinstance(data.get("id_column"), str):
            raise InvalidConfigError("data.id_column: required - the column of stable sample ids (integers) that "
                                     "forget requests, coresets and results name samples by")
        for key in ("label_column", "text_column", "target_column", "split"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise InvalidConfigError(f"data.{key}: must be a column name, got {data[key]!r}")
        if data.get("streaming") is not None and not isinstance(data["streaming"], bool):
            raise InvalidConfigError(f"data.streaming: must be true or false, got {data['streaming']!r}")
        for key, low in (("chunk_rows", 1), ("stream_sample", 1), ("stream_rounds", 0)):
            if data.get(key) is not None:
                check_int(f"data.{key}", data[key], low=low)
        features = data.get("features")
        if features is not None and not (isinstance(features, list) and all(isinstance(f, str) for f in features)):
            raise InvalidConfigError(f"data.features: must be a list of column names, got {features!r}")
        if data.get("forget") is None:
            raise InvalidConfigError(f"data.forget: required - a list of ids or one of {list(SELECTION_KEYS)}")
        for key in ("forget", "heldout", "retain"):
            spec = data.get(key)
            if key == "retain" and spec in (None, "rest"):
                continue
            if spec is not None and not isinstance(spec, list):
                if not isinstance(spec, dict) or len(spec) != 1:
                    raise InvalidConfigError(f"data.{key}: give one of {list(SELECTION_KEYS)} or a list of ids, got {spec!r}")
                check_known_keys(f"data.{key}", spec, SELECTION_KEYS)
                if "id_file" in spec and not self.path(spec["id_file"]).is_file():
                    raise InvalidConfigError(f"data.{key}.id_file: {self.path(spec['id_file'])} does not exist")
                if "class" in spec and data.get("label_column") is None:
                    raise InvalidConfigError(f"data.{key}.class: needs data.label_column")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("_")}


def check_streamable(cfg: "UserJobConfig", selector: str | None, k: int | None) -> tuple[str, str]:
    """The (score, order) a streamed job ranks its forget rows by; an :class:`InvalidConfigError` naming the key
    where the job needs random access instead."""
    if cfg.strategy in WHOLE_RETAIN_STRATEGIES:
        raise InvalidConfigError(f"strategy: {cfg.strategy!r} {WHOLE_RETAIN_STRATEGIES[cfg.strategy]}; a streamed job "
                                 "holds only a sample of it (set data.streaming: false to read the table whole)")
    if selector not in STREAM_SELECTORS:
        raise InvalidConfigError(f"selector: {selector!r} needs every forget sample at once; a streamed job scores the "
                                 f"forget rows in one pass with one of {sorted(STREAM_SELECTORS)}")
    if k is None and not isinstance(cfg.fraction, (int, float)):
        raise InvalidConfigError(f"fraction: {cfg.fraction!r} grows the coreset from the in-memory forget set; a "
                                 "streamed job needs k: or a number for fraction:")
    return STREAM_SELECTORS[selector]


def from_mapping(data: dict[str, Any], path: str | Path) -> UserJobConfig:
    """:meth:`UserJobConfig.from_dict` of a YAML file's mapping, errors prefixed with the file."""
    try:
        return UserJobConfig.from_dict(data, Path(path).resolve().parent)
    except InvalidConfigError as err:
        raise InvalidConfigError(f"config {path}: {err}") from None


def is_own_data_job(data: dict[str, Any]) -> bool:
    """Whether a job YAML's mapping names the user's own model or data (else it is a benchmark job)."""
    return any(key in data for key in OWN_DATA_KEYS)
