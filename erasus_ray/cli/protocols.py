"""``erasus-ray benchmark`` and ``erasus-ray evaluate``: a published protocol (TOFU, MUSE, WMDP, general) on its
offline stand-in (:meth:`~erasus_ray.evaluation.protocols.base.Protocol.standin`), against the gold model.

* ``benchmark --protocol P [--strategy a,b] [--n-runs N] [--gold-model PATH]``: unlearns the stand-in's original
  model with each strategy (whole forget set, the strategy's defaults or ``--epochs``), once per seed ``0..N-1``,
  and evaluates every run with :class:`~erasus_ray.evaluation.protocols.UnlearningBenchmark` (mean +- std over the
  seeds, verdict vs the gold model); the original and the gold model are rows too. A strategy that refuses the
  stand-in (an ErasusError, e.g. a capability it lacks) is listed with its reason and the others still run.
* ``evaluate --protocol P --model PATH [--include-privacy]``: one saved model (a ``state_dict`` of the stand-in's
  architecture) on the protocol.

Both write ``report.json`` (every report), ``report.md`` (a table) and plots (matplotlib, Agg): MIA ROC curves
(Min-K%++ for LMs, LOSS for classifiers; forget vs held-out), the forgetting-vs-utility scatter of
:attr:`Protocol.tradeoff` per strategy, and for TOFU the truth-ratio histograms of each model vs the gold model.
``--gold-model PATH`` replaces the stand-in's gold model by a state dict of the same architecture.

Cost: one unlearning run per strategy and seed, ``1 + runs`` protocol evaluations per strategy (see each protocol).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from erasus_ray.errors import ErasusError, InvalidConfigError
from erasus_ray.evaluation.protocols import PROTOCOLS, BenchmarkReport, UnlearningBenchmark
from erasus_ray.evaluation.protocols.base import StandIn
from erasus_ray.evaluation.suite import save_json
from erasus_ray.utils.atomic import atomic_write_text


def load_state(path: str | Path, factory: Any, what: str) -> nn.Module:
    """A model of the stand-in's architecture with the state dict at ``path`` (``what``: the flag, for errors)."""
    model = factory()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.state_dict() if isinstance(state, nn.Module) else state)
    except FileNotFoundError:
        raise InvalidConfigError(f"{what}: no file {str(path)!r}") from None
    except (RuntimeError, TypeError, AttributeError) as err:
        raise InvalidConfigError(f"{what}: {str(path)!r} is not a state dict of the stand-in's architecture "
                                 f"({type(model).__name__}): {str(err).splitlines()[0]}") from None
    return model.eval()


def unlearn(standin: StandIn, strategy: str, seed: int, epochs: int | None) -> tuple[nn.Module, float]:
    """The stand-in's original model unlearned by ``strategy`` on the whole forget set, and the seconds it took."""
    from erasus_ray import ErasusUnlearner
    from erasus_ray.benchmarks.prepared import prepare_model

    b = standin.bench
    prepared = prepare_model(strategy, b, seed)  # sisa / certified_removal start from their own model
    model = prepared[0] if prepared else copy.deepcopy(b.original)
    start = time.perf_counter()
    result = ErasusUnlearner(model, strategy=strategy, selector=None, fraction=None, seed=seed, progress=False,
                             task=b.task).fit(forget_data=b.forget, retain_data=b.retain, epochs=epochs)
    return result.model.eval(), time.perf_counter() - start


def run_benchmark(protocol: str, strategies: Sequence[str] | None, n_runs: int, *, gold_path: str | None = None,
                  include_privacy: bool = True, epochs: int | None = None, variant: str = "ci",
                  out: Path = Path("results/protocols"), progress: bool = True) -> dict[str, BenchmarkReport]:
    """``benchmark``'s work (module docstring); returns label -> report (``original``, ``gold``, each strategy)."""
    standin = PROTOCOLS.get(protocol).standin(variant)
    gold = load_state(gold_path, standin.bench.model_factory, "--gold-model") if gold_path else standin.bench.gold
    names = list(strategies or standin.strategies)
    bench = UnlearningBenchmark(protocol, n_runs=1, include_privacy=include_privacy)
    evaluate = lambda models, **cost: bench.evaluate(  # noqa: E731
        models, standin.forget, standin.retain, standin.test, gold_model=gold, task=standin.bench.task,
        utility_sets=standin.utility_sets, **cost)
    reports: dict[str, BenchmarkReport] = {"original": evaluate(standin.bench.original), "gold": evaluate(gold)}
    models: dict[str, nn.Module] = {"original": standin.bench.original, "gold": gold}
    jobs = [(name, seed) for name in names for seed in range(n_runs)]
    unlearned: dict[str, list[nn.Module]] = {name: [] for name in names}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    errors: dict[str, str] = {}
    for name, seed in _progress(jobs, progress, f"{protocol}: unlearning"):
        if name in errors:
            continue
        try:
            model, secs = unlearn(standin, name, seed, epochs)
        except ErasusError as err:  # a strategy that cannot run on this stand-in is reported, not the run's end
            errors[name] = f"{type(err).__name__}: {err}"
            continue
        unlearned[name].append(model)
        seconds[name].append(secs)
    for name in (n for n in names if n not in errors):
        report = evaluate(unlearned[name], unlearn_seconds=seconds[name])
        report.settings.update(strategy=name, unlearn_seconds=float(np.mean(seconds[name])), epochs=epochs)
        reports[name], models[name] = report, unlearned[name][0]
    write_outputs(protocol, reports, models, standin, gold, out, errors)
    return reports


def run_evaluate(protocol: str, model_path: str, *, gold_path: str | None = None, include_privacy: bool = False,
                 n_runs: int = 1, variant: str = "ci", out: Path = Path("results/evaluate")) -> BenchmarkReport:
    """``evaluate``'s work: the saved model at ``model_path`` on the protocol, against the gold model."""
    standin = PROTOCOLS.get(protocol).standin(variant)
    model = load_state(model_path, standin.bench.model_factory, "--model")
    gold = load_state(gold_path, standin.bench.model_factory, "--gold-model") if gold_path else standin.bench.gold
    report = UnlearningBenchmark(protocol, n_runs=n_runs, include_privacy=include_privacy).evaluate(
        model, standin.forget, standin.retain, standin.test, gold_model=gold, task=standin.bench.task,
        utility_sets=standin.utility_sets)
    write_outputs(protocol, {"model": report}, {"model": model, "gold": gold}, standin, gold, out)
    return report


def _progress(items: list[Any], show: bool, desc: str) -> Any:
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc)


# --- reports ---------------------------------------------------------------------------------------------------------
def markdown(protocol: str, reports: dict[str, BenchmarkReport]) -> str:
    """A Markdown table: one row per model / strategy, mean +- std of every metric, the verdict and its criteria."""
    keys = [k for k in next(iter(reports.values())).metrics if k not in ("avg_gap",)]
    head = f"| run | verdict | criteria | {' | '.join(keys)} |\n|" + " --- |" * (len(keys) + 3) + "\n"
    rows = []
    for label, r in reports.items():
        crit = ", ".join(f"{k} {'ok' if v else 'no'}" for k, v in r.criteria.items())
        cells = [_cell(r.metrics.get(k), r.std.get(k), len(r.runs) > 1) for k in keys]
        rows.append(f"| {label} | {r.verdict} | {crit} | {' | '.join(cells)} |")
    return f"### {protocol}\n\n" + head + "\n".join(rows) + "\n"


def _cell(mean: float | None, std: float | None, show_std: bool) -> str:
    if mean is None or not np.isfinite(mean):
        return "-"
    return f"{mean:.3f} +- {std:.3f}" if show_std and std is not None else f"{mean:.3f}"


def write_outputs(protocol: str, reports: dict[str, BenchmarkReport], models: dict[str, nn.Module], standin: StandIn,
                  gold: nn.Module, out: Path, errors: dict[str, str] | None = None) -> None:
    """``report.json`` (with ``"errors"``: strategy -> why it did not run, if any), ``report.md`` and the plots."""
    out.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {label: r.to_dict() for label, r in reports.items()}
    failed = "".join(f"\n- {name} did not run: {why}" for name, why in (errors or {}).items())
    if errors:
        payload["errors"] = dict(errors)
    save_json(payload, out / "report.json")
    atomic_write_text(out / "report.md", markdown(protocol, reports) + (failed + "\n" if failed else ""))
    from erasus_ray.cli.protocol_plots import plot_all

    plot_all(protocol, reports, models, standin, gold, out)


# --- the command line ------------------------------------------------------------------------------------------------
def _strategies(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def cmd_benchmark(args: argparse.Namespace) -> int:
    reports = run_benchmark(args.protocol, _strategies(args.strategy), args.n_runs, gold_path=args.gold_model,
                            include_privacy=not args.no_privacy, epochs=args.epochs, variant=args.variant,
                            out=Path(args.out), progress=not args.no_progress)
    for label, r in reports.items():
        print(f"{label:24s} {r.verdict:8s} " + ", ".join(f"{k} {'ok' if v else 'no'}" for k, v in r.criteria.items()))
    print(f"wrote {args.out}/report.json, report.md and plots")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    report = run_evaluate(args.protocol, args.model, gold_path=args.gold_model, include_privacy=args.include_privacy,
                          n_runs=args.n_runs, variant=args.variant, out=Path(args.out))
    print(f"{report.verdict}: " + ", ".join(f"{k} {'ok' if v else 'no'}" for k, v in report.criteria.items()))
    print(f"wrote {args.out}/report.json, report.md and plots")
    return 0


def add_protocol_parsers(sub: Any) -> None:
    """The ``benchmark`` and ``evaluate`` subcommands."""
    protocols = PROTOCOLS.names()
    bench = sub.add_parser("benchmark", help="unlearn a protocol's offline stand-in with strategies and judge them "
                                             "against the gold model (TOFU, MUSE, WMDP, general)")
    bench.add_argument("--protocol", required=True, choices=protocols)
    bench.add_argument("--strategy", default=None, help="comma-separated strategies (default: the protocol's, "
                                                        "reference method first)")
    bench.add_argument("--n-runs", type=int, default=1, help="unlearning seeds per strategy (mean +- std)")
    bench.add_argument("--gold-model", default=None, metavar="PATH",
                       help="state dict of a model retrained without the forget set (default: the stand-in's)")
    bench.add_argument("--epochs", type=int, default=None, help="unlearning epochs (default: each strategy's own)")
    bench.add_argument("--no-privacy", action="store_true", help="leave out the membership attacks and epsilon bound")
    bench.add_argument("--variant", default="ci", help="authors stand-ins: ci (fast) | full | smollm (pretrained SmolLM2, needs the smollm extra)")
    bench.add_argument("--out", default="results/protocols")
    bench.add_argument("--no-progress", action="store_true")
    bench.set_defaults(func=cmd_benchmark)

    ev = sub.add_parser("evaluate", help="evaluate a saved model (state dict) on a protocol against the gold model")
    ev.add_argument("--protocol", required=True, choices=protocols)
    ev.add_argument("--model", required=True, metavar="PATH", help="state dict of the stand-in's architecture")
    ev.add_argument("--gold-model", default=None, metavar="PATH")
    ev.add_argument("--include-privacy", action="store_true",
                    help="add membership attacks and the empirical (epsilon, delta) lower bound")
    ev.add_argument("--n-runs", type=int, default=1, help="evaluation seeds")
    ev.add_argument("--variant", default="ci")
    ev.add_argument("--out", default="results/evaluate")
    ev.set_defaults(func=cmd_evaluate)


__all__ = ["add_protocol_parsers", "load_state", "markdown", "run_benchmark", "run_evaluate", "unlearn"]
