#!/usr/bin/env python
"""Leaderboards of the benchmark protocols (TOFU, MUSE, WMDP, general) on their offline stand-ins.

For each entry of ``--runs`` (``protocol:strategy+strategy:n_runs[:epochs]``) this runs
:func:`erasus_ray.cli.protocols.run_benchmark` (the code path of ``erasus-ray benchmark``): the stand-in's original
model unlearned by each strategy on the whole forget set, once per seed ``0..n_runs-1``, judged by
:class:`~erasus_ray.evaluation.protocols.UnlearningBenchmark` against the gold (retrained) model with
``include_privacy=True``. The original and gold models are trained once (seed 0) and cached; the seeds vary the
unlearning run only. Each entry writes ``<out>/<protocol>[-e<epochs>]/`` (report.json, report.md, plots) and
``RESULTS.md`` gathers the tables with the command and the wall time.

Example (the command RESULTS.md records)::

    ERASUS_RAY_CACHE=/tmp/erasus-bench-cache python benchmarks/protocols/run.py
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

DEFAULT_RUNS = ("general:gradient_ascent+scrub+fine_tune:3,tofu:grad_diff+npo+simnpo:3,"
                "muse:grad_diff+npo+simnpo:3,wmdp:rmu+grad_diff+npo:3,wmdp:rmu:3:40")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=DEFAULT_RUNS, help="protocol:strategy+strategy:n_runs[:epochs], comma-separated")
    p.add_argument("--variant", default="ci")
    p.add_argument("--out", default="benchmarks/protocols")
    return p.parse_args(argv)


def summary_rows(title: str, protocol: str, reports: dict) -> list[str]:
    """One Markdown row per run: the verdict and the protocol's forgetting / utility metrics (mean +- std)."""
    from erasus_ray.evaluation.protocols import PROTOCOLS

    x_key, y_key = PROTOCOLS.get(protocol).tradeoff

    def cell(r, key: str) -> str:
        mean, std = r.metrics.get(key, float("nan")), r.std.get(key, 0.0)
        return f"{mean:.3f}" + (f" +- {std:.3f}" if len(r.runs) > 1 else "")

    return [f"| {title} | {label} | {r.verdict} | {x_key} | {cell(r, x_key)} | {y_key} | {cell(r, y_key)} | "
            f"{cell(r, 'mia_epsilon')} |" for label, r in reports.items()]


def main(argv: list[str] | None = None) -> int:
    import torch

    from erasus_ray.cli.protocols import markdown, run_benchmark

    torch.set_num_threads(1)  # DATA.md: one thread is fastest for the tiny models on the shared 2-core machines
    args = parse_args(argv)
    out = Path(args.out)
    sections: list[str] = []
    summary: list[str] = []
    for entry in args.runs.split(","):
        protocol, strategies, n_runs, *rest = entry.split(":")
        epochs = int(rest[0]) if rest else None
        folder = out / (protocol + (f"-e{epochs}" if epochs else ""))
        start = time.perf_counter()
        reports = run_benchmark(protocol, strategies.split("+"), int(n_runs), epochs=epochs, variant=args.variant,
                                out=folder, progress=False)
        seconds = time.perf_counter() - start
        note = f"{n_runs} unlearning seed(s), epochs: {epochs or 'each strategy default'}; wall {seconds:.0f} s"
        title = protocol + (f" (epochs {epochs})" if epochs else "")
        sections.append(markdown(title, reports) + f"\n{note}\n")
        summary.extend(summary_rows(title, protocol, reports))
        print(f"{entry}: {seconds:.0f} s", flush=True)
    command = "python benchmarks/protocols/run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    head = ("| protocol | run | verdict | forgetting metric | value | utility metric | value | mia_epsilon |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- |\n")
    (out / "leaderboard.md").write_text(f"Command: `{command}`\n\n## Summary\n\n" + head + "\n".join(summary)
                                        + "\n\n## Every metric\n\n" + "\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
