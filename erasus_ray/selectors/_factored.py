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
convolution's many positions). ``nn.Conv2d`` (groups 1) is handled as a linear map of unfolded patches, and an
affine ``nn.LayerNorm`` (``y = w * xhat + b``) by its normalised input: ``dl/dw = sum_t d_t * xhat_t``,
``dl/db = sum_t d_t``. The caller's scope must consist of ``nn.Linear``, ``nn.Conv2d``, ``nn.LayerNorm`` and Hugging
Face GPT-2 ``Conv1D`` parameters, each module called once per forward, with no parameter shared between modules;
otherwise :func:`factored_supported` says no and callers fall back to ``torch.func``.

The same factors give the per-sample gradients themselves (:func:`factored_backward`: one forward with hooks, one
ordinary backward per loss - e.g. the data loss, or losses with labels sampled from the model for a Fisher
estimate), at about the cost of a training step instead of ``torch.func``'s per-sample forward and backward.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from erasus_ray.tasks import Task
from erasus_ray.tasks.base import TaskOutput


def _is_conv2d(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: y = x @ W + b with W of shape [in, out]
    return type(module).__name__ == "Conv1D" and hasattr(module, "weight") and hasattr(module, "nf")


def _is_layer_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) and module.elementwise_affine


def _is_embedding(module: nn.Module) -> bool:
    # the plain lookup: no max_norm renormalisation or frequency scaling (they change the gradient)
    return isinstance(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq


def _leading_size(data: Any) -> int | None:
    """The leading dimension of the first tensor in ``data`` (the batch size for the adapters' batches)."""
    from torch.utils._pytree import tree_leaves

    for leaf in tree_leaves(data):
        if isinstance(leaf, torch.Tensor) and leaf.ndim >= 1:
            return int(leaf.shape[0])
    return None


def _norm_layout(model: nn.Module, param_names: set[str]) -> tuple[dict[str, nn.Module], dict[str, tuple[str, str]]] | None:
    """For :func:`factored_grad_sq_norms`: the modules owning ``param_names`` - Linear / Conv1D / Conv2d / LayerNorm
    layers and ``nn.Embedding`` lookups - and the tied weights ``{param name: (embedding module, linear module)}`` shared by
    exactly one embedding and one Linear head (GPT-2's ``wte`` / ``lm_head``); None when anything else is in scope
    or shared."""
    owners: dict[str, nn.Module] = {}
    users: dict[int, list[tuple[str, str, nn.Module]]] = {}
    name_of = {id(p): n for n, p in model.named_parameters()}  # the de-duplicated (canonical) names
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            users.setdefault(id(p), []).append((mod_name, p_name, module))
    ties: dict[str, tuple[str, str]] = {}
    for pid, uses in users.items():
        name = name_of.get(pid)
        if name not in param_names:
            continue
        for mod_name, p_name, module in uses:
            supported = (isinstance(module, nn.Linear) or _is_conv1d(module) or _is_conv2d(module)
                         or _is_layer_norm(module) or (_is_embedding(module) and p_name == "weight"))
            if not supported or p_name not in ("weight", "bias"):
                return None
            owners[mod_name] = module
        if len(uses) == 2:
            kinds = {type(m) for _, _, m in uses}
            emb = [u for u in uses if _is_embedding(u[2])]
            lin = [u for u in uses if isinstance(u[2], nn.Linear)]
            if not (len(emb) == 1 and len(lin) == 1 and all(u[1] == "weight" for u in uses)) or len(kinds) != 2:
                return None
            ties[name] = (emb[0][0], lin[0][0])
        elif len(uses) > 2:
            return None
    if not param_names <= set(name_of.values()):
        return None
    return owners, ties


def _layer_modules(model: nn.Module, param_names: set[str]) -> dict[str, nn.Module] | None:
    """The Linear / Conv1D / Conv2d / LayerNorm modules owning every name in ``param_names`` - the layout whose
    per-sample *gradients* factor - or None if some parameter is not such a layer's, is an embedding table, or is
    shared between modules (tied weights: their per-sample gradients add across modules)."""
    layout = _norm_layout(model, param_names)
    if layout is None or layout[1] or any(_is_embedding(m) for m in layout[0].values()):
        return None
    return layout[0]


def factored_supported(model: nn.Module, param_names: set[str], norms_only: bool = False, task: Task | None = None) -> bool:
    """Whether the factored per-sample gradients (:func:`factored_backward`) - or with ``norms_only`` just their
    norms (:func:`factored_grad_sq_norms`, which also handles embeddings and a tied embedding / head) - are exact for
    these parameters of ``model`` (never for a ``task`` whose forward feeds some layer inputs shared by the batch,
    :attr:`~erasus_ray.tasks.Task.shared_inputs`)."""
    if task is not None and task.shared_inputs:
        return False
    if norms_only:
        return _norm_layout(model, set(param_names)) is not None
    return _layer_modules(model, set(param_names)) is not None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half / bfloat16 / float32 layers (the products below are sums of a few hundred terms; their
    rounding is far below the norms' use as scores), float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lookup_sq_norms(ids: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``[B]`` ``||sum_t e_{x_t} u_t^T||^2 = sum_{t,t'} [x_t = x_t'] u_t . u_t'`` (float64) for token ids ``[B, T]`` and
    row gradients ``u [B, T, h]``: an embedding lookup's per-sample weight-gradient norm."""
    same = (ids[:, :, None] == ids[:, None, :]).to(u.dtype)
    return (same * torch.bmm(u, u.transpose(1, 2))).sum((1, 2)).double()


def factored_grad_sq_norms(model: nn.Module, task: Task, data: Any, param_names: set[str]) -> torch.Tensor:
    """``[B]`` squared L2 norms (float64) of each sample's loss gradient w.r.t. ``param_names`` (Linear / Conv1D /
    Conv2d / LayerNorm weights and biases, embedding tables, and a weight tied between an embedding and a Linear
    head), from one forward and one backward of the whole batch. The model should be in eval mode (no batch norm
    statistics or dropout coupling samples).

    An embedding's per-sample gradient is ``sum_t e_{x_t} u_t^T`` (``u_t`` the gradient w.r.t. the looked-up row),
    so its squared norm is ``sum_{t,t'} [x_t = x_t'] u_t . u_t'``; a weight tied to a head ``sum_s d_s a_s^T`` adds
    the head's own term and the cross term ``2 sum_{t,s} d_s[x_t] (u_t . a_s)`` (the ghost norm of a tied
    embedding, as in Li et al. 2022). The backward asks autograd for the gradients w.r.t. the layers' *outputs*
    only, so it never computes the (summed) weight gradients a training step would; the per-layer products run in
    float32 (float64 for a float64 model) and are accumulated in float64."""
    param_names = set(param_names)
    layout = _norm_layout(model, param_names)
    if layout is None:
        raise ValueError("factored per-sample norms need Linear/Conv1D/Conv2d/LayerNorm/Embedding parameters, shared "
                         "at most between one embedding and one Linear head")
    modules, ties = layout
    capture, out = captured_forward(model, task, data, modules, expand_to=_leading_size(data))
    with torch.enable_grad():
        losses = out.sample_loss()
    batch_size = losses.shape[0]
    names = [n for n in modules if n in capture.outputs and capture.outputs[n].requires_grad]
    total = torch.zeros(batch_size, dtype=torch.float64, device=losses.device)
    if not names:
        return total
    grads = dict(zip(names, torch.autograd.grad(losses.sum(), [capture.outputs[n] for n in names], allow_unused=True)))
    tied_weights = {m: w for w, pair in ties.items() for m in pair}  # module -> its tied weight's name
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (a / token ids, d / u) as [B, T, *]
    for name in names:
        grad = grads[name]
        if grad is None:  # the layer does not influence the loss
            continue
        module = modules[name]
        dtype = _compute_dtype(grad.dtype)
        d = grad.detach().to(dtype)
        prefix = f"{name}." if name else ""
        if _is_embedding(module):
            if capture.inputs[name].shape[0] != batch_size or grad.shape[0] != batch_size:
                raise ValueError(f"embedding {name!r} is not looked up per sample; factored norms cannot split its gradient")
            ids = capture.inputs[name].reshape(batch_size, -1)
            u = d.reshape(batch_size, ids.shape[1], -1)
            if module.padding_idx is not None:  # the padding row receives no gradient
                u = u * (ids != module.padding_idx).unsqueeze(-1).to(u.dtype)
            rows[name] = (ids, u)
            if name not in tied_weights:
                total += _lookup_sq_norms(ids, u)
            continue
        a = capture.inputs[name].to(dtype)
        if _is_layer_norm(module):  # small vectors: form the per-sample gradients
            wanted = {n for n in (f"{prefix}weight", f"{prefix}bias") if n in param_names}
            for g in layer_per_sample_grads(name, module, a, d, batch_size, wanted).values():
                total += g.reshape(batch_size, -1).pow(2).sum(1).double()
            continue
        a, d = layer_rows(module, a, d, batch_size)  # [B, T, in], [B, T, out] (T = 1 for plain vectors)
        rows[name] = (a, d)
        if f"{prefix}weight" in param_names or name in tied_weights:
            steps, d_in, d_out = a.shape[1], a.shape[2], d.shape[2]
            if steps == 1:
                total += (a.pow(2).sum((1, 2)) * d.pow(2).sum((1, 2))).double()
            elif steps * steps <= d_in * d_out:
                # Gram form: O(T^2 (in + out)) per sample, never forms the gradient
                total += (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(d, d.transpose(1, 2))).sum((1, 2)).double()
            else:
                # long sequences / many conv positions, small layer: the per-sample gradient d^T a is cheaper
                total += torch.bmm(d.transpose(1, 2), a).pow(2).sum((1, 2)).double()
        if f"{prefix}bias" in param_names and getattr(module, "bias", None) is not None:
            total += d.sum(1).pow(2).sum(1).double()
    for emb_name, head_name in ties.values():
        emb, head = rows.get(emb_name), rows.get(head_name)
        if emb is not None:  # the embedding's own term
            total += _lookup_sq_norms(*emb)
        if emb is not None and head is not None:  # 2 <sum_t e_{x_t} u_t^T, sum_s d_s a_s^T>
            ids, u = emb
            a, d = head
            picked = torch.gather(d, 2, ids[:, None, :].expand(-1, d.shape[1], -1))  # [B, S, T]: d_s[x_t]
            total += 2 * (picked * torch.bmm(a, u.to(a.dtype).transpose(1, 2))).sum((1, 2)).double()
    return total


# ---------------------------------------------------------------------------------------------------------------
# Per-sample gradients from layer factors
# ---------------------------------------------------------------------------------------------------------------


class LayerCapture:
    """Forward hooks recording each module's input (detached) and output (kept in the autograd graph, so gradients
    w.r.t. it can be asked for) and how many times it ran. Use as a context manager around one forward.

    With gradients enabled the hook hands the rest of the network a copy of the output, so an in-place operation
    downstream (``nn.ReLU(inplace=True)``) modifies the copy and a gradient w.r.t. the recorded output is still the
    gradient w.r.t. the layer's own output (the copy is elementwise: small next to the layer's matmul).

    ``expand_to``: the batch size; an ``nn.Embedding`` looked up once for the whole batch (GPT-2's position ids of
    shape ``[1, T]``, broadcast when added) is expanded to it, so the gradient w.r.t. its output stays per sample."""

    def __init__(self, modules: dict[str, nn.Module], expand_to: int | None = None) -> None:
        self.modules = modules
        self.expand_to = expand_to
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        #: the tensor the rest of the network received from each module (its output, or the copy handed on)
        self.handed: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "LayerCapture":
        def make_hook(name: str):
            def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> Any:
                self.calls[name] = self.calls.get(name, 0) + 1
                x = inputs[0].detach()
                if (self.expand_to and self.expand_to > 1 and isinstance(module, nn.Embedding) and x.ndim >= 1
                        and x.shape[0] == 1):
                    x = x.expand(self.expand_to, *x.shape[1:])
                    output = output.expand(self.expand_to, *output.shape[1:])
                self.inputs[name] = x
                self.outputs[name] = self.handed[name] = output
                if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
                    self.handed[name] = output.clone()
                    return self.handed[name]
                return None

            return hook

        self._handles = [m.register_forward_hook(make_hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def check_single_calls(self) -> None:
        if any(c != 1 for c in self.calls.values()):
            raise ValueError("a layer in scope ran more than once per forward; factored gradients would miss cross terms")


def captured_forward(
    model: nn.Module, task: Task, data: Any, modules: dict[str, nn.Module], expand_to: int | None = None
) -> tuple[LayerCapture, TaskOutput]:
    """``(capture, output)``: one forward of ``data`` with gradients on and :class:`LayerCapture` hooks on
    ``modules``. Raises ``ValueError`` when a captured layer ran more than once."""
    capture = LayerCapture(modules, expand_to=expand_to)
    with torch.enable_grad(), capture:
        out = task.forward(model, data)
    capture.check_single_calls()
    return capture, out


def check_rows(act: torch.Tensor, batch_size: int) -> None:
    """Raise ``ValueError`` (the callers' signal to fall back to ``torch.func``) when a layer's input is not one block
    of rows per sample, e.g. a text tower encoding a caption set shared by the whole batch: its gradient is a sum over
    shared rows that layer factors cannot split per sample."""
    if act.ndim == 0 or act.shape[0] != batch_size:
        raise ValueError(f"a layer's input has {act.shape[0] if act.ndim else 0} leading rows for a batch of "
                         f"{batch_size}: its rows are shared by the batch, so factored per-sample gradients do not apply")


def layer_rows(module: nn.Module, act: torch.Tensor, grad: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a [B, T, in], d [B, T, out])``: a Linear / Conv1D / Conv2d layer as ``T`` applications of one linear map
    per sample (a convolution's positions become tokens over unfolded patches)."""
    check_rows(act, batch_size)
    if isinstance(module, nn.Conv2d):
        act = torch.nn.functional.unfold(
            act, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
        ).transpose(1, 2)
        grad = grad.flatten(2).transpose(1, 2)
    return act.reshape(batch_size, -1, act.shape[-1]), grad.reshape(batch_size, -1, grad.shape[-1])


def layer_per_sample_grads(
    name: str, module: nn.Module, act: torch.Tensor, grad: torch.Tensor, batch_size: int, wanted: set[str]
) -> dict[str, torch.Tensor]:
    """Per-sample gradients ``{param name: [B, *param.shape]}`` of one layer from its input ``act`` and the gradient
    ``grad`` of the (summed-over-samples) loss w.r.t. its output. Exact when samples do not interact (eval mode)."""
    prefix = f"{name}." if name else ""
    out: dict[str, torch.Tensor] = {}
    if _is_layer_norm(module):
        check_rows(act, batch_size)
        dims = tuple(range(act.ndim - len(module.normalized_shape), act.ndim))
        mean = act.mean(dims, keepdim=True)
        var = act.var(dims, unbiased=False, keepdim=True)
        xhat = ((act - mean) / torch.sqrt(var + module.eps)).reshape(batch_size, -1, *module.normalized_shape)
        d = grad.reshape(batch_size, -1, *module.normalized_shape)
        if f"{prefix}weight" in wanted:
            out[f"{prefix}weight"] = (d * xhat.to(d.dtype)).sum(1)
        if f"{prefix}bias" in wanted and module.bias is not None:
            out[f"{prefix}bias"] = d.sum(1)
        return out
    a, d = layer_rows(module, act, grad, batch_size)
    if f"{prefix}weight" in wanted:
        if _is_conv1d(module):
            out[f"{prefix}weight"] = torch.einsum("bti,bto->bio", a.to(d.dtype), d)
        else:
            out[f"{prefix}weight"] = torch.einsum("bto,bti->boi", d, a.to(d.dtype)).reshape(batch_size, *module.weight.shape)
    if f"{prefix}bias" in wanted and getattr(module, "bias", None) is not None:
        out[f"{prefix}bias"] = d.sum(1)
    return out


def factored_backward(
    model: nn.Module,
    task: Task,
    data: Any,
    param_names: Sequence[str],
    losses: Callable[[TaskOutput], Sequence[torch.Tensor]] | None = None,
) -> tuple[TaskOutput, list[dict[str, torch.Tensor]]]:
    """One forward of ``data`` with hooks on the layers owning ``param_names``, then one ordinary backward per
    scalar loss in ``losses(output)`` (default: the summed per-sample task loss). Returns the output and, per loss,
    the per-sample gradients ``{name: [B, *shape]}`` in the order of ``param_names`` (zeros for a layer the loss does
    not reach). Every loss must be a sum of per-sample terms. Raises ``ValueError`` when a layer runs twice.

    Cost: one forward + one backward per loss (each backward stops at the captured layers), plus
    ``O(B T in out)`` per layer to form the gradients.
    """
    wanted = set(param_names)
    modules = _layer_modules(model, wanted)
    if modules is None:
        raise ValueError("factored per-sample gradients need Linear/Conv1D/Conv2d/LayerNorm parameters not shared between modules")
    capture, out = captured_forward(model, task, data, modules)
    names = [n for n in modules if n in capture.outputs]
    outputs = [capture.outputs[n] for n in names]
    with torch.enable_grad():
        todo = list(losses(out)) if losses is not None else [out.sample_loss().sum()]
    results = []
    for i, loss in enumerate(todo):
        grads = torch.autograd.grad(loss, outputs, retain_graph=i + 1 < len(todo), allow_unused=True)
        per: dict[str, torch.Tensor] = {}
        for n, g in zip(names, grads):
            g = torch.zeros_like(capture.outputs[n]) if g is None else g.detach()
            per.update(layer_per_sample_grads(n, modules[n], capture.inputs[n], g, out.batch_size, wanted))
        params = dict(model.named_parameters())
        results.append({
            n: per[n] if n in per else torch.zeros(out.batch_size, *params[n].shape, dtype=params[n].dtype, device=params[n].device)
            for n in param_names
        })
    return out, results
