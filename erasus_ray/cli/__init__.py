"""The ``erasus-ray`` command line: ``demo``, ``unlearn --config``, ``list``, ``benchmark`` / ``evaluate`` (protocols)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from erasus_ray.errors import ErasusError


def _common_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    # The bundled models are tiny: one intra-op thread is fastest (DATA.md: two threads were 10x slower under load).
    torch.set_num_threads(max(1, int(os.environ.get("ERASUS_RAY_THREADS", "1"))))
    from erasus_ray.utils.malloc import hold_freed_memory_from_env

    # keep freed tensor buffers for the next batch instead of page-faulting them in again (erasus_ray.utils.malloc)
    hold_freed_memory_from_env()


def _fraction(text: str) -> float | str:
    """``--fraction``: 'auto' or a number in (0, 1]."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    from erasus_ray.cli.demo import demo_benchmark, run_demo
    from erasus_ray.experiment import DEMO_DEFAULTS

    benchmark = demo_benchmark(args.task)
    run_demo(
        benchmark=benchmark,
        scenario=args.scenario,
        strategy=args.strategy,
        selector=args.selector or DEMO_DEFAULTS.get(benchmark, {}).get("selector", "el2n"),
        fraction=args.fraction,
        seed=args.seed,
        out=Path(args.out),
        progress=not args.no_progress,
        variant=args.variant,
        use_ray=not args.no_ray,
    )
    return 0


def cmd_unlearn(args: argparse.Namespace) -> int:
    from erasus_ray.cli.demo import run_config

    run_config(Path(args.config), out=args.out, progress=not args.no_progress, coreset_from=args.coreset_from,
               coreset_k=args.coreset_k)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from erasus_ray.cli.sweep import run_sweep_command

    return run_sweep_command(args)


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from erasus_ray.tuning.leaderboard import build_leaderboard

    build_leaderboard(args.sweep_dir, rerun=not args.no_rerun, top_k=args.top_k, out=args.out)
    return 0


def _needs(cls: Any) -> str:
    """What an algorithm class declares beyond the per-sample loss: ``logits+labels``, ``tokens|labels`` (one of)."""
    extra = sorted(str(c) for c in cls.requires if str(c) != "loss")
    one_of = sorted(str(c) for c in getattr(cls, "requires_one_of", ()))
    parts = ["+".join(extra)] if extra else []
    if one_of:
        parts.append("|".join(one_of))
    return " ".join(parts) or "loss"


def cmd_list(args: argparse.Namespace) -> int:
    from erasus_ray.benchmarks import BENCHMARKS
    from erasus_ray.evaluation import METRICS
    from erasus_ray.selectors import SELECTORS
    from erasus_ray.strategies import STRATEGIES
    from erasus_ray.tasks import TASKS

    if not args.requires:
        print("strategies:", ", ".join(STRATEGIES.names()))
        print("selectors: ", ", ".join(SELECTORS.names()))
        print("tasks:     ", ", ".join(TASKS.names()))
        print("metrics:   ", ", ".join(METRICS.names()))
        print("benchmarks:", ", ".join(sorted(BENCHMARKS)))
        return 0
    # what each registered thing provides or needs (the capability contract, erasus_ray.tasks.capabilities)
    for name in TASKS.names():
        caps = sorted(str(c) for c in TASKS.get(name).capabilities)
        print(f"task      {name:24s} provides {', '.join(caps)}")
    for kind, registry in (("strategy", STRATEGIES), ("selector", SELECTORS)):
        for name in registry.names():
            print(f"{kind:9s} {name:24s} needs {_needs(registry.get(name))}")
    for name in METRICS.names():
        print(f"metric    {name:24s} needs {_needs(METRICS.get(name))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="erasus-ray", description="Machine unlearning at scale: coreset selection, unlearning, evaluation against retraining.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="original vs retrain vs full-forget-set vs coreset unlearning on a bundled task")
    demo.add_argument("--task", default="digits",
                      help="a benchmark (digits, mnist5k, authors, wine, iris, breast_cancer, digits_diffusion; "
                           "`erasus-ray list`), or a task family that one benchmark has (e.g. the diffusion family: "
                           "digits_diffusion, a class erased from a class-conditional UNet)")
    demo.add_argument("--scenario", default=None, help="digits/mnist5k: class | random10; authors: forget01 | forget05 | forget10")
    demo.add_argument("--strategy", default=None, help="strategy (default: the task's demo default)")
    demo.add_argument("--selector", default=None, help="coreset selector (default: the task's demo default, else el2n)")
    demo.add_argument("--fraction", type=_fraction, default="auto",
                      help="coreset fraction of the forget set, in (0, 1], or 'auto' (adaptive: grows until the whole forget set passes)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--variant", default=None, help="authors: full | ci (small, fast)")
    demo.add_argument("--out", default="results/demo", help="output folder for results.json and the plot")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--no-ray", action="store_true", help="score the coreset in process instead of on the local Ray actor pool")
    demo.set_defaults(func=cmd_demo)

    unlearn = sub.add_parser("unlearn", help="run one configured job (YAML): a bundled benchmark, or your own model and data (model:/data:)")
    unlearn.add_argument("--config", required=True, help="job YAML (see examples/configs/)")
    unlearn.add_argument("--out", default=None, help="output folder (default: the config's 'output' or results/<benchmark>)")
    unlearn.add_argument("--no-progress", action="store_true")
    unlearn.add_argument("--coreset-from", default=None, metavar="SELECTOR",
                         help="coreset selector (overrides the config's 'selector'; e.g. influence, el2n)")
    unlearn.add_argument("--coreset-k", type=int, default=None, metavar="K",
                         help="coreset size as a count (overrides the config's 'k' and 'fraction')")
    unlearn.set_defaults(func=cmd_unlearn)

    from erasus_ray.cli.sweep import add_sweep_parsers

    add_sweep_parsers(sub, cmd_sweep, cmd_leaderboard)

    lst = sub.add_parser("list", help="list registered strategies, selectors, tasks, metrics and benchmarks")
    lst.add_argument("--requires", action="store_true",
                     help="one line each: the capabilities a task provides and an algorithm or metric needs")
    lst.set_defaults(func=cmd_list)

    from erasus_ray.cli.protocols import add_protocol_parsers

    add_protocol_parsers(sub)

    from erasus_ray.cli.fl import add_parser as add_fl_parser

    add_fl_parser(sub)

    from erasus_ray.cli.ledger import add_ledger_parser

    add_ledger_parser(sub)

    from erasus_ray.cli.serve import add_serve_parser

    add_serve_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _common_env()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ErasusError as err:
        print(f"erasus-ray: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
