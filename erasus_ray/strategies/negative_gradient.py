"""``negative_gradient``: the seed package's name for plain gradient ascent (NegGrad; Golatkar et al., CVPR 2020
"Eternal Sunshine of the Spotless Net"; the "NegGrad" baseline of Kurmanji et al., NeurIPS 2023)."""

from __future__ import annotations

from erasus_ray.strategies.base import STRATEGIES
from erasus_ray.strategies.gradient_ascent import GradientAscent
from erasus_ray.tasks import Capability


@STRATEGIES.register("negative_gradient")
class NegativeGradient(GradientAscent):
    """Alias of :class:`~erasus_ray.strategies.gradient_ascent.GradientAscent`, kept for users of the seed package.

    Same objective (``loss = -mean_i l(x_i, y_i)`` over the forget coreset, no retain term), same defaults and
    the same result bit for bit under a seed; prefer the name ``gradient_ascent`` in new code.

    Cost: one forward+backward per forget sample per epoch.

    Example:
        >>> ErasusUnlearner(model, strategy="negative_gradient", selector=None).fit(forget_data=f)
    """

    #: gradient ascent under its seed name: the per-sample loss only.
    requires = frozenset({Capability.LOSS})
