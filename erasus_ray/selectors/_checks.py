"""Checks shared by every gradient-based selector (influence, TracIn, GraNd and what builds on them).

:func:`require_gradients` names the scoped parameters that receive no gradient (a ``torch.round`` / ``argmax`` /
``.item()`` / ``.detach()`` in the forward) instead of letting them score silently as zeros;
:func:`torch_func_errors` turns a ``torch.func`` tracing failure into an error that says what to change.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from erasus_ray.errors import NonDifferentiableModelError
from erasus_ray.tasks import Task
from erasus_ray.tasks.base import TaskOutput

__all__ = ["PROBE_SIZE", "dead_gradients_error", "probe_batch", "require_gradients", "torch_func_errors"]

#: Rows of the forget set that the checks (and influence's planning) run one forward/backward on.
PROBE_SIZE = 16




def _module_of(model: nn.Module, name: str) -> str:
    owner = name.rsplit(".", 1)[0] if "." in name else ""
    try:
        kind = type(model.get_submodule(owner)).__name__
    except AttributeError:  # pragma: no cover - names come from named_parameters
        kind = "?"
    return f"{owner or '<root>'} ({kind})"


def probe_batch(dataset: Any, task: Task, device: torch.device, size: int = PROBE_SIZE) -> Any:
    """The first ``size`` rows of ``dataset`` collated on ``device`` (for checks that need one small batch)."""
    from erasus_ray.data import make_loader

    return next(iter(make_loader(dataset, task.collate, batch_size=max(1, min(size, len(dataset)))))).to(device).data


def dead_gradients_error(model: nn.Module, dead: Sequence[str], total: int, who: str) -> NonDifferentiableModelError:
    """The error for scoped parameters ``dead`` (of ``total``) that receive no gradient, naming their modules."""
    where = sorted({_module_of(model, n) for n in dead})
    return NonDifferentiableModelError(
        f"{who} needs gradients of the loss w.r.t. the parameters in scope, but {len(dead)} of {total} receive "
        f"none (or only exact zeros): {list(dead)[:10]} in module(s) {where[:10]}. Something between them and the loss "
        f"is not differentiable (torch.round / floor / sign / argmax, .item() / .tolist(), .detach(), an integer "
        f"cast) or they are unused. Make that part differentiable (e.g. a straight-through estimator), narrow "
        f"scope= to parameters after it, or use a forward-only selector (el2n, loss, k_center)."
    )


def require_gradients(
    model: nn.Module, task: Task, data: Any, params: dict[str, torch.Tensor], who: str, capture: Any = None
) -> TaskOutput:
    """Raise :class:`~erasus_ray.errors.NonDifferentiableModelError` naming the scoped parameters (and their modules)
    that receive no gradient of the loss on ``data`` (one batch).

    "No gradient" is either none at all (the parameter is cut off from the loss: ``.item()``, ``.detach()``, an
    integer cast, an unused layer) or an exactly zero gradient over the whole batch (``torch.round``, ``floor``,
    ``sign``, ``argmax``-derived values: their derivative is zero everywhere). Scores from such parameters would be
    silently zero. Returns the batch's (detached) output. ``capture``: an optional context manager (e.g. a
    :class:`~erasus_ray.selectors._factored.LayerCapture`) the forward runs under, so a caller that needs layer
    inputs/outputs of the same batch gets them without a second forward. Cost: one ordinary forward + backward of
    the batch.
    """
    named = dict(model.named_parameters())
    wanted = [n for n in params if n in named]
    with torch.enable_grad(), (capture if capture is not None else contextlib.nullcontext()):
        out = task.forward(model, data)
    with torch.enable_grad():
        loss = out.sample_loss().sum()
        if not loss.requires_grad:
            grads: Sequence[torch.Tensor | None] = [None] * len(wanted)
        else:
            grads = torch.autograd.grad(loss, [named[n] for n in wanted], allow_unused=True)
    dead = [n for n, g in zip(wanted, grads) if g is None or not bool(torch.any(g != 0))]
    if dead:
        raise dead_gradients_error(model, dead, len(wanted), who)
    if not out.has_logits:  # a loss-only task: per-sample gradients need no more than its objective
        return TaskOutput(losses=out.losses.detach(), batch_size=out.batch_size)
    return TaskOutput(out.logits.detach(), out.targets, out.owner, out.batch_size)


@contextlib.contextmanager
def torch_func_errors(who: str) -> Iterator[None]:
    """Turn a ``torch.func`` (``vmap`` / ``grad`` / ``jacrev``) failure into a
    :class:`~erasus_ray.errors.NonDifferentiableModelError` that says why and what to do (the original error is
    chained)."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:
        raise NonDifferentiableModelError(
            f"{who}: torch.func could not compute per-sample gradients through the model's forward ({err}). "
            f"Per-sample transforms (vmap) cannot run .item() / .tolist() / data-dependent Python control flow or "
            f"in-place updates of captured tensors inside forward. Remove them from forward, or choose a scope of "
            f"Linear / Conv1D / Conv2d / LayerNorm layers, whose per-sample gradients come from layer factors without vmap."
        ) from err
