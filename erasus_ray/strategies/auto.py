"""``auto``: pick a concrete strategy and its settings from the task, the data sizes and a budget, by a fixed,
documented rule, and report which rule fired."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from erasus_ray.errors import InvalidConfigError
from erasus_ray.strategies._meta import MetaReport, Stage, _MetaBase, merge_reports, run_stage
from erasus_ray.strategies.base import STRATEGIES, UnlearnContext
from erasus_ray.tasks import Capability, capability_set

if TYPE_CHECKING:
    from erasus_ray.runners.local import LocalRunner

BUDGETS: tuple[str, ...] = ("low", "balanced", "high", "exact")
#: Factor on the chosen strategy's default epochs per named budget.
EPOCH_FACTOR: dict[str, float] = {"low": 0.25, "balanced": 1.0, "high": 2.0}


@dataclass
class AutoChoice:
    """What :class:`Auto` decided: a registry name, its hyperparameters, the runner settings it sets, the rule
    that fired and why."""

    strategy: str
    params: dict[str, Any] = field(default_factory=dict)
    runner: dict[str, Any] = field(default_factory=dict)
    rule: str = ""
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose(
    capabilities: Iterable[Capability | str],
    n_forget: int,
    n_retain: int,
    *,
    can_retrain: bool = False,
    budget: str | int = "balanced",
    retrain_ratio: float = 1.0,
) -> AutoChoice:
    """The rule of :class:`Auto` (first match wins; see its docstring for why each branch picks what it picks).

    Args:
        capabilities: what the task adapter declares (``task.capabilities``; the rule reads ``tokens``, ``labels``,
            ``logits``).
        n_forget: size of the whole forget set (not the coreset).
        n_retain: size of the retain set (0 if none).
        can_retrain: the original training recipe is known (``recipe=`` given to the unlearner).
        budget: ``"low"`` | ``"balanced"`` | ``"high"`` | ``"exact"``, or an int: at most that many optimizer steps.
        retrain_ratio: retrain exactly when ``n_retain <= retrain_ratio * n_forget`` and ``can_retrain``.
    """
    budget = _check_budget(budget)
    caps = capability_set(capabilities, "auto: task capabilities")
    if budget == "exact":
        if n_retain == 0:
            raise InvalidConfigError("auto: budget='exact' retrains on the retain set, but no retain data was given")
        return AutoChoice(
            "retrain", rule="exact", reason="budget='exact': retrain on the retain set, the definition of exact unlearning"
        )
    if n_retain == 0:
        choice = AutoChoice(
            "gradient_ascent",
            rule="no_retain",
            reason="no retain set: only forget-only objectives apply; gradient ascent at its small default lr "
            "(1e-4, 5 epochs), which has no retain term to protect utility - pass retain data for grad_diff / npo",
        )
    elif can_retrain and n_retain <= retrain_ratio * n_forget:
        return AutoChoice(
            "retrain",
            rule="small_retain",
            reason=f"retain set ({n_retain}) <= {retrain_ratio:g} x forget set ({n_forget}) and the training recipe "
            "is known: retraining costs about as much as approximate unlearning here and is exact",
        )
    elif {Capability.TOKENS, Capability.LOGITS} <= caps:
        choice = AutoChoice(
            "npo",
            {"beta": 0.1, "alpha": 1.0},
            rule="lm",
            reason="token sequences (a language model) with retain data: NPO+RT (Zhang et al. 2024, beta=0.1 as on TOFU) - its forget term is "
            "bounded, so it avoids the collapse of gradient ascent on LMs",
        )
    elif {Capability.LABELS, Capability.LOGITS} <= caps:
        choice = AutoChoice(
            "grad_diff",
            {"gamma": 1.0, "alpha": 1.0, "forget_loss_cap": "uniform"},
            rule="classifier",
            reason="class labels with retain data (a classifier): grad_diff with its forget loss capped at log C, measured to reach "
            "forget accuracy 0 at retain accuracy 0.99 on digits",
        )
    else:
        capped = Capability.LOGITS in caps  # the log C cap reads C off the logits
        choice = AutoChoice(
            "grad_diff",
            {"gamma": 1.0, "alpha": 1.0, "forget_loss_cap": "uniform" if capped else None},
            rule="other_task",
            reason=f"a task with {', '.join(sorted(map(str, caps)))} and retain data: grad_diff only needs per-sample "
            "losses, so it applies to any task adapter" + ("" if capped else " (uncapped: the task has no logits)"),
        )
    default_epochs = STRATEGIES.get(choice.strategy).default_epochs
    if isinstance(budget, int):
        choice.runner["max_steps"] = budget
        choice.reason += f"; budget={budget}: at most {budget} optimizer steps"
    elif budget != "balanced":
        epochs = max(1, round(default_epochs * EPOCH_FACTOR[budget]))
        choice.runner["epochs"] = epochs
        choice.reason += f"; budget={budget!r}: {epochs} epochs instead of {default_epochs}"
    return choice


def _check_budget(budget: str | int) -> str | int:
    if isinstance(budget, bool):
        raise InvalidConfigError(f"auto: budget must be one of {list(BUDGETS)} or a positive int, got {budget!r}")
    if isinstance(budget, int):
        if budget < 1:
            raise InvalidConfigError(f"auto: budget (max optimizer steps) must be >= 1, got {budget}")
        return budget
    if budget not in BUDGETS:
        raise InvalidConfigError(f"auto: budget must be one of {list(BUDGETS)} or a positive int, got {budget!r}")
    return budget


@STRATEGIES.register("auto")
class Auto(_MetaBase):
    """Choose a strategy from (task, forget size vs retain size, whether retain data exists, budget), run it, and
    report the choice (``result.report.choice``: strategy, params, runner settings, rule, reason).

    No paper proposes this rule; it encodes the library's measured defaults. First match wins:

    1. ``exact``: ``budget="exact"`` -> ``retrain`` (an error without retain data).
    2. ``no_retain``: no retain data -> ``gradient_ascent`` (its defaults: lr 1e-4, 5 epochs).
    3. ``small_retain``: recipe known and ``n_retain <= retrain_ratio * n_forget`` -> ``retrain``.
    4. ``lm``: a task with ``tokens`` and ``logits`` (a causal LM) -> ``npo`` (beta 0.1, alpha 1: NPO+RT).
    5. ``classifier``: a task with ``labels`` and ``logits`` -> ``grad_diff`` (forget loss capped at log C).
    6. ``other_task``: any other task -> ``grad_diff`` (capped at log C where the task has logits, else uncapped).

    Why: NPO's bounded forget term avoids the catastrophic collapse of ascent on LMs (Zhang et al., COLM 2024);
    capped grad_diff reached forget accuracy 0 at retain accuracy 0.99 on digits; retraining costs
    ``recipe.epochs x n_retain`` sample-steps against ``~2 x epochs x n_coreset`` for grad_diff, so when the retain
    set is no larger than the forget set retraining costs about the same and is exact. Without retain data only
    forget-only objectives apply. The budget scales the chosen strategy's default epochs (``low`` 1/4, ``high``
    2x) or, as an int, caps optimizer steps. Epochs or lr set explicitly on the unlearner win over the rule.

    Args:
        budget: ``"low"`` | ``"balanced"`` | ``"high"`` | ``"exact"``, or an int (max optimizer steps).
        retrain_ratio: threshold of the ``small_retain`` rule (retain size / forget size), >= 0.

    Cost: that of the chosen strategy (measured: the same as calling it by name, bit for bit).

    Example:
        >>> result = ErasusUnlearner(model, strategy="auto", selector=None).fit(forget_data=f, retain_data=r)
        >>> result.report.choice["strategy"], result.report.choice["reason"]
    """

    #: picks by the task's capabilities at run time; the strategy it picks is checked then.
    requires = frozenset({Capability.LOSS})

    def __init__(self, budget: str | int = "balanced", retrain_ratio: float = 1.0) -> None:
        super().__init__()
        self.budget = _check_budget(budget)
        self.retrain_ratio = self.check_range("retrain_ratio", retrain_ratio, 0.0, 1e6)
        self._choice: AutoChoice | None = None

    @property
    def choice(self) -> AutoChoice | None:
        """The last run's decision (None before the first run)."""
        return self._choice

    def decide(self, ctx: UnlearnContext) -> AutoChoice:
        full = ctx.full_forget if ctx.full_forget is not None else ctx.forget
        return choose(
            ctx.task.capabilities,
            len(full),
            0 if ctx.retain is None else len(ctx.retain),
            can_retrain=ctx.recipe is not None,
            budget=self.budget,
            retrain_ratio=self.retrain_ratio,
        )

    def unlearn(self, ctx: UnlearnContext, runner: "LocalRunner") -> MetaReport:
        choice = self.decide(ctx)
        overrides = ctx.state.get("runner_overrides", {})
        runner_kwargs = dict(choice.runner)
        if overrides.get("epochs") is not None and "epochs" in runner_kwargs:
            del runner_kwargs["epochs"]  # the caller's explicit epochs win over the budget's
            choice.reason += f" (overridden: epochs={overrides['epochs']} set by the caller)"
        stage = Stage(STRATEGIES.create(choice.strategy, **choice.params), runner_kwargs)
        report, config, seconds = run_stage(stage, ctx, runner)
        merged = merge_reports([(choice.strategy, report, config, seconds)])
        merged.choice = choice.to_dict()
        self._choice = choice
        return merged
