"""Activation steering with a contrastive mean-difference vector (Turner, Thiergart, Udell, Leech, Mini &
MacDiarmid, 2023, "Activation Addition: Steering Language Models Without Optimization"; Rimsky, Gabrieli, Schulz,
Tong, Hubinger & Turner, ACL 2024, "Steering Llama 2 via Contrastive Activation Addition")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from erasus_ray.data import IdDataset, make_loader
from erasus_ray.errors import InvalidConfigError
from erasus_ray.strategies._inference import (
    InferenceWrapper,
    first_tensor,
    get_module,
    head_module,
    pooled,
    replace_first,
)
from erasus_ray.strategies.base import STRATEGIES, Strategy, UnlearnContext
from erasus_ray.strategies.fisher_forgetting import retain_subset
from erasus_ray.tasks import Capability

if TYPE_CHECKING:
    from erasus_ray.runners.local import LocalRunner, RunReport

MODES = ("subtract", "project")


def steer(acts: torch.Tensor, vector: torch.Tensor, alpha: float | torch.Tensor, mode: str) -> torch.Tensor:
    """Steered activations along the last dimension: ``h - alpha * v`` (``subtract``) or
    ``h - alpha * (h . v_hat) v_hat`` (``project``; ``alpha = 1`` removes the direction entirely)."""
    v = vector.to(acts.dtype)
    if mode == "subtract":
        return acts - alpha * v
    unit = v / v.norm().clamp_min(torch.finfo(v.dtype).tiny)
    return acts - alpha * (acts @ unit).unsqueeze(-1) * unit


def resolve_layer(ctx: UnlearnContext, layer: str, who: str) -> tuple[str, bool]:
    """``(module name, steer its input)``: ``"auto"`` is the input of the adapter's head (a classifier's last
    Linear, an LM's output embedding); any other name is that module's output."""
    if layer != "auto":
        get_module(ctx.model, layer, who)
        return layer, False
    head = head_module(ctx)
    for name, module in ctx.model.named_modules():
        if module is head:
            return name, True
    raise InvalidConfigError(f"{who}: the head module is not a named submodule of the model")


def _capture(ctx: UnlearnContext, model: nn.Module, module: nn.Module, on_input: bool, data: Any) -> torch.Tensor:
    captured: list[torch.Tensor] = []
    if on_input:
        handle = module.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    else:
        handle = module.register_forward_hook(lambda m, i, o: captured.append(first_tensor(o)))
    try:
        args, kwargs = ctx.task.model_inputs(data)
        model(*args, **kwargs)
    finally:
        handle.remove()
    if not captured:
        raise InvalidConfigError("activation_steering: the steered layer was not called in the forward pass")
    return captured[0]


@torch.no_grad()
def mean_activation(
    ctx: UnlearnContext, data: IdDataset, layer: str, on_input: bool, *, weights: dict[int, float] | None = None,
    batch_size: int = 64,
) -> tuple[torch.Tensor, int]:
    """``(mean pooled activation, batches)`` of ``data`` at ``layer``, weighted by ``weights`` (id -> weight) if given.

    Pooling: a classifier's ``[B, D]`` as is; an LM's ``[B, T, D]`` averaged over the positions predicting answer
    tokens (see :func:`~erasus_ray.strategies._inference.pooled`)."""
    model = ctx.model
    module = model.get_submodule(layer)
    total: torch.Tensor | None = None
    weight_sum, batches = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in make_loader(data, ctx.task.collate, batch_size=batch_size, weights=weights):
            batch = batch.to(ctx.device)
            acts = pooled(_capture(ctx, model, module, on_input, batch.data).float(), batch.data)
            w = batch.weights.float() if batch.weights is not None else torch.ones(acts.shape[0], device=acts.device)
            part = (acts * w[:, None]).sum(0)
            total = part if total is None else total + part
            weight_sum += float(w.sum())
            batches += 1
    finally:
        model.train(was_training)
    assert total is not None
    return total / max(weight_sum, 1e-12), batches


class SteeredModel(InferenceWrapper):
    """``base`` with the activation of module ``layer`` steered by ``vector`` at every forward.

    ``on_input=True`` steers the module's input (``layer="auto"``: the head's input), else its output (the leading
    tensor of a transformer block's tuple). Steering applies at every position of a sequence. The hook is
    registered for the duration of each forward only, so copies and pickles of the wrapper carry no hooks.
    Rebuild from a ``state_dict``: ``SteeredModel(factory(), layer, torch.zeros(D), 0.0, mode, on_input)``.
    """

    def __init__(
        self, base: nn.Module, layer: str, vector: torch.Tensor, alpha: float, mode: str = "subtract", on_input: bool = False
    ) -> None:
        super().__init__(base)
        if mode not in MODES:
            raise InvalidConfigError(f"activation_steering: mode must be one of {MODES}, got {mode!r}")
        get_module(base, layer, "activation_steering")
        self.layer = layer
        self.mode = mode
        self.on_input = bool(on_input)
        self.register_buffer("vector", vector.detach().clone().float())
        self.register_buffer("alpha", torch.tensor([float(alpha)]))  # 1-d: model_hash cannot view a 0-d tensor

    def _steer(self, acts: torch.Tensor) -> torch.Tensor:
        return steer(acts, self.vector.to(acts.device), self.alpha.to(acts.device, acts.dtype), self.mode)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        module = self.base.get_submodule(self.layer)
        if self.on_input:
            handle = module.register_forward_pre_hook(lambda m, a: (self._steer(a[0]), *a[1:]))
        else:
            handle = module.register_forward_hook(lambda m, i, o: replace_first(o, self._steer(first_tensor(o))))
        try:
            return self.base(*args, **kwargs)
        finally:
            handle.remove()


@STRATEGIES.register("activation_steering")
class ActivationSteering(Strategy):
    """Compute ``v = mean h_l(forget) - mean h_l(retain)`` at layer ``l`` and return a wrapper that steers every
    forward away from it: ``h_l <- h_l - alpha * (h_l . v_hat) v_hat`` (``mode="project"``, the default: directional
    ablation as in Arditi et al., NeurIPS 2024, "Refusal in Language Models Is Mediated by a Single Direction") or
    ``h_l <- h_l - alpha * v`` (``mode="subtract"``: ActAdd / CAA's addition with the sign flipped). No weights
    change and nothing is trained.

    The papers add a contrastive vector (CAA: the mean difference of activations at the answer token over pairs of
    prompts with/without the behaviour) to steer towards a behaviour; here the "behaviour" is the forget set and the
    contrast is the retain set, and the vector is subtracted. Choices where the papers leave freedom:
        - the contrast is the unpaired means of the two sets (forget mean weighted by coreset weights);
        - an LM's activation is averaged over the positions that predict answer tokens (CAA: the answer-letter
          position), and steering applies at every position (ActAdd: from the injection position on);
        - ``layer="auto"``: the input of the adapter's head (a classifier's last Linear, an LM's output embedding,
          i.e. after the final layer norm); any module name (e.g. ``"transformer.h.3"``) steers that module's output.

    Args:
        layer: ``"auto"`` or a module name (see above).
        alpha: steering strength (``project``: 1.0 removes the direction; ``subtract``: 1.0 moves the forget mean
            exactly onto the retain mean - and every retain activation by the same ``-v``).
        mode: ``"project"`` (default) or ``"subtract"``.
        max_retain: estimate the retain mean on at most this many retain samples (seeded random subset); None: all.
        stats_batch_size: forward batch size for the means.

    Defaults (project, alpha 1, the head's input) measured on digits (class 3, full forget set of 146; original:
    forget acc 1.00, retain 0.998, test 0.975; gold retrained: 0.00 / 0.998 / 0.869): forget acc 0.00, retain 0.962,
    test 0.839. ``subtract`` shifts the retain activations too: alpha 0.5 gives forget 0.56 / retain 0.953, alpha 1.0
    forget 0.01 / retain 0.737. Steering the output of ``net.3`` (pre-ReLU) with subtract: forget 0.02 / retain 0.68.
    A mean difference needs a concept shared by the forget samples (a class, a topic): for forget samples that are
    exchangeable with the retain ones (the contract's tiny LM, 8 of 32 random sequences) there is no such direction
    and steering changes forget and retain fit alike (loss 0.02 -> 0.10 / 0.07 at alpha 1; 0.86 / 0.81 at alpha 2).

    Cost: one forward over the forget coreset and one over the retain set (or ``max_retain`` samples), no backward.
    The cost moves to inference: one hook per forward adds a ``[.., D]`` subtraction (negligible); the returned model
    holds the original weights plus one ``D``-vector.

    Example:
        >>> res = ErasusUnlearner(model, strategy="activation_steering", selector=None, mode="project").fit(
        ...     forget_data=f, retain_data=r)
        >>> res.model(x)     # steered logits; res.model.vector is v
    """

    #: layer='auto' steers the input of the adapter's head module (another layer: loss only; see requirements()).
    requires = frozenset({Capability.HEAD})

    needs_retain = True
    driver_only_reason = (
        "the steering vector is computed in the calling process (forward passes only) and applied at "
        "inference time"
    )
    lm_contract_exempt_reason = (
        "a mean-difference direction needs a concept shared by the forget samples; the contract LM forgets 8 random "
        "sequences exchangeable with the retain ones (tests/test_strategies_edit.py uses a concept LM instead)"
    )

    def __init__(
        self,
        layer: str = "auto",
        alpha: float = 1.0,
        mode: str = "project",
        max_retain: int | None = None,
        stats_batch_size: int = 64,
    ) -> None:
        super().__init__()
        if not isinstance(layer, str) or not layer:
            raise InvalidConfigError(f"activation_steering: layer must be 'auto' or a module name, got {layer!r}")
        if mode not in MODES:
            raise InvalidConfigError(f"activation_steering: mode must be one of {MODES}, got {mode!r}")
        self.layer = layer
        self.alpha = self.check_range("alpha", alpha, 0.0, 1e6)
        self.mode = mode
        if max_retain is not None and int(max_retain) < 1:
            raise InvalidConfigError(f"activation_steering: max_retain must be >= 1, got {max_retain!r}")
        self.max_retain = None if max_retain is None else int(max_retain)
        self.stats_batch_size = int(self.check_range("stats_batch_size", stats_batch_size, 1, 1e9))

    def requirements(self) -> frozenset[Capability]:
        """``layer="auto"`` reads the adapter's head module; a named layer is hooked on the model itself."""
        return type(self).requires if self.layer == "auto" else frozenset({Capability.LOSS})

    def vector(self, ctx: UnlearnContext) -> tuple[torch.Tensor, str, bool, int]:
        """``(v, module name, steer its input, batches)`` for this context."""
        name, on_input = resolve_layer(ctx, self.layer, "activation_steering")
        retain = retain_subset(ctx, self.max_retain)
        forget_mean, nf = mean_activation(ctx, ctx.forget, name, on_input, weights=ctx.forget_weights, batch_size=self.stats_batch_size)
        retain_mean, nr = mean_activation(ctx, retain, name, on_input, batch_size=self.stats_batch_size)
        return forget_mean - retain_mean, name, on_input, nf + nr

    def unlearn(self, ctx: UnlearnContext, runner: "LocalRunner") -> "RunReport":
        from erasus_ray.runners.local import RunReport

        v, name, on_input, batches = self.vector(ctx)
        ctx.model = SteeredModel(ctx.model, name, v, self.alpha, self.mode, on_input).eval()
        retain_n = len(retain_subset(ctx, self.max_retain))
        report = RunReport(steps=batches, epochs=1, forget_samples=len(ctx.forget), retain_samples=retain_n)
        report.history.append({"vector_norm": float(v.norm())})
        return report
