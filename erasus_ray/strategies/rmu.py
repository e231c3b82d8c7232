"""Representation Misdirection for Unlearning, RMU (Li, Pan, Gopal, ... & Hendrycks, ICML 2024, "The WMDP
Benchmark: Measuring and Reducing Malicious Use With Unlearning")."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from erasus_ray.data import Batch, make_loader
from erasus_ray.errors import InvalidConfigError
from erasus_ray.strategies.base import STRATEGIES, Strategy, UnlearnContext, weighted_mean
from erasus_ray.tasks import Capability


def _first_tensor(output: Any) -> torch.Tensor:
    """The activation a module produced (transformer blocks return tuples whose first element is the hidden state)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise InvalidConfigError(f"rmu: the hooked module returned {type(output).__name__}, not a tensor")


def activations(ctx: UnlearnContext, batch: Batch, layer: str, model: nn.Module | None = None) -> torch.Tensor:
    """Activations of ``batch`` at ``layer`` (``[B, D]`` or ``[B, T, D]``).

    ``layer="auto"``: the task adapter's penultimate features (the input of a classifier's last Linear; an LM's
    final hidden state averaged over the answer positions). Otherwise the output of the module of that name,
    caught with a forward hook.
    """
    model = model or ctx.model
    if layer == "auto":
        feats = ctx.forward(batch, model=model, features=True).features
        assert feats is not None
        return feats
    captured: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: captured.append(_first_tensor(o)))
    try:
        ctx.forward(batch, model=model)
    finally:
        handle.remove()
    if not captured:
        raise InvalidConfigError(f"rmu: module {layer!r} was not called in the forward pass")
    return captured[0]


def per_sample_mse(acts: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[B]`` mean squared error over every position and feature of each sample."""
    return (acts.float() - target.float()).pow(2).flatten(1).mean(1)


@STRATEGIES.register("rmu")
class RMU(Strategy):
    """Misdirect the forget activations at layer ``l`` to a fixed random vector; pin the retain activations.

    ``loss = mean_i MSE(h_l(x_i^f), c*u) + alpha * mean_j MSE(h_l(x_j^r), h_l^frozen(x_j^r))`` where ``u`` is a
    random unit vector (``U[0,1)^D`` normalised, seeded by the run's seed) and ``h^frozen`` is the model before
    unlearning. Only the parameters up to layer ``l`` are updated (the paper updates a few MLPs below ``l``): the
    layers after it are frozen, so once the forget activations sit at ``c*u`` the rest of the network reads noise.

    Args:
        layer: ``"auto"`` (the adapter's penultimate features: the input of a classifier's head, an LM's final
            hidden state over the answer tokens) or the name of a module whose output is steered (e.g.
            ``"transformer.h.3"`` for the 4th GPT-2 block). No model-type branching: names or the adapter only.
            A named module's MSE averages over all its positions (padding included).
        steering_coef: ``c``. ``None`` (default) sets ``c = steering_scale * mean ||h_l(x^f)||`` of the frozen
            model on the coreset, since the paper's absolute values (6.5 for Zephyr-7B layer 7) depend on the
            model's activation scale.
        steering_scale: the multiple used when ``steering_coef`` is None.
        alpha: weight of the retain MSE (paper: 1200 for Zephyr, where activations are small relative to c).
        update_params: names (or name prefixes) of the parameters to update; None = every parameter the
            layer-``l`` activations depend on (found by autograd in :meth:`setup`). Others get no gradient step.
            A weight tied to an upstream one (GPT-2's ``lm_head`` is ``wte``) moves with it.

    Defaults (lr 3e-3, 20 epochs, steering_scale 4, alpha 10, Adam), measured on digits with class 3 forgotten
    (full forget set of 146, batch 32; ``layer="auto"`` = the 128-d input of the head, c = 110; gold retrained
    model: retain acc 0.998, test acc 0.869): forget acc 1.0 -> 0.0, retain acc 0.990, test acc 0.869. At lr 1e-3 x
    10 epochs the features do not reach c*u (forget acc 0.71); alpha 1 reaches it but costs retain acc (0.90).
    On a classifier the steered features all map to the head's class for ``u`` (here 8): with few classes, check
    it is not the forgotten one (another seed changes ``u``).

    Cost: setup = one forward+backward on a coreset batch, one forward over the coreset, a frozen copy of the model;
    per step one forward+backward on forget and retain and one frozen forward on retain.

    Example:
        >>> ErasusUnlearner(model, strategy="rmu", selector=None, layer="transformer.h.3").fit(forget_data=f, retain_data=r)
    """

    #: layer='auto' steers the adapter's penultimate features (another layer: loss only; see requirements()).
    requires = frozenset({Capability.FEATURES})

    needs_retain = True
    default_lr = 3e-3
    default_epochs = 20

    def __init__(
        self,
        layer: str = "auto",
        steering_coef: float | None = None,
        steering_scale: float = 4.0,
        alpha: float = 10.0,
        update_params: tuple[str, ...] | list[str] | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(layer, str) or not layer:
            raise InvalidConfigError(f"rmu: layer must be 'auto' or a module name, got {layer!r}")
        self.layer = layer
        if steering_coef is not None:
            steering_coef = self.check_range("steering_coef", steering_coef, 0.0, 1e6, low_open=True)
        self.steering_coef = steering_coef
        self.steering_scale = self.check_range("steering_scale", steering_scale, 0.0, 1e6, low_open=True)
        self.alpha = self.check_range("alpha", alpha, 0.0, 1e9)
        if isinstance(update_params, str):
            update_params = (update_params,)
        self.update_params = None if update_params is None else tuple(update_params)

    def requirements(self) -> frozenset[Capability]:
        """``layer="auto"`` reads the adapter's features; a named layer is hooked on the model itself."""
        return type(self).requires if self.layer == "auto" else frozenset({Capability.LOSS})

    # --- setup: frozen copy, control vector, which parameters may move ----------------------------------------
    def setup(self, ctx: UnlearnContext) -> None:
        model = ctx.model
        if self.layer != "auto":
            try:
                model.get_submodule(self.layer)
            except AttributeError as err:
                names = [n for n, _ in model.named_modules() if n][:30]
                raise InvalidConfigError(f"rmu: no module named {self.layer!r}; some names: {names}") from err
        frozen = copy.deepcopy(model).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)

        loader = make_loader(ctx.forget, ctx.task.collate, batch_size=64)
        norms: list[torch.Tensor] = []
        with torch.no_grad():
            for batch in loader:
                acts = activations(ctx, batch.to(ctx.device), self.layer, model=frozen)
                norms.append(acts.float().norm(dim=-1).flatten())
        dim = acts.shape[-1]
        coef = self.steering_coef
        if coef is None:
            coef = self.steering_scale * float(torch.cat(norms).mean())
        g = torch.Generator().manual_seed(int(ctx.seed))
        direction = torch.rand(dim, generator=g)
        control = (coef * direction / direction.norm()).to(ctx.device)

        ctx.state["rmu_frozen"] = frozen
        ctx.state["rmu_control"] = control
        ctx.state["rmu_coef"] = coef
        ctx.state["rmu_update"] = self._updated(ctx, next(iter(loader)).to(ctx.device))

    def _updated(self, ctx: UnlearnContext, batch: Batch) -> set[int]:
        """ids of the parameters that may move: named ones, or those upstream of layer ``l``."""
        named = list(ctx.model.named_parameters())
        if self.update_params is not None:
            chosen = {id(p) for n, p in named if any(n == k or n.startswith(k + ".") for k in self.update_params)}
            if not chosen:
                raise InvalidConfigError(f"rmu: update_params {list(self.update_params)} match no parameter")
            return chosen
        params = [p for _, p in named if p.requires_grad]
        was_training = ctx.model.training
        ctx.model.eval()
        try:
            acts = activations(ctx, batch, self.layer)
            grads = torch.autograd.grad(acts.float().sum(), params, allow_unused=True)
        finally:
            ctx.model.train(was_training)
        return {id(p) for p, g in zip(params, grads) if g is not None}

    # --- the objective --------------------------------------------------------------------------------------
    def loss(self, ctx: UnlearnContext, forget: Batch | None, retain: Batch | None) -> tuple[torch.Tensor, dict[str, Any]]:
        control = ctx.state["rmu_control"]
        forget_acts = activations(ctx, forget, self.layer)
        forget_loss = weighted_mean(per_sample_mse(forget_acts, control.expand_as(forget_acts)), forget)
        if retain is not None and self.alpha > 0:
            retain_acts = activations(ctx, retain, self.layer)
            with torch.no_grad():
                frozen_acts = activations(ctx, retain, self.layer, model=ctx.state["rmu_frozen"])
            retain_loss = per_sample_mse(retain_acts, frozen_acts).mean()
        else:
            retain_loss = forget_loss.new_zeros(())
        total = forget_loss + self.alpha * retain_loss
        return total, {"forget_mse": forget_loss.detach(), "retain_mse": retain_loss.detach()}

    def before_step(self, ctx: UnlearnContext) -> None:
        keep = ctx.state["rmu_update"]
        for p in ctx.model.parameters():
            if id(p) not in keep:
                p.grad = None  # layers after l stay as they were (Adam skips parameters without a gradient)

    def finish(self, ctx: UnlearnContext) -> None:
        ctx.state.pop("rmu_frozen", None)  # free the frozen copy
