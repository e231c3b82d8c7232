"""Errors raised by erasus-ray. Every one says what was wrong and what to do instead."""

from __future__ import annotations


class ErasusError(Exception):
    """Base class for every error erasus-ray raises on purpose."""


class InvalidDataError(ErasusError, ValueError):
    """Forget/retain data is empty, has unknown ids, or the two overlap."""


class InvalidConfigError(ErasusError, ValueError):
    """An argument is out of range (fraction, k, a hyperparameter) or malformed."""


class UnknownNameError(ErasusError, KeyError):
    """A registry lookup failed; the message lists the known names and the closest match."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TaskMismatchError(ErasusError, ValueError):
    """The model's output does not fit the task adapter (e.g. logits vs labels)."""


class NonFiniteLossError(ErasusError, FloatingPointError):
    """A loss or gradient became NaN/inf during unlearning."""
