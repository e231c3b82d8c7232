"""The settings a run takes, as dataclasses, and the one table that maps flat keywords and YAML keys onto them.

Three spellings used to be kept by hand (``RunnerConfig``, the job YAML's key lists and ``ErasusUnlearner``'s
keyword arguments) and drifted apart. Now the dataclass fields are the only list:

* :class:`~erasus_ray.runners.RunnerConfig`: how a strategy is executed (lr, epochs, optimizer, batch sizes,
  clipping, precision, stopping rules, ``gradient_checkpointing``);
* :class:`ExecutionConfig`: where it runs (in process or under Ray Train, workers, GPU, restarts, scoring on the Ray
  actor pool, device).

:data:`FLAT_KEYWORDS` (keyword -> section) is derived from those fields with :func:`dataclasses.fields`, so a new
field is at once a flat keyword of :class:`~erasus_ray.ErasusUnlearner` (``ErasusUnlearner(model, lr=1e-3)`` is
shorthand for ``runner={"lr": 1e-3}``) and a key of a job or sweep YAML's ``runner:`` / ``execution:`` section
(:func:`section_settings`), checked by the dataclass itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch

from erasus_ray.checks import check_bool, check_field_types, check_int, check_known_keys
from erasus_ray.config_files import field_names
from erasus_ray.errors import InvalidConfigError
from erasus_ray.runner_io import RunnerConfig


@dataclass
class ExecutionConfig:
    """Where a job runs.

    Attributes:
        backend: ``"local"`` (in process) or ``"ray_train"`` (``TorchTrainer`` with ``num_workers`` data-parallel
            workers, ``use_gpu``, a checkpoint per epoch and ``max_failures`` restarts; see
            :class:`~erasus_ray.runners.ray_train.RayTrainRunner`).
        num_workers: Ray Train workers (``backend="ray_train"``).
        use_gpu: one GPU per Ray Train worker.
        max_failures: Ray Train restarts from the last checkpoint before the run fails.
        distributed: coreset scoring: ``"ray"`` on the Ray actor pool (``actors/scoring.yaml``), ``"auto"`` there when
            Ray is already initialised or the forget set has at least ``erasus_ray.distributed.AUTO_THRESHOLD``
            samples, None (or ``"none"``) in process.
        device: where the model is moved before unlearning (``"cpu"``, ``"cuda:0"``, a ``torch.device``); None
            leaves it where it is.
    """

    backend: Literal["local", "ray_train"] = "local"
    num_workers: int = 2
    use_gpu: bool = False
    max_failures: int = 1
    distributed: Literal["none", "ray", "auto"] | None = None
    device: str | torch.device | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        self.num_workers = check_int("num_workers", self.num_workers, low=1)
        self.max_failures = check_int("max_failures", self.max_failures, low=0)
        self.use_gpu = check_bool("use_gpu", self.use_gpu)
        self.distributed = None if self.distributed == "none" else self.distributed
        if isinstance(self.device, str):
            try:
                torch.device(self.device)
            except RuntimeError as err:
                raise InvalidConfigError(f"device must name a torch device ('cpu', 'cuda:0', ...), got {self.device!r}: {err}") from None

    @property
    def train_scaling(self) -> dict[str, Any]:
        """The Ray Train runner's scaling arguments."""
        return {"num_workers": self.num_workers, "use_gpu": self.use_gpu, "max_failures": self.max_failures}


#: The settings sections, by the name a job YAML and ``ErasusUnlearner(runner=..., execution=...)`` give them.
SECTIONS: dict[str, type] = {"runner": RunnerConfig, "execution": ExecutionConfig}
#: Fields that are not flat keywords because the caller's own argument of that name sets them: ``seed`` is
#: ``ErasusUnlearner``'s (and a job's top-level) seed, which also seeds the runner's shuffling.
NOT_FLAT: frozenset[str] = frozenset({"seed"})


#: flat keyword -> its section; derived from the dataclass fields (a new field is a keyword at once).
FLAT_KEYWORDS: dict[str, str] = {
    name: section for section, cls in SECTIONS.items() for name in field_names(cls) if name not in NOT_FLAT
}


def split_flat_keywords(kwargs: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``({section: {field: value}}, rest)``: the flat keywords of ``kwargs`` sorted into their sections (see
    :data:`FLAT_KEYWORDS`), and what is left (a strategy's hyperparameters). A flat keyword given as None is
    left out: "not set, use the default" (``epochs=None`` from a caller passing its own optional setting through)."""
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    rest = {}
    for key, value in kwargs.items():
        if key in FLAT_KEYWORDS:
            if value is not None:
                sections[FLAT_KEYWORDS[key]][key] = value
        else:
            rest[key] = value
    return sections, rest


def section_settings(section: str, given: Any, *, exclude: tuple[str, ...] = (), hint: str = "") -> dict[str, Any]:
    """``given`` (a mapping of some fields, or a whole settings dataclass) checked against the ``section``'s
    dataclass and returned as a plain ``{field: value}`` of the fields it sets.

    A mapping may set any field except ``exclude`` (``hint`` says where those are set instead); an unknown key, a
    wrong type or an out-of-range value is an :class:`InvalidConfigError` naming ``section.key`` (an unknown key with
    the closest known one and the accepted list). Fields it leaves out stay unset (the caller's defaults apply).
    """
    cls = SECTIONS[section]
    if isinstance(given, cls):
        return {k: v for k, v in dataclasses.asdict(given).items() if k not in exclude}
    if not isinstance(given, Mapping):
        raise InvalidConfigError(f"{section}: must be a mapping or a {cls.__name__}, got {given!r}")
    accepted = [k for k in field_names(cls) if k not in exclude]
    try:
        check_known_keys(section, given, accepted)
    except InvalidConfigError as err:
        raise InvalidConfigError(f"{err}{hint}") from None
    try:
        checked = cls(**given)
    except InvalidConfigError as err:
        raise InvalidConfigError(f"{section}.{err}") from None  # the message starts with the field's name
    return {k: getattr(checked, k) for k in given}


def merged_section(section: str, given: Any, flat: Mapping[str, Any], *, exclude: tuple[str, ...] = (), hint: str = "") -> dict[str, Any]:
    """The ``section``'s settings from ``runner=`` / ``execution=`` (a settings dataclass: every field but
    ``exclude``; a mapping: the fields it names) and the flat keywords of that section (:func:`split_flat_keywords`),
    each checked by the dataclass (:func:`section_settings`); a setting given both ways is an error (neither silently
    wins). Shared by :class:`~erasus_ray.ErasusUnlearner` and :class:`~erasus_ray.UnlearningTrainer`."""
    base = {} if given is None else section_settings(section, given, exclude=exclude, hint=hint)
    both = sorted(set(base) & set(flat)) if not isinstance(given, SECTIONS[section]) else sorted(flat)
    if both:
        raise InvalidConfigError(f"{section}: {both} given both in {section}= and as keyword(s); give each once")
    return {**base, **section_settings(section, flat, exclude=exclude, hint=hint)}
