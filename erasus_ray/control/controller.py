"""The closed-loop runner: run a strategy until a measured forgetting criterion holds on the whole forget set.

A fixed ``epochs x lr`` budget tuned on one model forgets nothing on the next (a converged, very confident model)
or far too much (an LM pushed past the held-out loss). :class:`ClosedLoopRunner` replaces the guess with
measurements, every ``verify_every`` steps, by forward passes only (:class:`~erasus_ray.evaluation.verification.Probe`):

1. **Stop when the target holds** on the whole forget set (:mod:`erasus_ray.evaluation.verification`), not after a
   number of epochs; a model that already meets it is left unchanged.
2. **Utility guard**: when retain / held-out utility falls more than the guard allows, or forgetting overshoots the
   target, restore the last weights that passed, halve the step size (grown past that again only on a guarded
   plateau), raise the weight of an extra retain-descent step (0 -> 1 -> 2 -> ...), and continue.
3. **Step size found, not guessed**: starting from the strategy's default, the learning rate grows geometrically
   (``lr_growth``) after each window in which the coreset's mean forget loss moved less than ``min_progress`` of its
   log-distance to the target's reference loss (e.g. ``log C`` for a removed class, the held-out median loss), until
   the first window that moves; then it is kept (a guard trip halves it; ``plateau`` verifications in a row
   without getting closer, guarded, grow it again).
4. **Adaptive coreset**: from a small coreset chosen by the selector, forget samples that still fail the target's
   per-sample criterion join - in the selector's order, at most doubling the coreset per verification - once the
   coreset's own samples pass but the whole forget set does not (the coreset did not stand in for the rest). The
   growth per round and the final fraction are reported: the measured redundancy of this forget set.
5. **Budget**: ``budget_steps`` runner steps and ``budget_seconds``, and ``patience`` verifications without getting
   closer; when spent, the best weights that satisfied the guard (smallest violation of the target) are returned and
   the result says which criterion failed.

The decisions (:class:`Controller`) are kept apart from the weights, the optimizer and the data streams
(:class:`ClosedLoopRunner`, which applies each :class:`Decision`), so the same loop runs in process and inside Ray
Train workers (:mod:`erasus_ray.runners.ray_train`: rank 0 decides, every rank applies; see :class:`Seat`).

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
from erasus_ray.evaluation.verification import Criterion, Guard, Measurement, Probe, Target
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
            without coreset growth; a guard trip counts as one), returning the closest guarded weights.
        plateau: after this many verifications in a row without getting closer to the target, the last one guarded,
            the step size grows by ``lr_growth`` (never past ``max_lr``) and a guard trip's cap moves up with it: a
            cap set by one early trip does not hold for the rest of the run (selective amnesia on digits_diffusion
            class 7: one trip at step 21 fixed the step size at 5e-5, where the judged rate sat at 0.14 for 20
            verifications with the other classes at 0.993). A trip after the growth halves it again; ``patience``
            still bounds the run.
        min_lr_ratio: stop early ("stalled") when guard trips have halved the step size below this fraction of the
            starting one: no step size the strategy can take approaches the target without breaking the guard.
            (digits_prompt_diffusion seed 1, ESD-x: from step 112 every window at the guard's edge tripped, the
            step size fell to 5e-10 and 190 steps and 27 verifications changed nothing.)
        strength_tries: for strategies that compute their update themselves and declare a strength knob
            (``Strategy.strength``), at most this many other settings are tried from the original weights (stronger
            or gentler: :class:`~erasus_ray.control.strength.StrengthSearch`).
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
    plateau: int = 5
    min_lr_ratio: float = 1e-4
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
        for name in ("max_lr", "min_progress", "coreset_start", "min_lr_ratio"):
            if not _positive_number(getattr(self, name)):
                raise InvalidConfigError(f"{name} must be a positive finite number, got {getattr(self, name)!r}")
        for name in ("coreset_start", "min_lr_ratio"):
            if getattr(self, name) > 1:
                raise InvalidConfigError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        for name in ("coreset_min", "patience", "plateau", "strength_tries", "retain_samples", "heldout_samples"):
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


@dataclass
class Decision:
    """What every copy of the loop does after a verification window. The :class:`Controller` makes it once; under a
    data-parallel runner rank 0 makes it and every rank applies the same one, so the ranks stay in lockstep.

    Attributes:
        window: runner steps before the next verification.
        lr / retain_boost: the step size and the weight of the extra retain-descent step from now on.
        trip: restore the last weights that passed the guard (and restart the optimizer at ``lr``).
        keep: the current weights passed the guard: they become the last good ones (``best``: and the closest to the
            target so far).
        coreset: the grown coreset (sorted forget ids), or None when unchanged.
        stop: the loop ends; ``final``: the weights to restore first when it ends without meeting the target
            (``"best"`` or ``"snapshot"``; None: keep the current ones). ``reason``: the report's ``stopped``.
    """

    window: int
    lr: float
    retain_boost: float = 0.0
    trip: bool = False
    keep: bool = False
    best: bool = False
    coreset: np.ndarray | None = None
    stop: bool = False
    final: str | None = None
    reason: str = ""


class Controller:
    """The closed loop's decisions (module docstring), apart from the weights and the steps: it measures the model
    (:class:`~erasus_ray.evaluation.verification.Probe`), judges the target and the guard, and decides the step size,
    the coreset's growth, guard trips and when to stop. The weights, the optimizer and the data streams belong to
    :class:`ClosedLoopRunner`, which applies each :class:`Decision`; the split lets a data-parallel runner
    (:mod:`erasus_ray.runners.ray_train`) run the one controller on rank 0 and the steps on every rank.

    Args:
        config: the runner settings (``lr``: the starting learning rate; ``batch_size`` sizes ``verify_every="auto"``;
            ``max_steps`` caps the budget).
        control, target, probe, growth, original: as :class:`ClosedLoopRunner`'s.
    """

    def __init__(self, config: RunnerConfig, control: ControlConfig, target: Target, probe: Probe, growth: GrowthPlan, *,
                 original: Measurement | None = None) -> None:
        self.config = config
        self.control = control.validate()
        self.target = target
        self.probe = probe
        self.growth = growth
        self.original = original
        self.record: dict[str, Any] = {}

    # --- decisions ------------------------------------------------------------------------------------------------------
    def begin(self, ctx: UnlearnContext, full: IdDataset, strategy_name: str) -> Decision:
        """Measure the original model (unless given), prepare the target; stop at once if it already holds."""
        self.start = time.perf_counter()
        self.name = strategy_name
        self.original = original = self.original or self.probe.measure(ctx.model)
        self.target.prepare(original, _n_classes(ctx, full))
        self.verdict, self.guard = self.target.verdict(original), []
        self.state = _LoopState(lr=self.config.lr, coreset=np.sort(ctx.forget.ids), best=None)
        self.record = {"start_lr": self.config.lr, "lr_history": [], "coreset_growth": [int(len(self.state.coreset))],
                       "guard_events": [], "verifications": 0, "n_forget": int(len(full))}
        self.n_full, self.stalled_why = len(full), ""
        self.repair_start: dict[str, float] | None = None  # guard violations of the edited weights being mended
        self.repair: float | None = None  # the smallest total guard violation reached while mending them
        if self.verdict.passed:
            return Decision(0, self.config.lr, stop=True, reason="verified: the original model already meets the target")
        self.ref = self.target.reference_loss(original)
        self.every = self._verify_every(len(full))
        self.good = original  # the measurement of the last weights that passed the guard
        self.prev_loss = _mean_loss(original.forget, self.state.coreset)
        return Decision(self._window(0), self.config.lr)

    def after_setup(self, model: nn.Module) -> Decision:
        """A strategy's setup edited the weights (pruning, trimming: :func:`_edited`): measure the edited model once.
        It may already meet the target and the guard (the edit alone did it: stop). Where it breaks the guard, the
        strategy's steps are expected to mend it (Scissorhands trims, then repairs on the retain set), so until the
        guard first holds a window whose guard violations all shrink is not a trip (:meth:`_repairing`)."""
        m = self.probe.measure(model)
        self.record["verifications"] += 1
        verdict, guard = self.target.verdict(m), self.control.guard.check(m, self.original, self.target)
        self.record["setup_edit"] = {"violation": verdict.violation, "guard": [c.to_dict() for c in guard]}
        if all(c.passed for c in guard):
            if verdict.passed:
                self.verdict, self.guard = verdict, guard
                return Decision(0, self.state.lr, stop=True, reason="verified: the strategy's setup alone meets the target")
            return Decision(self._window(0), self.state.lr)
        self.repair_start, self.repair = {c.name: c.violation for c in guard}, None
        return Decision(self._window(0), self.state.lr)

    def _repairing(self, guard: list[Criterion]) -> bool:
        """While mending a setup's edit (:meth:`after_setup`): whether no guard criterion is further off than on the
        edited model (then the window goes on, neither restored nor kept as guarded weights). A window that brings
        the guard no closer than the best so far counts against ``patience``, as any window that does not progress."""
        if self.repair_start is None:
            return False
        now = {c.name: c.violation for c in guard}
        if set(now) != set(self.repair_start) or any(now[k] > self.repair_start[k] + 1e-12 for k in now):
            return False
        total = sum(now.values())
        if self.repair is None or total < self.repair - 1e-9:
            self.repair, self.state.stalled = total, 0
        else:
            self.state.stalled += 1
        return True

    def observe(self, model: nn.Module, steps: int, non_finite: str | None = None) -> Decision:
        """The decision after a window that ended at runner step ``steps`` (``non_finite``: the window stopped on a
        non-finite loss or weights, with this message): one measurement of ``model`` unless the window failed."""
        state = self.state
        if non_finite is not None:  # restore, smaller steps: as a guard trip
            self._trip(steps, f"non-finite: {non_finite}", retain_boost=False)
            state.non_finite += 1
            if state.non_finite >= 3:  # not a step-size problem: the objective itself is broken
                self.stalled_why = f"stopped: non-finite loss or weights {state.non_finite} times in a row ({non_finite})"
                warnings.warn(f"{self.name}: {self.stalled_why}; kept the last good weights", RuntimeWarning, stacklevel=2)
                return self._stop(steps, trip=True)
            return self._stop(steps, trip=True) if self._spent(steps) else self._decision(steps, trip=True)
        state.non_finite = 0
        m = self.probe.measure(model)
        self.record["verifications"] += 1
        self.verdict = verdict = self.target.verdict(m)
        self.guard = guard = self.control.guard.check(m, self.original, self.target)
        guard_ok = all(c.passed for c in guard)
        self.entry = {"step": steps, "lr": state.lr, "coreset": int(len(state.coreset)), "violation": verdict.violation,
                      "passed": verdict.passed, "guard_ok": guard_ok, "forget_loss": m.forget.mean_loss}
        d: dict[str, Any] = {}
        if not guard_ok and not verdict.overshoot and self._repairing(guard):  # mending a setup's edit: go on
            self.entry["repairing"] = True
        elif not guard_ok or verdict.overshoot:
            why = "overshoot: " + "; ".join(verdict.failing()) if verdict.overshoot else "guard: " + "; ".join(
                f"{c.name}={c.value:.4g} outside [{c.low}, {c.high}]" for c in guard if not c.passed)
            self._trip(steps, why, retain_boost=not guard_ok)
            self.prev_loss = _mean_loss(self.good.forget, state.coreset)  # the restored weights' (measured when kept)
            d = {"trip": True}
            self.repair = None  # restored to the edited weights (when mending them): mend them again
            state.stalled += 1  # restored: no closer than before
            if state.lr < self.config.lr * self.control.min_lr_ratio:
                self.stalled_why = (f"stalled: guard trips halved the step size to {state.lr:.3g} (below "
                                    f"{self.control.min_lr_ratio:g} x the start, {self.config.lr:g})")
                return self._stop(steps, **d)
        elif verdict.passed:
            return self._stop(steps, reason=f"verified at step {steps}")
        else:
            d = {"keep": True, "best": False}
            self.good, self.repair, self.repair_start = m, None, None  # guarded weights: the usual rules from here
            if state.best is None or verdict.violation < state.best[0] - 1e-9:
                state.best, state.stalled, d["best"] = (verdict.violation, steps), 0, True
            else:
                state.stalled += 1
                self._plateau(steps)
            if self._grow(m):
                d["coreset"], state.stalled = state.coreset.copy(), 0
            now_loss = _mean_loss(m.forget, state.coreset)
            self._adapt_lr(self.prev_loss, now_loss, _mean_loss(self.original.forget, state.coreset), steps)
            self.prev_loss = now_loss
        if self._spent(steps):
            return self._stop(steps, **d)
        if state.stalled >= self.control.patience:
            self.stalled_why = f"stalled: no step closer to the target in {self.control.patience} verifications"
            return self._stop(steps, **d)
        return self._decision(steps, **d)

    def conclude(self, model: nn.Module, decision: Decision) -> None:
        """After a stop that restored weights (``decision.final``): measure what is returned."""
        if decision.final is not None:
            m = self.probe.measure(model)
            self.verdict, self.guard = self.target.verdict(m), self.control.guard.check(m, self.original, self.target)

    def summary(self, steps: int) -> dict[str, Any]:
        """The record of the run (the result's verification): final verdict, guard, lr, coreset growth."""
        state = self.state
        self.record.update({
            "steps": steps, "lr": state.lr, "retain_boost": state.retain_boost, "coreset_ids": state.coreset.tolist(),
            "final_fraction": len(state.coreset) / max(1, self.n_full), "verdict": self.verdict.to_dict(),
            "guard": [c.to_dict() for c in self.guard], "guard_ok": all(c.passed for c in self.guard),
        })
        return self.record

    # --- checkpoints ------------------------------------------------------------------------------------------------------
    #: what changes as the loop runs (the rest is set once by ``begin``, again on a resume)
    _MUTABLE = ("record", "verdict", "guard", "state", "good", "prev_loss", "stalled_why", "entry", "repair", "repair_start")

    def state_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in self._MUTABLE if hasattr(self, k)}, "elapsed": time.perf_counter() - self.start}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        for k in self._MUTABLE:
            if k in saved:
                setattr(self, k, saved[k])
        self.start = time.perf_counter() - saved["elapsed"]  # the time budget counts the run before the restart

    # --- pieces ------------------------------------------------------------------------------------------------------------
    def _decision(self, steps: int, **kw: Any) -> Decision:
        return Decision(self._window(steps), self.state.lr, self.state.retain_boost, **kw)

    def _stop(self, steps: int, *, reason: str = "", **kw: Any) -> Decision:
        final = None
        if not reason:  # the target does not hold (or the guard failed): return the guarded weights closest to it
            why = self.stalled_why or f"budget spent ({steps} steps, {time.perf_counter() - self.start:.1f} s)"
            best = self.state.best
            final = "best" if best is not None else "snapshot"
            reason = (f"{why} without meeting the target; returned the guarded weights of step {best[1]} (closest to the "
                      "target)" if best is not None else f"{why} without meeting the target; returned the last guarded weights")
        return Decision(0, self.state.lr, self.state.retain_boost, stop=True, final=final, reason=reason, **kw)

    def _window(self, steps: int) -> int:
        return min(self.every, self._budget_steps() - steps)

    def _trip(self, steps: int, why: str, *, retain_boost: bool) -> None:
        state = self.state
        state.lr_cap = state.lr / 2
        state.lr = state.lr / 2
        if retain_boost:
            state.retain_boost = max(1.0, 2 * state.retain_boost)
        self.record["guard_events"].append({"step": steps, "why": why, "restored": True, "lr": state.lr,
                                            "retain_boost": state.retain_boost})
        self.record["lr_history"].append({"step": steps, "lr": state.lr, "why": "guard trip"})

    def _grow(self, m: Measurement) -> bool:
        """Add failing forget samples once the coreset's own samples pass but the whole forget set does not."""
        state = self.state
        if not self.growth.adaptive or len(state.coreset) == self.n_full:
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
        self.record["coreset_growth"].append(int(len(state.coreset)))
        return True

    def _plateau(self, steps: int) -> None:
        """A guarded plateau (see ``ControlConfig.plateau``): after every ``plateau`` verifications without getting
        closer to the target (this one guarded), grow the step size by ``lr_growth`` up to ``max_lr``, past a guard
        trip's cap (the cap moves with it: the trip was measured at other weights, and a new trip halves it again)."""
        state = self.state
        if state.stalled % self.control.plateau:
            return
        grown = min(state.lr * self.control.lr_growth, self.control.max_lr)
        if grown > state.lr * (1 + 1e-9):
            state.lr, state.lr_cap = grown, max(state.lr_cap, grown)
            self.record["lr_history"].append({"step": steps, "lr": grown,
                                              "why": f"plateau: {state.stalled} verifications without getting closer"})

    def _adapt_lr(self, prev: float, now: float, start: float, step: int) -> None:
        """Grow the learning rate geometrically after a window that moved the coreset's log forget loss by less than
        ``min_progress`` of its log-distance to the reference loss (never past ``max_lr`` or a guard trip's cap)."""
        state = self.state
        span = math.log(max(self.ref, 1e-12)) - math.log(max(start, 1e-12))
        if span <= 0 or state.lr_found:
            return
        moved = (math.log(max(now, 1e-12)) - math.log(max(prev, 1e-12))) / span
        if moved >= self.control.min_progress:
            state.lr_found = True  # it moves: keep this step size (a guard trip may still halve it)
            return
        grown = state.lr * self.control.lr_growth
        if grown <= min(self.control.max_lr, state.lr_cap) + 1e-15:
            state.lr = grown
            self.record["lr_history"].append({"step": step, "lr": grown, "why": f"window moved {moved:.3f} < {self.control.min_progress}"})

    def _verify_every(self, n_forget: int) -> int:
        if self.control.verify_every != "auto":
            return int(self.control.verify_every)
        measured = n_forget + len(self.probe.retain or ()) + len(self.probe.heldout or ())
        per_step = 6 * self.config.batch_size  # forward + backward on a forget and a retain batch: ~6 batch-forwards
        return int(min(50, max(5, math.ceil(2 * measured / per_step))))

    def _budget_steps(self) -> int:
        """The step budget, capped by the runner's ``max_steps`` when the caller set one."""
        cap = self.config.max_steps
        return min(self.control.budget_steps, cap) if cap else self.control.budget_steps

    def _spent(self, steps: int) -> bool:
        return steps >= self._budget_steps() or self.out_of_time()

    def out_of_time(self) -> bool:
        """Whether ``budget_seconds`` has passed since the loop began."""
        return self.control.budget_seconds is not None and time.perf_counter() - self.start >= self.control.budget_seconds


class Seat:
    """Where a :class:`ClosedLoopRunner` runs: in this process (this class: every call is the identity) or as one rank
    of a data-parallel group (:mod:`erasus_ray.runners.ray_train`), where ``decide`` runs on rank 0 and is broadcast,
    ``shard`` gives the rank its part of a data set, ``grad_sync`` averages gradients, and ``save`` / ``resumed``
    checkpoint each verification window."""

    rank = 0
    grad_sync: Callable[[list[torch.nn.Parameter]], None] | None = None

    def decide(self, make: Callable[[], Any]) -> Any:
        return make()

    def shard(self, data: IdDataset) -> IdDataset:
        return data

    def save(self, state: Callable[[], dict[str, Any]], window: int, steps: int) -> None:
        """Checkpoint after a window (``state()`` builds what to save; in process: nothing is saved)."""

    def resumed(self) -> dict[str, Any] | None:
        """The state saved by the last ``save`` of an interrupted run, or None."""
        return None


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
        seat: where it runs (default: in this process).
    """

    def __init__(self, config: RunnerConfig, control: ControlConfig, target: Target, probe: Probe, growth: GrowthPlan, *,
                 original: Measurement | None = None, seat: Seat | None = None) -> None:
        super().__init__(config)
        self.controller = Controller(self.config, control, target, probe, growth, original=original)
        self.seat = seat or Seat()
        self.ran = False

    @property
    def control(self) -> ControlConfig:
        return self.controller.control

    @property
    def record(self) -> dict[str, Any]:
        return self.controller.record

    # --- the loop -------------------------------------------------------------------------------------------------------
    def run(self, strategy: Strategy, ctx: UnlearnContext, *, on_epoch_end: Any = None) -> RunReport:
        self.ran = True
        seat, ctl = self.seat, self.controller
        full = ctx.full_forget if ctx.full_forget is not None else ctx.forget
        report = RunReport()
        d = seat.decide(lambda: ctl.begin(ctx, full, strategy.name))
        if d.stop:
            report.stopped = d.reason
            return self._finish(report, ctx, strategy=None)
        measured = _snapshot(ctx.model)  # the weights the controller measured (begin)
        self._setup(strategy, ctx, full)
        coreset = np.sort(np.asarray(ctx.forget.ids))
        ctx.forget = seat.shard(ctx.forget)  # after setup: every rank sets up on the same (whole) coreset
        # a setup that edits the weights (pruning, trimming): a trip still restarts from the edited weights (the
        # strategy's state belongs to them), but a run in which no window passed the guard returns the measured ones.
        # Where the setup left the weights as they were, the measured copy is the loop's first snapshot (one copy of
        # the model, not two); a setup that added modules (LoRA) needs a snapshot with their keys.
        now = ctx.model.state_dict()
        edited = _edited(measured, now)
        same = not edited and measured.keys() == now.keys()
        loop = _Streams(self, strategy, ctx, d.lr, coreset, snapshot=measured if same else None)
        loop.fallback = measured if edited else None
        saved = seat.resumed()
        if loop.fallback is not None and saved is None:
            d = seat.decide(lambda: ctl.after_setup(ctx.model))
            if d.stop:
                report.stopped = d.reason
                return self._finish(report, ctx, strategy=strategy)
        if saved is not None:
            d = loop.load(saved, full, report)
            if seat.rank == 0:
                ctl.load_state_dict(saved["controller"])
        bar = self._bar(strategy, report.steps)
        try:
            window = 0
            while True:
                err = None
                try:
                    self._steps(loop, ctx, d.window, report, bar)
                except (NonFiniteLossError, NonFiniteWeightsError) as e:  # every rank alike: gradients are all-reduced
                    err = str(e)
                d = seat.decide(lambda: ctl.observe(ctx.model, report.steps, err))
                if err is None and seat.rank == 0:
                    report.history.append(ctl.entry)
                loop.apply(d, full)
                if bar is not None:  # in process only (workers run without a bar)
                    bar.set_postfix(violation=f"{ctl.verdict.violation:.3g}", lr=f"{d.lr:.2g}", coreset=len(loop.coreset))
                if d.stop:
                    break
                window += 1
                seat.save(lambda: loop.state(report, d, ctl.state_dict() if seat.rank == 0 else None), window, report.steps)
        finally:
            if bar is not None:
                bar.close()
        report.stopped = d.reason
        if d.final == "snapshot" and loop.fallback is not None:  # nothing passed the guard: the original, unedited
            strategy.finish(ctx)  # its clean-up first (a pruning strategy's finish re-applies its masks)
            _restore(ctx.model, loop.fallback)
            if seat.rank == 0:
                ctl.conclude(ctx.model, d)
                ctl.record["returned_unedited"] = True  # a strength search counts this as a guard break
            return self._finish(report, ctx, strategy=None)
        if d.final is not None:
            _restore(ctx.model, loop.best if d.final == "best" else loop.snapshot)
            if seat.rank == 0:
                ctl.conclude(ctx.model, d)
        return self._finish(report, ctx, strategy=strategy)

    # --- pieces ------------------------------------------------------------------------------------------------------------
    def _setup(self, strategy: Strategy, ctx: UnlearnContext, full: IdDataset) -> None:
        """Strategies that keep per-id tables from the original model (``setup_scope = "forget"``: NPO's reference
        likelihoods, preference pairs, ...) build them over the whole forget set when the coreset may grow: the
        tables must come from the original model, and a sample joining later could not get its entry any more."""
        if self.controller.growth.adaptive and strategy.setup_scope == "forget":
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
        return StepExecutor(strategy, ctx, cfg, grad_sync=self.seat.grad_sync)

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

    def _steps(self, loop: "_Streams", ctx: UnlearnContext, steps: int, report: RunReport, bar: Any) -> None:
        """Run up to ``steps`` steps. In process, a window ends early when ``budget_seconds`` runs out, so the budget
        is overrun by at most one step and one verification (measured before: a 300 s budget spent 650 s when a
        135M LM's 5-step window took 200 s). Data-parallel ranks always finish the window: they must all take the same
        number of steps, since each step all-reduces gradients."""
        executor = loop.executor
        timed = self.seat.grad_sync is None
        for _ in range(steps):
            forget = loop.next_forget().to(ctx.device)
            retain = loop.next_retain()
            retain = None if retain is None else retain.to(ctx.device)
            ctx.step = report.steps
            executor.step(forget, retain if executor.strategy.needs_retain or loop.retain_boost else None)
            if loop.retain_boost and retain is not None:
                ctx.model.train()
                executor.descend(loop.retain_boost * ctx.forward(retain).sample_loss().mean(), "guard")
            report.steps += 1
            report.forget_samples += len(forget)
            report.retain_samples += 0 if retain is None else len(retain)
            if bar is not None:
                bar.update(1)
            if timed and self.controller.out_of_time():
                break

    def _bar(self, strategy: Strategy, done: int) -> Any:
        if not self.config.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.controller._budget_steps(), initial=done, desc=f"unlearn[{strategy.name}] closed loop",
                    leave=False, disable=None)

    def _finish(self, report: RunReport, ctx: UnlearnContext, strategy: Strategy | None) -> RunReport:
        if strategy is not None:
            strategy.finish(ctx)
        ctx.model.eval()
        report.epochs = math.ceil(report.forget_samples / max(1, len(ctx.forget)))  # passes over this copy's coreset
        if self.seat.rank == 0:
            rec = self.controller.summary(report.steps)
            report.info["control"] = {k: v for k, v in rec.items() if k != "coreset_ids"}
        return report


class _Streams:
    """The weights-side state of one copy of the loop: the executor (optimizer), the forget and retain streams (with
    how many batches each has given since it was made, so a resumed run replays them), the last good and the best
    weights, and the retain-boost weight. Applies a :class:`Decision`."""

    def __init__(self, runner: ClosedLoopRunner, strategy: Strategy, ctx: UnlearnContext, lr: float, coreset: np.ndarray,
                 snapshot: dict[str, torch.Tensor] | None = None) -> None:
        self.runner, self.strategy, self.ctx = runner, strategy, ctx
        self.executor = runner._executor(strategy, ctx, lr)
        self.retain_iter, self.retain_drawn = runner._retain_stream(ctx), 0
        self.forget_iter, self.forget_drawn = runner._forget_stream(ctx), 0
        self.snapshot: dict[str, torch.Tensor] = _snapshot(ctx.model) if snapshot is None else snapshot
        self.best: dict[str, torch.Tensor] | None = None
        #: the measured weights from before a setup that edited them, returned when no window passes the guard
        self.fallback: dict[str, torch.Tensor] | None = None
        self.retain_boost = 0.0
        self.coreset = coreset  # the whole coreset's ids (ctx.forget may hold this rank's shard of it)

    def next_forget(self) -> Batch:
        self.forget_drawn += 1
        return next(self.forget_iter)

    def next_retain(self) -> Batch | None:
        if self.retain_iter is None:
            return None
        self.retain_drawn += 1
        return next(self.retain_iter)

    def apply(self, d: Decision, full: IdDataset) -> None:
        ctx, runner = self.ctx, self.runner
        if d.trip:
            _restore(ctx.model, self.snapshot)
            self.executor = runner._executor(self.strategy, ctx, d.lr)
            self._new_forget_stream()
        elif d.lr != self.executor.config.lr:
            self.executor.set_lr(d.lr)
        self.retain_boost = d.retain_boost
        if d.keep:
            self.snapshot = _snapshot(ctx.model)
            if d.best:
                self.best = self.snapshot
        if d.coreset is not None:
            self._use_coreset(d.coreset, full)
            self._new_forget_stream()

    def _use_coreset(self, ids: np.ndarray, full: IdDataset) -> None:
        self.coreset = np.asarray(ids)
        self.ctx.forget = self.runner.seat.shard(full.subset(self.coreset))
        self.ctx.forget_weights = {int(i): 1.0 for i in self.coreset}  # grown samples stand for themselves: uniform

    def _new_forget_stream(self) -> None:
        self.forget_iter, self.forget_drawn = self.runner._forget_stream(self.ctx), 0

    def state(self, report: RunReport, d: Decision, controller: dict[str, Any] | None) -> dict[str, Any]:
        """What a restart needs to continue this run where it stands (see :meth:`load`)."""
        return {"model": self.ctx.model.state_dict(), "snapshot": self.snapshot, "best": self.best,
                "optimizer": self.executor.optimizer_state(), "decision": d, "coreset": self.coreset,
                "grown": self.ctx.forget_weights if self.ctx.forget_weights is not None else None,
                "forget_drawn": self.forget_drawn, "retain_drawn": self.retain_drawn, "report": asdict(report),
                "controller": controller}

    def load(self, saved: dict[str, Any], full: IdDataset, report: RunReport) -> Decision:
        """Continue from a saved :meth:`state`: weights, optimizer, coreset, and the streams replayed (data loading
        only) to where they stood. Returns the decision that was in force."""
        ctx, d = self.ctx, saved["decision"]
        ctx.model.load_state_dict(saved["model"])
        self.snapshot, self.best, self.retain_boost = saved["snapshot"], saved["best"], d.retain_boost
        if not np.array_equal(saved["coreset"], self.coreset):
            self._use_coreset(saved["coreset"], full)
        self.ctx.forget_weights = saved["grown"]
        self.executor = self.runner._executor(self.strategy, ctx, d.lr)
        self.executor.load_optimizer_state(saved["optimizer"])
        self._new_forget_stream()
        for _ in range(saved["forget_drawn"]):
            self.next_forget()
        for _ in range(saved["retain_drawn"]):
            self.next_retain()
        vars(report).update(RunReport(**saved["report"]).__dict__)
        report.history.append({"resumed_from_step": report.steps})
        return d


@dataclass
class _LoopState:
    lr: float
    coreset: np.ndarray
    best: tuple[float, int] | None  # (violation, step) of the guarded weights closest to the target
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


def _edited(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    """Whether a strategy's setup changed the values of the weights (``unet_surgery`` trims, ``sparse_aware``
    prunes). A setup that only adds modules (LoRA adapters, mask parametrisations) renames keys instead and keeps
    the function at its start; it is not an edit (its own ``finish`` folds the additions back)."""
    return before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


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
