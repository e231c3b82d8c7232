"""``pipeline``: run several strategies one after another on the same model (the seed package's
``StrategyPipeline``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from erasus_ray.strategies._meta import MetaReport, Stage, _MetaBase, make_stages, merge_reports, run_stage
from erasus_ray.strategies.base import STRATEGIES, UnlearnContext
from erasus_ray.tasks import Capability

if TYPE_CHECKING:
    from erasus_ray.runners.local import LocalRunner

#: The default chain: capped ascent on the forget coreset (``grad_diff`` with ``alpha=0``: each sample's loss is
#: pushed up only until it reaches log C, the loss of a uniform guess) at lr 1e-3 until no coreset sample is
#: predicted correctly or 20 epochs pass, then 5 epochs of fine-tuning on the retain set. Measured on digits (seed
#: 0, full forget set; accuracies forget / retain / test):
#:
#: - class 3 removed: 1.000 / 0.998 / 0.975 -> 0.000 / 0.993 / 0.864 (gold 0.000 / 0.998 / 0.869), 10 + 25 steps;
#: - random 10%: 1.000 / 0.998 / 0.975 -> 0.938 / 0.971 / 0.950 (gold 0.972 / 0.998 / 0.967).
#:
#: Uncapped ``gradient_ascent`` in the first stage (same lr and stop) matched it on the class but collapsed the
#: random-10% model to chance (retain 0.10) because the stop is never reached there; at its default lr 1e-4 x 5
#: epochs it left forget accuracy at 0.46 on the class. ``grad_diff`` with ``alpha=0`` still draws (and forwards)
#: a retain batch per step, which costs time but does not enter the objective.
DEFAULT_STAGES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("grad_diff", {"alpha": 0.0, "lr": 1e-3, "epochs": 20, "forget_target": 0.0}),
    ("fine_tune", {"epochs": 5}),
)


@STRATEGIES.register("pipeline")
class StrategyPipeline(_MetaBase):
    """Run strategies in order on the same model, e.g. ascent on the forget set, then a retain-only repair.

    There is no paper behind chaining itself; it is how unlearning baselines are composed in practice (e.g.
    NegGrad followed by fine-tuning, the "NegGrad+FT"-style repair of Kurmanji et al., NeurIPS 2023, "Towards
    Unbounded Machine Unlearning"), and the seed package's ``StrategyPipeline`` API, whose shape this keeps.

    Each stage is a registry name, a ``(name, {kwargs})`` pair, a :class:`Strategy` instance, or an
    ``(instance, {runner kwargs})`` pair. ``kwargs`` mix the strategy's hyperparameters and runner settings
    (``lr``, ``epochs``, ``optimizer``, ``batch_size``, ``grad_clip``, ``forget_target``, ``max_steps``, ...);
    both reach the stage. A stage without its own ``lr`` / ``epochs`` / ``optimizer`` takes the value the caller
    set on :class:`~erasus_ray.ErasusUnlearner`, else its strategy's default. Every stage starts from the seed
    with a fresh ``ctx.state``, so ``pipeline(a, b)`` gives bit for bit the model of running ``a`` then ``b``
    with two ``ErasusUnlearner.fit`` calls (same seed, selector=None or the same coreset).

    The coreset is selected once, on the original model, and every stage runs on it.

    Args:
        stages: the strategies, in order (default :data:`DEFAULT_STAGES`: capped ascent until the coreset is
            forgotten, then ``fine_tune`` for 5 epochs; see that constant for what it was measured to do).

    Cost: the sum of the stages' costs. The report (:class:`~erasus_ray.strategies._meta.MetaReport`) sums
    steps, samples and seconds and keeps each stage's report and runner config under ``stages``.

    Example:
        >>> pipeline = StrategyPipeline([("gradient_ascent", {"epochs": 3, "lr": 1e-4}), ("fine_tune", {"epochs": 2})])
        >>> result = ErasusUnlearner(model, strategy=pipeline, selector=None).fit(forget_data=f, retain_data=r)
        >>> [s["strategy"] for s in result.report.stages]
        ['gradient_ascent', 'fine_tune']
    """

    #: nothing of its own: requirements() is the union of its stages'.
    requires = frozenset({Capability.LOSS})

    def __init__(self, stages: Sequence[Any] | None = None) -> None:
        super().__init__()
        self._stages: list[Stage] = make_stages(DEFAULT_STAGES if stages is None else stages, owner="pipeline")
        inner = [s.strategy for s in self._stages]
        # Instance attributes: the unlearner checks them before running (retain data); requirements() unions the stages'.
        self.needs_retain = any(s.needs_retain for s in inner)
        self.uses_forget = any(s.uses_forget for s in inner)
        first = self._stages[0]
        self.default_lr = first.runner_kwargs.get("lr", first.strategy.default_lr)
        self.default_epochs = first.runner_kwargs.get("epochs", first.strategy.default_epochs)
        self.default_optimizer = first.runner_kwargs.get("optimizer", first.strategy.default_optimizer)

    @property
    def stages(self) -> list[Stage]:
        return list(self._stages)

    def inner_stages(self) -> list[Stage]:
        return list(self._stages)

    def hparams(self) -> dict[str, Any]:
        return {"stages": [stage.describe() for stage in self._stages]}

    def unlearn(self, ctx: UnlearnContext, runner: "LocalRunner") -> MetaReport:
        parts = []
        for stage in self._stages:
            report, config, seconds = run_stage(stage, ctx, runner)
            parts.append((stage.strategy.name, report, config, seconds))
        return merge_reports(parts)

    def __repr__(self) -> str:
        return f"StrategyPipeline({[(s.strategy.name, s.runner_kwargs) for s in self._stages]!r})"
