"""The strategy contract: an objective on a paired (forget batch, retain batch) step.

Following OpenUnlearning, a method is a loss and the loop is shared: a loss-based strategy defines
:meth:`Strategy.loss` (plus optional :meth:`setup` / :meth:`before_step` / :meth:`finish` hooks) and a runner
(:mod:`erasus_ray.runners`) executes it - in process, in Ray Train workers, or in a Flower client. Methods that
are not losses (retraining, Fisher noise, Newton steps, shard retraining) override :meth:`unlearn` directly.

Each runner step pairs one forget batch of the coreset with one retain batch drawn from a cycling retain
iterator, so the cost of an epoch is proportional to the coreset size, not to the retain set. A step is usually one
optimizer step on one loss; a strategy whose algorithm alternates objectives (SCRUB's max- and min-steps) yields
several losses from :meth:`Strategy.step_losses`, each minimised by its own optimizer step at the weights the
previous one left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Protocol

import torch
from torch import nn

from erasus_ray.data import Batch, IdDataset
from erasus_ray.checks import check_real
from erasus_ray.errors import InvalidConfigError
from erasus_ray.registry import Registry
from erasus_ray.runner_io import RunnerConfig, RunReport
from erasus_ray.tasks import Capability, Task, TaskOutput, capability_set, require, require_one_of

STRATEGIES: Registry["Strategy"] = Registry("strategy")

#: One optimizer step's objective from :meth:`Strategy.step_losses`: ``(loss, logs)`` or ``(loss, logs, phase)``.
StepLoss = tuple[torch.Tensor, dict[str, Any]] | tuple[torch.Tensor, dict[str, Any], str]


def weighted_mean(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean of per-sample ``values`` weighted by the batch's coreset weights (plain mean without weights)."""
    if batch.weights is None:
        return values.mean()
    w = batch.weights.to(values.device, values.dtype)
    return (values * w).sum() / w.sum().clamp_min(1e-12)


@dataclass
class UnlearnContext:
    """Everything a strategy may read during a run.

    Attributes:
        model: the model being unlearned (modified in place).
        task: its task adapter.
        forget: the forget samples the strategy runs on (the coreset), by id.
        retain: the retain set, by id (may be None for forget-only strategies).
        device: where the model lives.
        seed: the run's seed.
        full_forget: the whole forget set (for strategies or monitors that need it; never iterated by default).
        model_factory: builds a fresh, untrained model (used by ``retrain``).
        recipe: the original training recipe (used by ``retrain``).
        state: scratch space for the strategy (reference outputs, masks, ...). Under a distributed runner what
            ``unlearn`` put here on the driver travels to every worker (it must pickle).
        epoch, step, total_steps: set by the runner before every step: the 0-based epoch, the runner steps already
            taken (a resumed run continues the count) and the planned number of steps (None outside a runner).
    """

    model: nn.Module
    task: Task
    forget: IdDataset
    retain: IdDataset | None
    device: torch.device
    seed: int = 0
    full_forget: IdDataset | None = None
    model_factory: Callable[[], nn.Module] | None = None
    recipe: Any = None
    forget_weights: dict[int, float] | None = None
    state: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    step: int = 0
    total_steps: int | None = None

    def forward(self, batch: Batch, *, model: nn.Module | None = None, features: bool = False) -> TaskOutput:
        return self.task.forward(model or self.model, batch.data, features=features)


class Strategy:
    """Base class for unlearning strategies.

    Class attributes say how the runner drives it:
        needs_retain: a retain batch is paired with every forget step (error if no retain data is given).
        uses_forget: the objective reads the forget batch (False only for retain-only baselines).
        default_lr / default_epochs: used when the caller does not set them; chosen so that the defaults
            measurably unlearn a converged model (see the effect tests).
    """

    name: ClassVar[str] = "strategy"
    needs_retain: ClassVar[bool] = False
    uses_forget: ClassVar[bool] = True
    default_lr: ClassVar[float] = 1e-3
    default_epochs: ClassVar[int] = 10
    default_optimizer: ClassVar[str] = "adam"
    #: The task capabilities this strategy reads (:class:`~erasus_ray.tasks.Capability`; ``loss`` is always
    #: included). Parsed at class definition (a misspelt name fails at import) and checked once against the task
    #: at ``ErasusUnlearner`` construction / ``fit`` (:meth:`check_task`), before any training step.
    requires: ClassVar[frozenset[Capability]] = frozenset({Capability.LOSS})
    #: At least one of these must be provided too (empty: no constraint), e.g. a preference objective's responses are
    #: answer tokens (``tokens``) or class labels (``labels``). Checked with ``requires`` by :meth:`check_task`.
    requires_one_of: ClassVar[frozenset[Capability]] = frozenset()
    #: Why the generic registry contract (a plain model + forget/retain sets) cannot run this strategy, e.g. it
    #: needs a SISA-trained ensemble or a convex head; such strategies carry their own method-specific tests.
    contract_exempt_reason: ClassVar[str | None] = None
    #: Why the generic contract's token-sequence fixture (a tiny LM forgetting random sequences exchangeable with the
    #: retain ones) cannot show this strategy's effect though the strategy runs on it (a concept-level method); its
    #: own tests use a concept LM. Not a capability: the strategy does run on such a task.
    lm_contract_exempt_reason: ClassVar[str | None] = None
    #: Why this strategy cannot run under a distributed runner (``backend="ray_train"``): it computes its update in
    #: the calling process instead of through ``runner.run`` (Fisher noise, SSD dampening, Newton steps, shard
    #: retraining). None: every optimizer step it takes goes through the runner. See :meth:`driver_only`.
    driver_only_reason: ClassVar[str | None] = None
    #: What :meth:`setup` must see: ``"coreset"`` (set-level statistics - saliency masks, Fisher diagonals, means -
    #: for which the coreset stands in) or ``"forget"`` (per-id tables from the original model - NPO's reference
    #: likelihoods, preference pairs, teacher targets): under the closed loop's adaptive coreset such a setup runs
    #: over the whole forget set, so that a sample joining the coreset later has its entry.
    setup_scope: ClassVar[str] = "coreset"
    #: For a strategy that computes its update itself: ``(hyperparameter, factor)`` - the knob that makes it forget
    #: more and the factor one step of the closed loop's search multiplies it by (Fisher noise scale x3; SSD's
    #: selection threshold x0.5); the search also divides by it where the default breaks the guard, and bisects
    #: (:class:`~erasus_ray.control.strength.StrengthSearch`). None: no knob; such a strategy is verified once.
    strength: ClassVar[tuple[str, float] | None] = None
    #: Why the closed loop cannot drive this strategy's runner steps (they train something other than the model being
    #: unlearned, e.g. DExperts' anti-expert): it then runs its fixed defaults and is verified once. None: it can.
    closed_loop_reason: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.requires = capability_set(cls.requires, f"strategy {cls.__name__}.requires") | {Capability.LOSS}
        cls.requires_one_of = capability_set(cls.requires_one_of, f"strategy {cls.__name__}.requires_one_of")

    def __init__(self, **hparams: Any) -> None:
        if hparams:
            raise InvalidConfigError(f"{self.name} got unknown hyperparameters: {sorted(hparams)}")

    def requirements(self) -> frozenset[Capability]:
        """What this configured instance reads: the class's ``requires``, refined where a hyperparameter changes it
        (meta strategies: the union of their stages'; ``grad_diff`` without its ``log C`` cap needs no logits)."""
        return type(self).requires

    def check_task(self, task: Task) -> None:
        """Raise :class:`~erasus_ray.tasks.CapabilityError` naming this strategy, the task and what is missing
        unless ``task`` provides :meth:`requirements`. Cost: a set difference."""
        require(task, self.requirements(), algorithm=f"strategy {self.name!r}")
        require_one_of(task, self.requires_one_of, algorithm=f"strategy {self.name!r}")

    # --- hooks -----------------------------------------------------------------------------------------
    def setup(self, ctx: UnlearnContext) -> None:
        """Called once before the first step (reference outputs, masks, Fisher, ...)."""

    def loss(self, ctx: UnlearnContext, forget: Batch | None, retain: Batch | None) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective of one paired step; returns ``(loss, logs)``. Minimised by the runner."""
        raise NotImplementedError(f"{self.name} defines no single paired loss; it overrides step_losses() or unlearn()")

    def step_losses(self, ctx: UnlearnContext, forget: Batch | None, retain: Batch | None) -> Iterator[StepLoss]:
        """The losses of one runner step, in order, each minimised by its own optimizer step.

        A generator of ``(loss, logs)`` or ``(loss, logs, phase)``: the runner applies the optimizer step of one
        loss before asking for the next, so a later loss is computed at the weights the earlier steps left (SCRUB's
        min-step after its max-step). Losses of the same ``phase`` (a name; default ``"main"``) share one optimizer
        state, each other phase gets its own optimizer of the same kind (Adam's moment estimates belong to one
        objective). Default: the single paired :meth:`loss`. The number of losses may depend on ``ctx.epoch`` /
        ``ctx.step`` but not on the batches' content, so data-parallel workers take the same synchronised steps.
        """
        yield self.loss(ctx, forget, retain)

    def before_step(self, ctx: UnlearnContext) -> None:
        """Called after backward, before the optimizer step (e.g. to mask gradients)."""

    def finish(self, ctx: UnlearnContext) -> None:
        """Called once after the last step."""

    # --- entry point -----------------------------------------------------------------------------------
    def unlearn(self, ctx: UnlearnContext, runner: Runner) -> RunReport:
        """Run the strategy. Loss-based strategies let the runner drive them; others override this."""
        return runner.run(self, ctx)

    def driver_only(self) -> str | None:
        """Why this strategy, as configured, would compute in the calling process rather than through the runner
        (so a distributed runner must refuse it), or None. Meta strategies also answer for their stages."""
        return self.driver_only_reason

    def hparams(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def check_range(self, name: str, value: float, low: float, high: float, *, low_open: bool = False) -> float:
        """``value`` as a float in ``[low, high]`` (``(low, high]`` with ``low_open``); a non-number (``"0.1"``,
        ``True``) or NaN is an :class:`InvalidConfigError` naming the strategy and the hyperparameter."""
        finite_high = None if high == float("inf") else high
        finite_low = None if low == float("-inf") else low
        return check_real(f"{self.name}: {name}", value, low=finite_low, high=finite_high, low_open=low_open)  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.hparams().items())})"


class Runner(Protocol):
    """What a strategy may use of the runner executing it (:class:`~erasus_ray.runners.LocalRunner`,
    :class:`~erasus_ray.runners.ray_train.RayTrainRunner`, a Flower client's): its settings and its loop. Declared
    here, with the strategy contract, so that this module does not import the runners (they import it)."""

    config: RunnerConfig

    def run(self, strategy: Strategy, ctx: UnlearnContext) -> RunReport:
        """Set up, run the paired forget/retain steps, finish; the report of what was done."""
        ...


def add_retain_loss(ctx: UnlearnContext, total: torch.Tensor, logs: dict, retain: Batch | None,
                    alpha: float) -> torch.Tensor:
    """``total + alpha *`` the retain batch's mean per-sample loss through the task adapter (logged as
    ``retain_loss``): the preservation term many strategies share (a diffusion model's denoising loss: EraseDiff's,
    SalUn's, concept ablation's regulariser). Unchanged without a retain batch or at ``alpha = 0``. Cost: one
    forward+backward over the retain batch."""
    if retain is None or alpha <= 0:
        return total
    retain_loss = ctx.forward(retain).sample_loss().mean()
    logs["retain_loss"] = retain_loss.detach()
    return total + alpha * retain_loss


def refuse_driver_only(strategy: Strategy, where: str = "backend='ray_train'") -> None:
    """Raise :class:`InvalidConfigError` if ``strategy`` would compute in the calling process (see
    :meth:`Strategy.driver_only`): a distributed runner must not silently run it on the driver."""
    reason = strategy.driver_only()
    if reason:
        raise InvalidConfigError(
            f"strategy {strategy.name!r} cannot run under {where}: {reason}. Use backend='local' for it"
        )
