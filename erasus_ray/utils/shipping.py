"""Send a model to Ray actors and workers when it has ``torch.nn.utils.parametrize`` parametrizations.

A parametrized module refuses to be pickled ("Serialization of parametrized modules is only supported through
state_dict()"), so ``ray.put(model)`` and a Ray Train ``train_loop_config`` holding it fail. Hugging Face's
``Wav2Vec2`` (its positional convolution uses ``weight_norm``) is one such model. :func:`shippable` wraps the model so
that pickling sends a copy with each parametrization folded into a plain tensor, plus the parametrization modules and
their original tensors; unpickling re-registers them and restores the originals exactly, so the receiver gets a
module of the same structure, ``state_dict`` and training behaviour (``weight_g`` / ``weight_v`` stay separate
parameters). Transformers 5 also installs output-capturing forward hooks on a model's first forward that close over a
ContextVar (unpicklable): the copy drops them and the receiver's model installs its own on its first forward. A
model with neither is sent as it is.

Receivers call :func:`unshipped` on what arrived: the wrapper survives every hop (a Ray Train config goes from the
driver to the controller to the workers, pickled again at each).

Cost: one deep copy of a parametrized model per pickling.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize


#: transformers (5.x) installs these forward hooks on a model's first forward (``install_output_capuring_hook``, its
#: spelling); they close over a module-level ContextVar, which cannot be pickled
_CAPTURE_HOOK = "install_output_capuring_hook.<locals>."


class _Shipped:
    """Pickles as :func:`_restore` of a parametrization-free copy; never seen by the receiver."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        plain = copy.deepcopy(self.model)
        _drop_capture_hooks(plain)
        specs = []
        for path, module in [(p, m) for p, m in plain.named_modules() if parametrize.is_parametrized(m)]:
            # a deep copy shares its parametrized class with the original, and removing a parametrization deletes
            # the tensor's property from that class: give the copy a class of its own so the original keeps working
            cls = type(module)
            module.__class__ = type(cls.__name__, cls.__bases__,
                                    {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")})
            for tensor_name in list(module.parametrizations):
                chain = module.parametrizations[tensor_name]
                originals = {k: v.detach().clone() for k, v in chain.named_parameters(recurse=False)}
                specs.append((path, tensor_name, list(chain), originals))
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
        return _restore_shipped, (plain, specs)


def _is_capture_hook(hook: Any) -> bool:
    return getattr(hook, "__qualname__", "").startswith(_CAPTURE_HOOK)


def _drop_capture_hooks(model: nn.Module) -> None:
    """Remove transformers' output-capturing forward hooks and clear its "installed" flag, so the receiver's model
    installs its own on its first forward."""
    for module in model.modules():
        for key in [k for k, hook in module._forward_hooks.items() if _is_capture_hook(hook)]:
            del module._forward_hooks[key]
        if getattr(module, "_output_capturing_hooks_installed", False):
            module._output_capturing_hooks_installed = False


def _restore(plain: nn.Module, specs: list[tuple[str, str, list[nn.Module], dict[str, torch.Tensor]]]) -> nn.Module:
    for path, tensor_name, chain, originals in specs:
        module = plain.get_submodule(path)
        for parametrization in chain:
            parametrize.register_parametrization(module, tensor_name, parametrization, unsafe=True)
        with torch.no_grad():
            for key, value in originals.items():
                getattr(module.parametrizations[tensor_name], key).copy_(value)
    return plain


def _restore_shipped(plain: nn.Module, specs: list[Any]) -> "_Shipped":
    # still wrapped: a Ray Train config travels driver -> controller -> workers, and the controller pickles it again
    return _Shipped(_restore(plain, specs))


def unshipped(value: Any) -> Any:
    """The module a :func:`shippable` wrapper carries (what a receiver calls on what arrived); anything else as it is."""
    return value.model if isinstance(value, _Shipped) else value


def shippable(model: nn.Module) -> Any:
    """``model`` itself, or (when some submodule is parametrized or carries transformers' capture hooks) a wrapper
    that pickles into an equal module."""
    if any(parametrize.is_parametrized(m) or any(map(_is_capture_hook, m._forward_hooks.values())) for m in model.modules()):
        return _Shipped(model)
    return model


__all__ = ["shippable", "unshipped"]
