"""``erasus-ray sweep --config tune_configs/<name>.yaml`` and ``erasus-ray leaderboard <sweep dir>``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

from erasus_ray.errors import InvalidConfigError


def add_sweep_parsers(sub: Any, cmd_sweep: Callable, cmd_leaderboard: Callable) -> None:
    sweep = sub.add_parser("sweep", help="Ray Tune + Optuna sweep of strategy x selector x fraction x lr x epochs, then a leaderboard")
    sweep.add_argument("--config", default=None, help="sweep YAML (see tune_configs/); with --resume, default: the sweep's own")
    sweep.add_argument("--resume", default=None, metavar="SWEEP_DIR", help="continue an interrupted sweep (Tuner.restore)")
    sweep.add_argument("--name", default=None, help="sweep folder name (default: <config name>-<date-time>)")
    sweep.add_argument("--storage-path", default=None, help="parent folder of the sweep (default: the config's storage_path)")
    sweep.add_argument("--num-samples", type=int, default=None, help="override the config's num_samples")
    sweep.add_argument("--max-concurrent", type=int, default=None, help="override the config's max_concurrent")
    sweep.add_argument("--no-leaderboard", action="store_true", help="only run the trials")
    sweep.add_argument("--no-rerun", action="store_true", help="leaderboard without re-running the top configurations over seeds")
    sweep.set_defaults(func=cmd_sweep)

    board = sub.add_parser("leaderboard", help="rebuild leaderboard.csv/.md and pareto.png of a sweep directory")
    board.add_argument("sweep_dir", help="a sweep directory (results/sweeps/<name>)")
    board.add_argument("--no-rerun", action="store_true", help="do not re-run the top configurations (earlier re-runs are kept)")
    board.add_argument("--top-k", type=int, default=None, help="how many configurations to re-run (default: the config's top_k)")
    board.add_argument("--out", default=None, help="output folder (default: the sweep directory)")
    board.set_defaults(func=cmd_leaderboard)


def load_sweep_config(args: argparse.Namespace) -> Any:
    """The config from ``--config`` (or the resumed sweep's ``sweep.json``) with the command-line overrides."""
    from erasus_ray.tuning.config import SweepConfig
    from erasus_ray.tuning.trials import META_FILE

    if args.config:
        cfg = SweepConfig.from_yaml(args.config)
    elif args.resume:
        meta = Path(args.resume) / META_FILE
        if not meta.exists():
            raise InvalidConfigError(f"resume: {meta} is missing; pass --config with the sweep's YAML")
        cfg = SweepConfig.from_dict({"loop": "open", **json.loads(meta.read_text())["config"]})  # older sweeps: open loop
    else:
        raise InvalidConfigError("config: pass --config tune_configs/<name>.yaml (or --resume <sweep dir>)")
    overrides = {k: v for k, v in (("num_samples", args.num_samples), ("max_concurrent", args.max_concurrent)) if v is not None}
    if overrides:
        cfg = SweepConfig.from_dict({**cfg.to_dict(), **overrides})
    return cfg


def run_sweep_command(args: argparse.Namespace) -> int:
    cfg = load_sweep_config(args)  # fails here, before Ray starts, on a bad config
    from erasus_ray.tuning.sweep import run_sweep

    run_sweep(cfg, resume=args.resume, name=args.name, storage_path=args.storage_path,
              leaderboard=not args.no_leaderboard, rerun=not args.no_rerun)
    return 0


__all__ = ["add_sweep_parsers", "load_sweep_config", "run_sweep_command"]
