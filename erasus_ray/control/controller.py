"""The closed-loop runner: run a strategy until a measured forgetting criterion holds on the whole forget set.

A fixed ``epochs x lr`` budget tuned on one model forgets nothing on the next (a converged, very confident model)
or far too much (an LM pushed past the held-out loss). :class:`ClosedLoopRunner` replaces the guess with
measurements, every ``verify_every`` steps, by forward passes only (:class:`~erasus_ray.evaluation.verification.Probe`):

1. **Stop when the target holds** on the whole forget set (:mod:`erasus_ray.evaluation.verification`), not after a
   number of epochs; a model that already meets it is left unchanged.
2. **Utility guard**: when retain / held-out utility falls more than the guard allows, or forgetting overshoots the
   target, restore the last weights that passed, halve the step size (and never grow it past that again), raise the
   weight of an extra retain-descent step (0 -> 1 -> 2 -> ...), and continue.
3. **Step size found, not guessed**: starting from the strategy's default, the learning rate grows geometrically
   (``lr_growth``) after each window in which the coreset's mean forget loss moved less than ``min_progress`` of its
   log-distance to the target's reference loss (e.g. ``log C`` for a removed class, the held-out median loss), until
   the first window that moves; then it is kept (only a guard trip halves it).
4. **Adaptive coreset**: from a small coreset chosen by the selector, forget samples that still fail the target's
   per-sample criterion join - in the selector's order, at most doubling the coreset per verification - once the
   coreset's own samples pass but the whole forget set does not (the coreset did not stand in for the rest). The
   growth per round and the final fraction are reported: the measured redundancy of this forget set.
5. **Budget**: ``budget_steps`` runner steps and ``budget_seconds``, and ``patience`` verifications without getting
   closer; when spent, the best weights that satisfied the guard (smallest violation of the target) are returned and
   the result says which criterion failed.

Cost per verification: one forward pass over the forget set, a fixed retain sample (``retain_samples``) and the
held-out set; ``verify_every="auto"`` keeps that below about half of the training steps' cost.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from erasus_ray.data import Batch, IdDataset, make_loader
import warnings

from erasus_ray.errors import InvalidConfigError, NonFiniteLossError, NonFiniteWeightsError
from erasus_ray.evaluation.verification import Guard, Measurement, Probe, Target, Verdict
from erasus_ray.runners.local import LocalRunner, RunnerConfig, RunReport, StepExecutor, _cycle
from erasus_ray.strategies.base import Strategy, UnlearnContext
from erasus_ray.tasks import Capability


@dataclass
class ControlConfig:
    """Settings of the closed loop (see the module docstring).

    Attributes:
        budget_steps: at most this many runner steps (paired forget/retain steps).
        budget_seconds: and at most this wall-clock time (None: no time limit).
        verify_every: steps between verifications; ``"auto"`` sizes it so that a verification's forward passes cost
            at most about half of the steps between them (at least 5, at most 50 steps).
        guard: the utility guard (:class:`~erasus_ray.evaluation.verification.Guard`).
        lr_growth: factor by which the learning rate grows after a window without progress.
        max_lr: the learning rate never grows beyond this.
        min_progress: a window "moved" if the coreset's mean log forget loss covered at least this fraction of its
            log-distance to the target's reference loss.
        coreset_start: the adaptive coreset starts at this fraction of the forget set (at least ``coreset_min``).
        coreset_min: smallest starting coreset.
        patience: stop early ("stalled") after this many verifications without getting closer to the target (and
            without coreset growth), returning the closest guarded weights.
        strength_tries: for strategies that compute their update themselves and declare a strength knob
            (``Strategy.strength``), at most this many stronger settings are tried from the original weights.
        retain_samples / heldout_samples: sizes of the fixed, seeded samples the probe measures.
    """

    budget_steps: int = 1000
    budget_seconds: float | None = 600.0
    verify_every: int | str = "auto"
    guard: Guard = field(default_factory=Guard)
    lr_growth: float = 3.0
    max_lr: float = 1.0
    min_progress: float = 0.05
    coreset_start: float = 0.05
    coreset_min: int = 8
    patience: int = 20
    strength_tries: int = 6
    retain_samples: int = 512
    heldout_samples: int = 2048

    def validate(self) -> "ControlConfig":
        if not _positive_int(self.budget_steps):
            raise InvalidConfigError(f"budget steps must be a positive integer, got {self.budget_steps!r}")
        if self.budget_seconds is not None and not _positive_number(self.budget_seconds):
            raise InvalidConfigError(f"budget seconds must be a positive number or None, got {self.budget_seconds!r}")
        if self.verify_every != "auto" and not _positive_int(self.verify_every):
            raise InvalidConfigError(f"verify_every must be a positive integer or 'auto', got {self.verify_every!r}")
        if not (_positive_number(self.lr_growth) and self.lr_growth > 1):
            raise InvalidConfigError(f"lr_growth must be a number > 1, got {self.lr_growth!r}")
        for name in ("max_lr", "min_progress", "coreset_start"):
            if not _positive_number(getattr(self, name)):
                raise InvalidConfigError(f"{name} must be a positive finite number, got {getattr(self, name)!r}")
        if self.coreset_start > 1:
            raise InvalidConfigError(f"coreset_start must be in (0, 1], got {self.coreset_start!r}")
        for name in ("coreset_min", "patience", "strength_tries", "retain_samples", "heldout_samples"):
            if not _positive_int(getattr(self, name)):
                raise InvalidConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.guard, Guard):
            raise InvalidConfigError(f"guard must be an erasus_ray.evaluation.verification.Guard, got {type(self.guard).__name__}")
        return self

    def start_size(self, n_forget: int) -> int:
        return min(n_forget, max(self.coreset_min, math.ceil(self.coreset_start * n_forget)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _positive_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1


def _positive_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclass
class GrowthPlan:
    """How the adaptive coreset grows: every forget id's priority (selector order first), or None for a fixed coreset."""

    priority: dict[int, float] | None

    @classmethod
    def from_coreset(cls, scores: dict[int, float] | None, order: str | None, adaptive: bool) -> "GrowthPlan":
        if not adaptive:
            return cls(None)
        if not scores:
            return cls({})
        sign = -1.0 if order == "low" else 1.0
        return cls({int(i): sign * float(s) for i, s in scores.items()})

    @property
    def adaptive(self) -> bool:
        return self.priority is not None

    def pick(self, failing: np.ndarray, current: np.ndarray, limit: int) -> np.ndarray:
        """Up to ``limit`` failing ids outside ``current``: highest selector priority first, else most clearly failing
        (the order ``failing`` comes in)."""
        new = failing[~np.isin(failing, current)]
        if self.priority:
            rank = np.array([-self.priority.get(int(i), -np.inf) for i in new])
            new = new[np.argsort(rank, kind="stable")]
        return new[:limit]


class ClosedLoopRunner(LocalRunner):
    """Runs a loss-based strategy under the closed loop (module docstring). ``strategy.unlearn`` calls ``run`` as
    it would a :class:`LocalRunner`'s; strategies that compute their update without the runner leave ``ran`` False
    and the caller verifies their result once instead.

    Args:
        config: runner settings (``lr`` is the starting learning rate; ``epochs`` is ignored: the loop stops on the
            target or the budget).
        control: the closed loop's settings.
        target: the prepared target; ``probe``: what it measures.
        growth: the adaptive coreset's plan (a fixed coreset when not adaptive).
    """

    def __init__(self, config: RunnerConfig, control: ControlConfig, target: Target, probe: Probe, growth: GrowthPlan, *,
                 original: Measurement | None = None) -> None:
        super().__init__(config)
        self.control = control.validate()
        self.target = target
        self.probe = probe
        self.growth = growth
        self.ran = False
        self.original = original
        self.record: dict[str, Any] = {}

    # --- the loop -------------------------------------------------------------------------------------------------------
    def run(self, strategy: Strategy, ctx: UnlearnContext, *, on_epoch_end: Any = None) -> RunReport:
        self.ran = True
        start = time.perf_counter()
        full = ctx.full_forget if ctx.full_forget is not None else ctx.forget
        self.original = original = self.original or self.probe.measure(ctx.model)
        self.target.prepare(original, _n_classes(ctx, full))
        verdict = self.target.verdict(original)
        report = RunReport()
        state = _LoopState(lr=self.config.lr, coreset=np.sort(ctx.forget.ids), best=None)
        self.record = {"start_lr": self.config.lr, "lr_history": [], "coreset_growth": [int(len(state.coreset))], "guard_events": [],
                       "verifications": 0, "n_forget": int(len(full))}
        if verdict.passed:
            report.stopped = "verified: the original model already meets the target"
            return self._finish(report, verdict, [], state, ctx, strategy=None)
        self._setup(strategy, ctx, full, state)
        executor = self._executor(strategy, ctx, state.lr)
        retain_iter = self._retain_stream(ctx)
        forget_iter = self._forget_stream(ctx)
        ref = self.target.reference_loss(original)
        every = self._verify_every(len(full), ctx)
        snapshot = _snapshot(ctx.model)
        prev_loss = _mean_loss(original.forget, state.coreset)
        bar = self._bar(strategy)
        guard: list = []
        stalled = ""
        try:
            while True:
                steps = min(every, self._budget_steps() - report.steps)
                try:
                    self._steps(executor, ctx, forget_iter, retain_iter, steps, report, state, bar)
                except (NonFiniteLossError, NonFiniteWeightsError) as err:  # restore, smaller steps: as a guard trip
                    self._trip(ctx, snapshot, state, report, f"non-finite: {err}", retain_boost=False)
                    state.non_finite += 1
                    if state.non_finite >= 3:  # not a step-size problem: the objective itself is broken
                        stalled = f"stopped: non-finite loss or weights {state.non_finite} times in a row ({err})"
                        warnings.warn(f"{strategy.name}: {stalled}; kept the last good weights", RuntimeWarning, stacklevel=2)
                        break
                    executor, forget_iter = self._executor(strategy, ctx, state.lr), self._forget_stream(ctx)
                    if self._spent(report, start):
                        break
                    continue
                state.non_finite = 0
                m = self.probe.measure(ctx.model)
                self.record["verifications"] += 1
                verdict = self.target.verdict(m)
                guard = self.control.guard.check(m, original, self.target)
                entry = {"step": report.steps, "lr": state.lr, "coreset": int(len(state.coreset)), "violation": verdict.violation,
                         "passed": verdict.passed, "guard_ok": all(c.passed for c in guard), "forget_loss": m.forget.mean_loss}
                report.history.append(entry)
                if bar is not None:
                    bar.set_postfix(violation=f"{verdict.violation:.3g}", lr=f"{state.lr:.2g}", coreset=len(state.coreset))
                if not entry["guard_ok"] or verdict.overshoot:
                    why = "overshoot: " + "; ".join(verdict.failing()) if verdict.overshoot else "guard: " + "; ".join(
                        f"{c.name}={c.value:.4g} outside [{c.low}, {c.high}]" for c in guard if not c.passed)
                    self._trip(ctx, snapshot, state, report, why, retain_boost=not entry["guard_ok"])
                    executor, forget_iter = self._executor(strategy, ctx, state.lr), self._forget_stream(ctx)
                    prev_loss = _mean_loss(self.probe.measure(ctx.model).forget, state.coreset)
                elif verdict.passed:
                    report.stopped = f"verified at step {report.steps}"
                    break
                else:
                    snapshot = _snapshot(ctx.model)
                    if state.best is None or verdict.violation < state.best[0] - 1e-9:
                        state.best, state.stalled = (verdict.violation, snapshot, report.steps), 0
                    else:
                        state.stalled += 1
                    if self._grow(m, ctx, full, state):
                        forget_iter, state.stalled = self._forget_stream(ctx), 0
                    now_loss = _mean_loss(m.forget, state.coreset)
                    self._adapt_lr(executor, state, prev_loss, now_loss, ref, _mean_loss(original.forget, state.coreset), report.steps)
                    prev_loss = now_loss
                if self._spent(report, start):
                    break
                if state.stalled >= self.control.patience:
                    stalled = f"stalled: no step closer to the target in {self.control.patience} verifications"
                    break
        finally:
            if bar is not None:
                bar.close()
        if not verdict.passed or not all(c.passed for c in guard):
            why = stalled or f"budget spent ({report.steps} steps, {time.perf_counter() - start:.1f} s)"
            if state.best is not None:
                _restore(ctx.model, state.best[1])
                report.stopped = f"{why} without meeting the target; returned the guarded weights of step {state.best[2]} (closest to the target)"
            else:
                _restore(ctx.model, snapshot)
                report.stopped = f"{why} without meeting the target; returned the last guarded weights"
            m = self.probe.measure(ctx.model)
            verdict, guard = self.target.verdict(m), self.control.guard.check(m, original, self.target)
        return self._finish(report, verdict, guard, state, ctx, strategy=strategy)

    # --- pieces ------------------------------------------------------------------------------------------------------------
    def _setup(self, strategy: Strategy, ctx: UnlearnContext, full: IdDataset, state: "_LoopState") -> None:
        """Strategies that keep per-id tables from the original model (``setup_scope = "forget"``: NPO's reference
        likelihoods, preference pairs, ...) build them over the whole forget set when the coreset may grow: the
        tables must come from the original model, and a sample joining later could not get its entry any more."""
        if self.growth.adaptive and strategy.setup_scope == "forget":
            coreset = ctx.forget
            ctx.forget = full
            try:
                strategy.setup(ctx)
            finally:
                ctx.forget = coreset
        else:
            strategy.setup(ctx)

    def _executor(self, strategy: Strategy, ctx: UnlearnContext, lr: float) -> StepExecutor:
        cfg = RunnerConfig(**{**asdict(self.config), "lr": lr})
        return StepExecutor(strategy, ctx, cfg)

    def _forget_stream(self, ctx: UnlearnContext) -> Iterator[Batch]:
        cfg = self.config
        loader = make_loader(ctx.forget, ctx.task.collate, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, weights=ctx.forget_weights)
        return _cycle(loader, lambda epoch: loader.generator.manual_seed(cfg.seed * 100_003 + epoch * 2))

    def _retain_stream(self, ctx: UnlearnContext) -> Iterator[Batch] | None:
        if ctx.retain is None or len(ctx.retain) == 0:
            return None
        cfg = self.config
        loader = make_loader(ctx.retain, ctx.task.collate, batch_size=cfg.retain_batch_size or cfg.batch_size, shuffle=True, seed=cfg.seed + 1)
        return _cycle(loader, lambda epoch: loader.generator.manual_seed(cfg.seed * 100_003 + epoch * 2 + 1))

    def _steps(self, executor: StepExecutor, ctx: UnlearnContext, forget_iter: Iterator[Batch], retain_iter: Iterator[Batch] | None,
               steps: int, report: RunReport, state: "_LoopState", bar: Any) -> None:
        for _ in range(steps):
            forget = next(forget_iter).to(ctx.device)
            retain = next(retain_iter).to(ctx.device) if retain_iter is not None else None
            ctx.step = report.steps
            executor.step(forget, retain if executor.strategy.needs_retain or state.retain_boost else None)
            if state.retain_boost and retain is not None:
                ctx.model.train()
                executor.descend(state.retain_boost * ctx.forward(retain).sample_loss().mean(), "guard")
            report.steps += 1
            report.forget_samples += len(forget)
            report.retain_samples += 0 if retain is None else len(retain)
            if bar is not None:
                bar.update(1)

    def _trip(self, ctx: UnlearnContext, snapshot: dict, state: "_LoopState", report: RunReport, why: str, *, retain_boost: bool) -> None:
        _restore(ctx.model, snapshot)
        state.lr_cap = state.lr / 2
        state.lr = state.lr / 2
        if retain_boost:
            state.retain_boost = max(1.0, 2 * state.retain_boost)
        self.record["guard_events"].append({"step": report.steps, "why": why, "restored": True, "lr": state.lr,
                                            "retain_boost": state.retain_boost})
        self.record["lr_history"].append({"step": report.steps, "lr": state.lr, "why": "guard trip"})

    def _grow(self, m: Measurement, ctx: UnlearnContext, full: IdDataset, state: "_LoopState") -> bool:
        """Add failing forget samples once the coreset's own samples pass but the whole forget set does not."""
        if not self.growth.adaptive or len(state.coreset) == len(full):
            return False
        failing = self.target.failing_ids(m)
        in_core = int(np.isin(failing, state.coreset).sum())
        core_ok, outside = in_core <= 0.1 * len(state.coreset), len(failing) - in_core
        prev_ok, prev_outside = state.core_ok, state.failing_outside
        state.core_ok, state.failing_outside = core_ok, outside
        if not core_ok:
            return False  # the coreset itself is not unlearned yet: more steps, not more samples
        if not prev_ok or prev_outside is None or outside < 0.9 * prev_outside:
            return False  # the rest is still following the unlearned coreset (or gets one window to): it stands in for them
        new = self.growth.pick(failing, state.coreset, limit=len(state.coreset))
        if not len(new):
            return False
        state.coreset = np.sort(np.concatenate([state.coreset, new]))
        ctx.forget = full.subset(state.coreset)
        ctx.forget_weights = {int(i): 1.0 for i in state.coreset}  # grown samples stand for themselves: uniform
        self.record["coreset_growth"].append(int(len(state.coreset)))
        return True

    def _adapt_lr(self, executor: StepExecutor, state: "_LoopState", prev: float, now: float, ref: float, start: float,
                  step: int) -> None:
        """Grow the learning rate geometrically after a window that moved the coreset's log forget loss by less than
        ``min_progress`` of its log-distance to the reference loss (never past ``max_lr`` or a guard trip's cap)."""
        span = math.log(max(ref, 1e-12)) - math.log(max(start, 1e-12))
        if span <= 0 or state.lr_found:
            return
        moved = (math.log(max(now, 1e-12)) - math.log(max(prev, 1e-12))) / span
        if moved >= self.control.min_progress:
            state.lr_found = True  # it moves: keep this step size (a guard trip may still halve it)
            return
        grown = state.lr * self.control.lr_growth
        if grown <= min(self.control.max_lr, state.lr_cap) + 1e-15:
            state.lr = grown
            executor.set_lr(grown)
            self.record["lr_history"].append({"step": step, "lr": grown, "why": f"window moved {moved:.3f} < {self.control.min_progress}"})

    def _verify_every(self, n_forget: int, ctx: UnlearnContext) -> int:
        if self.control.verify_every != "auto":
            return int(self.control.verify_every)
        measured = n_forget + len(self.probe.retain or ()) + len(self.probe.heldout or ())
        per_step = 6 * self.config.batch_size  # forward + backward on a forget and a retain batch: ~6 batch-forwards
        return int(min(50, max(5, math.ceil(2 * measured / per_step))))

    def _budget_steps(self) -> int:
        """The step budget, capped by the runner's ``max_steps`` when the caller set one."""
        cap = self.config.max_steps
        return min(self.control.budget_steps, cap) if cap else self.control.budget_steps

    def _spent(self, report: RunReport, start: float) -> bool:
        if report.steps >= self._budget_steps():
            return True
        return self.control.budget_seconds is not None and time.perf_counter() - start >= self.control.budget_seconds

    def _bar(self, strategy: Strategy) -> Any:
        if not self.config.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self._budget_steps(), desc=f"unlearn[{strategy.name}] closed loop", leave=False, disable=None)

    def _finish(self, report: RunReport, verdict: Verdict, guard: list, state: "_LoopState", ctx: UnlearnContext,
                strategy: Strategy | None) -> RunReport:
        if strategy is not None:
            strategy.finish(ctx)
        ctx.model.eval()
        n = self.record["n_forget"]
        report.epochs = math.ceil(report.forget_samples / max(1, len(state.coreset)))
        self.record.update({
            "steps": report.steps, "lr": state.lr, "retain_boost": state.retain_boost, "coreset_ids": state.coreset.tolist(),
            "final_fraction": len(state.coreset) / max(1, n), "verdict": verdict.to_dict(),
            "guard": [c.to_dict() for c in guard], "guard_ok": all(c.passed for c in guard),
        })
        report.info["control"] = {k: v for k, v in self.record.items() if k != "coreset_ids"}
        return report


@dataclass
class _LoopState:
    lr: float
    coreset: np.ndarray
    best: tuple[float, dict, int] | None
    lr_cap: float = math.inf
    retain_boost: float = 0.0
    failing_outside: int | None = None
    core_ok: bool = False
    lr_found: bool = False
    stalled: int = 0
    non_finite: int = 0


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _restore(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(snapshot)


def _mean_loss(stats: Any, ids: np.ndarray) -> float:
    mask = np.isin(stats.ids, ids)
    return float(stats.loss[mask].mean()) if mask.any() else float("nan")


@torch.no_grad()
def _n_classes(ctx: UnlearnContext, data: IdDataset) -> int | None:
    """Output classes per prediction unit (vocabulary size for an LM), from one forward pass on two samples; None
    for a task without categorical predictions (no forward pass then)."""
    if not ctx.task.provides(Capability.LOGITS):
        return None
    batch = next(iter(make_loader(data.subset(data.ids[:2]), ctx.task.collate, batch_size=2))).to(ctx.device)
    was = ctx.model.training
    ctx.model.eval()
    try:
        return int(ctx.forward(batch).logits.shape[-1])
    finally:
        ctx.model.train(was)
