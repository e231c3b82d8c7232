"""Errors raised by erasus-ray. Every one says what was wrong and what to do instead."""

from __future__ import annotations


class ErasusError(Exception):
    """Base class for every error erasus-ray raises on purpose."""


class InvalidDataError(ErasusError, ValueError):
    """Forget/retain data is empty, has unknown ids, or the two overlap."""


class InvalidConfigError(ErasusError, ValueError):
    """An argument is out of range (fraction, k, a hyperparameter) or malformed."""


class NonDifferentiableModelError(InvalidConfigError):
    """A gradient-based selector cannot differentiate the model: some scoped parameters receive no gradient (a
    ``torch.round`` / ``argmax`` / ``.item()`` / ``.detach()`` sits between them and the loss), or ``torch.func``
    cannot trace the forward per sample. The message names the parameters and modules."""


class UnknownNameError(ErasusError, KeyError):
    """A registry lookup failed; the message lists the known names and the closest match."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TaskMismatchError(ErasusError, ValueError):
    """The model's output does not fit the task adapter (e.g. logits vs labels)."""


class NonFiniteLossError(ErasusError, FloatingPointError):
    """A loss or gradient became NaN/inf during unlearning."""


class NonFiniteWeightsError(ErasusError, FloatingPointError):
    """The weights became NaN/inf after an optimizer step although the loss and gradient norm were finite (an
    overflowing learning rate, a strategy's own update). Unlike :class:`NonFiniteLossError` (the runner stops and
    keeps the last good weights) this ends the run: there are no good weights left to return."""


class InvalidRequestError(ErasusError, ValueError):
    """A deletion request is malformed, empty, too large, names unknown ids, or exceeds a rate limit.

    ``code`` is a short machine-readable reason (``malformed``, ``empty_ids``, ``too_many_ids``, ``unknown_ids``,
    ``not_owner``, ``rate_limited``, ``conflict``); ``request_id`` the request it concerns, when known.
    """

    def __init__(self, message: str, *, code: str = "malformed", request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


class UnauthorizedRequestError(InvalidRequestError):
    """A client asked to delete ids it does not own (another client's data)."""


class LedgerError(ErasusError):
    """The deletion ledger refused an operation: an unknown request id or an illegal state transition."""


class IllegalTransitionError(LedgerError, ValueError):
    """A request cannot move from its current state to the requested one (e.g. verified -> scheduled)."""


class UnknownRequestError(LedgerError, KeyError):
    """No request with this id is in the ledger."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ScoringPoolError(ErasusError, RuntimeError):
    """The Ray scoring pool lost every actor that could run a shard (or ran out of re-runs for one): the message says
    what was lost and what to change (``actors/scoring.yaml``: ``max_restarts``, ``max_task_retries``,
    ``num_actors``)."""
