"""The closed loop's search over a strategy's strength knob (:attr:`erasus_ray.strategies.Strategy.strength`) for
strategies that compute their update themselves (SSD, Fisher noise, UCE): which setting to try next, in both
directions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: Stop refining once the step between neighbouring settings is below this ratio: settings closer than ~10% give
#: edits that the judged measurements cannot tell apart, and each try costs a full verification.
MIN_STEP_RATIO = 1.1


@dataclass
class StrengthSearch:
    """Which setting of a strength knob ``(name, factor)`` (``value * factor`` is meant to forget more) to try next,
    from what the settings tried so far did: a one-dimensional compass search in log scale that minimises the
    target's violation among the settings that keep the utility guard.

    From the best guarded setting so far (``c``, lowest violation; the stronger one on a tie) and a step ``r`` (``factor``, then its square
    root, its fourth root, ...), the next setting is

    * ``c * r`` (stronger), unless tried already or at least as strong as a setting that broke the guard (the guard
      is taken as monotone: a stronger setting keeps no more utility);
    * else ``c / r`` (gentler), only where ``c * r`` was tried and missed the target by *more* than ``c``: the knob
      overshoots there (UCE's ``erase_scale``: mapping the concept harder onto the guide distorts the tokens it
      shares with the preserved prompts, measured in ``benchmarks/diffusion/RESULTS.md``), so the other side is the
      one that can get closer;
    * else the same with a smaller step; None once the step is below :data:`MIN_STEP_RATIO`.

    With no guarded setting yet (the default already breaks the guard) it goes one factor gentler than the gentlest
    setting tried. So: a default that is guarded but too weak is made stronger (the one-way search this replaces), a
    default that breaks the guard is made gentler, and a guard break between two settings is bisected, in log scale
    (the scale the factor steps in). Cost: none itself; each proposed setting costs one run and one verification.
    """

    factor: float
    tried: dict[float, tuple[bool, float]] = field(default_factory=dict)

    def record(self, value: float, guard_ok: bool, violation: float) -> None:
        """Take in a tried setting: whether its run kept the utility guard and how far it missed the target."""
        self.tried[value] = (bool(guard_ok), float(violation))

    def next_value(self) -> float | None:
        """The next setting to try, or None when none is left within :data:`MIN_STEP_RATIO`."""
        guarded = {v: viol for v, (ok, viol) in self.tried.items() if ok}
        if not guarded:
            return min(self.tried, key=self._strength) / self.factor
        # the lowest violation; on a tie the stronger setting (a flat stretch, e.g. a judged rate that did not move
        # yet, is crossed towards the stronger side, not bisected back towards the default)
        best = min(guarded, key=lambda v: (round(guarded[v], 12), -self._strength(v)))
        exponent = 1.0
        while max(self.factor, 1 / self.factor) ** exponent >= MIN_STEP_RATIO:
            step = self.factor ** exponent
            up, down = best * step, best / step
            if self._known(up) is None and not self._beyond_break(up):
                return up
            up_seen = self._known(up)
            if up_seen is not None and self.tried[up_seen][1] > guarded[best] and self._known(down) is None:
                return down
            exponent /= 2
        return None

    def _strength(self, value: float) -> float:
        """A number that grows with how hard ``value`` makes the strategy forget."""
        return math.log(value) / math.log(self.factor)

    def _known(self, value: float) -> float | None:
        """The tried setting equal to ``value`` up to rounding, or None."""
        return next((v for v in self.tried if math.isclose(v, value, rel_tol=1e-9)), None)

    def _beyond_break(self, value: float) -> bool:
        """Whether ``value`` is at least as strong as a setting that broke the guard."""
        return any(not ok and self._strength(value) >= self._strength(v) - 1e-9 for v, (ok, _) in self.tried.items())


__all__ = ["MIN_STEP_RATIO", "StrengthSearch"]
