"""Ray Tune + Optuna sweeps of strategy x selector x fraction x lr x epochs, and their leaderboards.

``SweepConfig`` (validated before Ray starts) -> ``run_sweep`` (Tuner, OptunaSearch, ConcurrencyLimiter, optional
ASHA, resume) -> ``build_leaderboard`` (leaderboard.csv / .md, pareto.png, top-k re-runs over seeds).
CLI: ``erasus-ray sweep --config tune_configs/<name>.yaml`` and ``erasus-ray leaderboard <sweep dir>``.
"""

from erasus_ray.tuning.config import SweepConfig
from erasus_ray.tuning.leaderboard import build_leaderboard, load_trials, pareto_mask
from erasus_ray.tuning.search_space import SearchSpace, job_config

__all__ = ["SearchSpace", "SweepConfig", "build_leaderboard", "job_config", "load_trials", "pareto_mask", "run_sweep"]


def __getattr__(name: str):  # run_sweep imports Ray lazily
    if name == "run_sweep":
        from erasus_ray.tuning.sweep import run_sweep

        return run_sweep
    raise AttributeError(name)
