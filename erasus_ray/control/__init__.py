"""Closed-loop unlearning: run a strategy until a measured forgetting criterion holds on the whole forget set,
within a budget, without breaking a utility guard (:class:`ClosedLoopRunner`, :class:`ControlConfig`)."""

from erasus_ray.control.controller import ClosedLoopRunner, ControlConfig, GrowthPlan

__all__ = ["ClosedLoopRunner", "ControlConfig", "GrowthPlan"]
