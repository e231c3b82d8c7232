"""Runners execute strategies. ``LocalRunner`` runs in process; distributed runners reuse its ``StepExecutor``."""

from erasus_ray.runners.local import LocalRunner, RunnerConfig, RunReport, StepExecutor

__all__ = ["LocalRunner", "RunnerConfig", "RunReport", "StepExecutor"]
