"""Per-sample gradient norms from layer factors, in one ordinary backward pass.

For a linear map ``y = W a + b`` applied to one sample, the gradient of that sample's loss is the outer product of
the output gradient ``d = dl/dy`` and the input activation ``a``: ``dl/dW = d a^T``, ``dl/db = d``. Its squared
Frobenius norm is therefore ``||a||^2 ||d||^2`` - no per-sample gradient is ever materialised (Goodfellow 2015,
"Efficient Per-Example Gradient Computations"; the "ghost norm" of Li et al. 2022 / Opacus' ghost clipping).
For a sequence (tokens ``t`` of one sample share ``W``) ``dl/dW = sum_t d_t a_t^T`` and

    ||dl/dW||_F^2 = sum_{t,s} (a_t . a_s)(d_t . d_s) = <A A^T, D D^T>_F,

the inner product of the two ``T x T`` Gram matrices; ``||dl/db||^2 = ||sum_t d_t||^2``.

Cost: one forward + one backward of the batch (like a training step) plus, per layer, ``O(B d)`` for vectors or
``O(B T^2 d)`` for sequences (or ``O(B T d_in d_out)`` by forming ``D^T A`` when that is cheaper, e.g. a
convolution's many positions). ``nn.Conv2d`` (groups 1) is handled as a linear map of unfolded patches. The caller's
scope must consist of ``nn.Linear``, ``nn.Conv2d`` and Hugging Face GPT-2 ``Conv1D`` parameters, each module called once per forward, with no parameter shared between modules; otherwise
:func:`factored_supported` says no and callers fall back to ``torch.func``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from erasus_ray.tasks import Task


def _is_conv2d(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: y = x @ W + b with W of shape [in, out]
    return type(module).__name__ == "Conv1D" and hasattr(module, "weight") and hasattr(module, "nf")


def _layer_modules(model: nn.Module, param_names: set[str]) -> dict[str, nn.Module] | None:
    """The Linear/Conv1D modules owning every name in ``param_names``, or None if some parameter is not covered
    (or is shared between modules, as with tied embeddings)."""
    owners: dict[str, nn.Module] = {}
    covered: set[str] = set()
    seen: dict[int, str] = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if id(p) in seen and seen[id(p)] != full and (full in param_names or seen[id(p)] in param_names):
                return None  # tied weights: per-sample gradients add across modules, cross terms are not factored
            seen.setdefault(id(p), full)
            if full in param_names:
                if not (isinstance(module, nn.Linear) or _is_conv1d(module) or _is_conv2d(module)) or p_name not in ("weight", "bias"):
                    return None
                owners[mod_name] = module
                covered.add(full)
    # named_parameters() de-duplicates shared tensors, so a tied weight can be reachable under one name only
    all_named = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    if covered != param_names or not param_names <= all_named:
        return None
    return owners


def factored_supported(model: nn.Module, param_names: set[str]) -> bool:
    """Whether :func:`factored_grad_sq_norms` is exact for these parameters of ``model``."""
    return _layer_modules(model, set(param_names)) is not None


def factored_grad_sq_norms(model: nn.Module, task: Task, data: Any, param_names: set[str]) -> torch.Tensor:
    """``[B]`` squared L2 norms of each sample's loss gradient w.r.t. ``param_names`` (Linear/Conv1D weights and
    biases), from one forward+backward of the whole batch. The model should be in eval mode (no batch norm
    statistics or dropout coupling samples)."""
    param_names = set(param_names)
    modules = _layer_modules(model, param_names)
    if modules is None:
        raise ValueError("factored per-sample norms need Linear/Conv1D parameters that are not shared between modules")
    acts: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            calls[name] = calls.get(name, 0) + 1
            acts[name] = inputs[0].detach()
            if output.requires_grad:
                output.register_hook(lambda g: grads.__setitem__(name, g.detach()))

        return hook

    for name, module in modules.items():
        handles.append(module.register_forward_hook(make_hook(name)))
    try:
        with torch.enable_grad():
            out = task.forward(model, data)
            losses = out.sample_loss()
            batch_size = losses.shape[0]
            wanted = [p for n, p in model.named_parameters() if n in param_names]
            # gradients w.r.t. the layer outputs come through the hooks; autograd.grad leaves .grad untouched
            torch.autograd.grad(losses.sum(), wanted, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    if any(c != 1 for c in calls.values()):
        raise ValueError("a layer in scope ran more than once per forward; factored norms would miss cross terms")
    total = torch.zeros(batch_size, dtype=torch.float64, device=losses.device)
    for name, module in modules.items():
        if name not in grads:  # the layer does not influence the loss
            continue
        a = acts[name].to(torch.float64)
        d = grads[name].to(torch.float64)
        if isinstance(module, nn.Conv2d):
            # a conv is a linear map of unfolded patches: positions play the role of tokens
            a = torch.nn.functional.unfold(
                a, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
            ).transpose(1, 2)  # [B, positions, C_in * kh * kw]
            d = d.flatten(2).transpose(1, 2)  # [B, positions, C_out]
        a = a.reshape(batch_size, -1, a.shape[-1])  # [B, T, in] (T = 1 for plain vectors)
        d = d.reshape(batch_size, -1, d.shape[-1])  # [B, T, out]
        prefix = f"{name}." if name else ""
        if f"{prefix}weight" in param_names:
            steps, d_in, d_out = a.shape[1], a.shape[2], d.shape[2]
            if steps == 1:
                total += a.pow(2).sum((1, 2)) * d.pow(2).sum((1, 2))
            elif steps * steps <= d_in * d_out:
                # Gram form: O(T^2 (in + out)) per sample, never forms the gradient
                total += (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(d, d.transpose(1, 2))).sum((1, 2))
            else:
                # long sequences / many conv positions, small layer: the per-sample gradient d^T a is cheaper
                total += torch.bmm(d.transpose(1, 2), a).pow(2).sum((1, 2))
        if f"{prefix}bias" in param_names and getattr(module, "bias", None) is not None:
            total += d.sum(1).pow(2).sum(1)
    return total
