"""What a runner is told (:class:`RunnerConfig`) and what it gives back (:class:`RunReport`).

A module of its own, below both :mod:`erasus_ray.strategies` and :mod:`erasus_ray.runners`: a strategy's ``unlearn``
returns a ``RunReport`` and reads its runner's config, and the runners execute strategies, so neither may hold these
without importing the other. Users keep importing both from :mod:`erasus_ray.runners`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from erasus_ray.checks import check_bool, check_choice, check_field_types, check_int, check_real, check_seed
from erasus_ray.errors import InvalidConfigError
from erasus_ray.training import OPTIMIZERS


@dataclass
class RunnerConfig:
    """How a strategy is executed.

    Attributes:
        epochs: passes over the forget coreset; each forget batch is paired with one retain batch.
        lr: learning rate.
        optimizer: ``adam`` | ``adamw`` | ``sgd``.
        batch_size: forget batch size; ``retain_batch_size`` defaults to it.
        grad_clip: max gradient norm (None: no clipping; the norm is still checked for NaN/inf).
        precision: ``"32"`` or ``"bf16-mixed"`` (autocast where the device supports bf16).
        forget_target: stop early once the accuracy on the coreset falls to or below this value.
        max_steps: hard cap on runner steps (paired forget/retain steps; a strategy with several losses per step,
            such as SCRUB, takes one optimizer step per loss).
        progress: show a progress bar.
        seed: seeds the shuffling of both loaders.
        gradient_checkpointing: recompute activations in the backward pass (memory for compute) while unlearning;
            needs a Hugging Face model (``activation_checkpointing_enable`` / ``gradient_checkpointing_enable``).

    Every field is also a flat keyword of :class:`~erasus_ray.ErasusUnlearner` and a key of a job YAML's ``runner:``
    section (:mod:`erasus_ray.settings` derives both from these fields). Checked on construction: a wrong type or
    range is an :class:`InvalidConfigError` naming the field.
    """

    epochs: int = 10
    lr: float = 1e-3
    optimizer: str = "adam"
    batch_size: int = 32
    retain_batch_size: int | None = None
    grad_clip: float | None = None
    precision: str = "32"
    forget_target: float | None = None
    max_steps: int | None = None
    progress: bool = True
    seed: int = 0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "RunnerConfig":
        """Check every setting's type and range (errors name the setting) and turn NumPy numbers into Python ones
        (a DataLoader refuses ``np.int64`` batch sizes); returns self. Also run after construction: a field may have
        been changed since."""
        check_field_types(self)
        self.epochs = check_int("epochs", self.epochs, low=1)
        self.lr = check_real("lr", self.lr, low=0.0, low_open=True)
        if not isinstance(self.optimizer, str) or self.optimizer.lower() not in OPTIMIZERS:
            raise InvalidConfigError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        self.batch_size = check_int("batch_size", self.batch_size, low=1)
        self.retain_batch_size = check_int("retain_batch_size", self.retain_batch_size, low=1, none_ok=True)
        self.grad_clip = check_real("grad_clip", self.grad_clip, low=0.0, low_open=True, none_ok=True)
        check_choice("precision", self.precision, ("32", "bf16-mixed"))
        self.forget_target = check_real("forget_target", self.forget_target, low=0.0, high=1.0, none_ok=True)
        self.max_steps = check_int("max_steps", self.max_steps, low=1, none_ok=True)
        self.progress = check_bool("progress", self.progress)
        self.seed = check_seed("seed", self.seed)
        self.gradient_checkpointing = check_bool("gradient_checkpointing", self.gradient_checkpointing)
        return self


@dataclass
class RunReport:
    """What a run did: steps taken, samples touched (the cost driver), why it stopped, per-epoch logs."""

    steps: int = 0
    epochs: int = 0
    forget_samples: int = 0
    retain_samples: int = 0
    stopped: str = "completed"
    history: list[dict[str, float]] = field(default_factory=list)
    #: strategy-specific facts about the run (variant used, shards retrained, certificate), JSON-serialisable
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
