#!/usr/bin/env python
"""Audio leaderboard: forgetting one speaker from the tiny Wav2Vec2 word recogniser (benchmark ``audio``, synthetic
formant speech), against the model retrained without that speaker.

Per seed: the original and retrain (gold) rows; then

1. every listed generic strategy with its documented defaults on the full forget set, *open loop* (``target:
   auto``: a speaker is not a whole class and no held-out set is given, so each runs its fixed default budget);
2. the demo default *closed loop* (``DEMO_DEFAULTS["audio"]``: grad_diff, target gold with the test split as held-out
   data) on the full forget set, on a 10% el2n coreset and on a 10% random coreset.

``--benchmark audio_asr`` runs the same protocol on the tiny Whisper transcriber, plus grad_diff open loop on the
10% coresets, with word error rate columns, into its own section of ``RESULTS.md`` (sections are kept between ``<!-- section: NAME -->`` markers; the audio one is the file's head).

Every run goes through :func:`erasus_ray.experiment.run_job` (the code path of ``erasus-ray demo`` / ``unlearn``).
The table is the strategy leaderboard's (``benchmarks/strategy_leaderboard/run.py``: mean +- std over seeds, sorted
by Avg.Gap). Writes ``results.csv``, ``leaderboard.md`` and ``RESULTS.md`` into ``--out``. Example::

    python benchmarks/multimodal/audio/run.py --seeds 0,1,2
    python benchmarks/multimodal/audio/run.py --benchmark audio_asr --seeds 0,1,2 --strategies grad_diff,npo
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
GENERIC = "grad_diff,gradient_ascent,npo,simnpo,scrub,saliency_unlearning,fine_tune,random_label,l1_sparse,neggrad_plus,ssd"
#: per benchmark: table columns (None: the task's display metrics), the section title, the Avg.Gap sentence and
#: whether grad_diff also runs open loop on the 10% coresets (beside the demo default's closed-loop rows)
SECTIONS = {
    "audio": (None, "Audio leaderboard: forget one speaker (synthetic formant speech, tiny Wav2Vec2)",
              "forget/retain/test acc and SVC MIA efficacy", False),
    "audio_asr": (("forget_wer", "retain_wer", "test_wer", "mia_loss_auc"),
                  "Speech recognition leaderboard: forget one speaker (synthetic formant speech, tiny Whisper)",
                  "the seq2seq suite's gap metrics (forget/retain/test WER and token accuracy, forget/retain answer "
                  "probability, loss / SVC / Min-K% MIA); WER and MIA columns in points, forget loss in nats", True),
}


def _leaderboard_module() -> Any:
    """The strategy leaderboard script, for its table (one table format for every leaderboard)."""
    path = ROOT / "benchmarks" / "strategy_leaderboard" / "run.py"
    spec = importlib.util.spec_from_file_location("strategy_leaderboard_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(base: dict[str, Any], name: str, job: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    m = job["metrics"]
    return {**base, "strategy": name, "status": "ok", "seconds": job["timings"]["total"],
            "steps": job["report"].get("steps"), "avg_gap_pts": 100 * m["avg_gap"], **{k: m.get(k) for k in keys},
            "forget_loss": m.get("forget_loss"), "verified": job.get("verified"), "coreset": job["coreset_size"]}


def _jobs(benchmark: str, names: list[str], coreset: list[str]) -> list[tuple[str, dict[str, Any], float]]:
    """(label, job config, forget fraction) per run: each strategy open loop on the full set, grad_diff open loop on
    10% ``coreset`` selections where :data:`SECTIONS` asks, then the demo default closed loop on the full set and on
    the 10% selections."""
    from erasus_ray.experiment import DEMO_DEFAULTS

    jobs = [(name, {"strategy": name, "selector": None, "target": "auto"}, 1.0) for name in names]
    if SECTIONS[benchmark][3]:
        jobs += [(f"grad_diff 10% {sel}", {"strategy": "grad_diff", "selector": sel, "target": "auto"}, 0.1)
                 for sel in coreset]
    if benchmark not in DEMO_DEFAULTS:
        return jobs
    default = DEMO_DEFAULTS[benchmark]["strategy"]
    target = DEMO_DEFAULTS[benchmark].get("target", "auto")
    loop = f"{default} closed-loop (target {target if isinstance(target, str) else 'bounds'})"
    return jobs + [(f"{loop} full", {"strategy": default, "selector": None}, 1.0)] + [
        (f"{loop} 10% {sel}", {"strategy": default, "selector": sel}, 0.1) for sel in coreset]


def run_seed(seed: int, names: list[str], benchmark: str = "audio", coreset: tuple[str, ...] = ("el2n", "random")) -> list[dict[str, Any]]:
    from erasus_ray.benchmarks import load_benchmark
    from erasus_ray.evaluation import evaluate
    from erasus_ray.experiment import JobConfig, display_keys, reference_rows, run_job

    bench = load_benchmark(benchmark, "speaker", seed)
    keys = SECTIONS[benchmark][0] or display_keys(bench)
    gold = evaluate(bench.gold, forget=bench.forget, retain=bench.retain, test=bench.test, task=bench.task, seed=seed)
    base = {"task": benchmark, "scenario": "speaker", "seed": seed}
    rows = [{**base, "strategy": ref["label"], "status": "reference", "seconds": ref["timings"]["total"],
             "avg_gap_pts": 100 * ref["metrics"]["avg_gap"], **{k: ref["metrics"].get(k) for k in keys},
             "forget_loss": ref["metrics"].get("forget_loss")} for ref in reference_rows(bench, gold, seed)]
    for label, cfg, fraction in _jobs(benchmark, names, list(coreset)):
        t0 = time.perf_counter()
        try:
            job = run_job(JobConfig.from_dict({"benchmark": benchmark, "scenario": "speaker", "seed": seed, **cfg,
                                               "fraction": fraction}), bench=bench, gold_metrics=gold, progress=False,
                          fraction=fraction)
        except Exception as err:  # recorded, not hidden: a leaderboard row says what failed
            rows.append({**base, "strategy": label, "status": f"error: {type(err).__name__}: {err}"[:300],
                         "seconds": time.perf_counter() - t0})
            traceback.print_exc()
            continue
        rows.append(_row(base, label, job, keys))
        print(f"[{benchmark} seed={seed}] {label:45s} {rows[-1]['seconds']:7.2f}s  Avg.Gap {rows[-1]['avg_gap_pts']:6.2f}", flush=True)
    return rows


def _read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of an earlier run's results.csv with numbers and booleans restored, empty cells dropped."""
    import csv

    def value(key: str, text: str) -> Any:
        if text == "" or key in ("task", "scenario", "strategy", "status"):
            return text if key in ("task", "scenario", "strategy", "status") else None
        return text == "True" if text in ("True", "False") else int(text) if key == "seed" else float(text)

    with path.open() as fh:
        rows = [{k: value(k, v) for k, v in row.items()} for row in csv.DictReader(fh)]
    return [{k: v for k, v in row.items() if v is not None} for row in rows]  # as run: a row has only its own keys


def closed_loop_table(rows: list[dict[str, Any]]) -> str:
    """Per closed-loop configuration: how many seeds verified, steps and coreset size (mean over seeds)."""
    lines = ["| closed-loop run | verified | steps (mean) | coreset (mean) | forget loss (mean) |", "| --- | --- | --- | --- | --- |"]
    for label in dict.fromkeys(r["strategy"] for r in rows if "closed-loop" in r["strategy"]):
        ok = [r for r in rows if r["strategy"] == label and r["status"] == "ok"]
        if ok:
            mean = lambda key: sum(float(r[key]) for r in ok) / len(ok)  # noqa: E731
            lines.append(f"| {label} | {sum(bool(r['verified']) for r in ok)} of {len(ok)} | {mean('steps'):.0f} | "
                         f"{mean('coreset'):.0f} | {mean('forget_loss'):.3f} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, benchmark: str, text: str) -> None:
    """Put ``text`` into ``path`` as ``benchmark``'s section, keeping the others: between ``<!-- section: NAME -->``
    markers, except the audio classifier's, which is the file's head (it was written before sections existed)."""
    from erasus_ray.utils.atomic import atomic_write_text

    old = path.read_text() if path.exists() else ""
    first = old.find("<!-- section: ")
    head, tail = (old, "") if first < 0 else (old[:first], old[first:])
    if benchmark == "audio":
        atomic_write_text(path, text + ("\n" + tail if tail else ""))
        return
    begin, end = f"<!-- section: {benchmark} -->", f"<!-- end section: {benchmark} -->"
    block = f"{begin}\n{text}{end}\n"
    if begin in tail:
        tail = tail[:tail.index(begin)] + block + tail[tail.index(end) + len(end) + 1:]
    else:
        tail += ("\n" if tail else "") + block
    atomic_write_text(path, head.rstrip("\n") + "\n\n" + tail if head.strip() else tail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", default="audio", choices=sorted(SECTIONS))
    p.add_argument("--coreset", default="el2n,random", help="selectors of the 10%% coreset rows")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--strategies", default=GENERIC)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "multimodal" / "audio"),
                   help="RESULTS.md's folder; the csv and leaderboard.md go into OUT/asr for --benchmark audio_asr")
    p.add_argument("--from-csv", default="", help="comma-separated results.csv files of earlier runs (e.g. one per seed, "
                   "run in parallel): merge them into one leaderboard instead of running")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from erasus_ray.cli.report import write_csv
    from erasus_ray.experiment import DEMO_DEFAULTS, warm_up
    from erasus_ray.utils.atomic import atomic_write_text

    warm_up()
    results = Path(args.out)
    out = results if args.benchmark == "audio" else results / "asr"
    out.mkdir(parents=True, exist_ok=True)
    load0, wall0 = os.getloadavg()[0], time.perf_counter()
    rows: list[dict[str, Any]] = [row for path in filter(None, args.from_csv.split(",")) for row in _read_csv(Path(path))]
    for seed in () if rows else (int(s) for s in args.seeds.split(",")):
        rows += run_seed(seed, [s.strip() for s in args.strategies.split(",") if s.strip()], args.benchmark,
                         tuple(filter(None, args.coreset.split(","))))
        write_csv(rows, out / "results.csv")  # after every seed: a long run leaves what it measured
    write_csv(rows, out / "results.csv")
    closed = any("closed-loop" in r["strategy"] for r in rows)
    board = _leaderboard_module().leaderboard(rows) + ("\n" + closed_loop_table(rows) if closed else "")
    atomic_write_text(out / "leaderboard.md", board)
    command = "python benchmarks/multimodal/audio/run.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    _, title, gap_text, _ = SECTIONS[args.benchmark]
    text = [f"{'#' if args.benchmark == 'audio' else '##'} {title}", "",
            f"Command: `{command}`", "",
            f"{os.cpu_count()} CPUs shared with other jobs, one torch thread; 1-min load average {load0:.1f} at start, "
            f"{os.getloadavg()[0]:.1f} at end; {(time.perf_counter() - wall0) / 60:.1f} min wall-clock. Metrics in "
            f"points, mean +- std over seeds; Avg.Gap = mean |metric - retrained model's| over {gap_text} "
            "(lower is better). Open-loop rows: the strategy's defaults on the full forget set (\"10%\" rows: on a 10% "
            "coreset of it picked by the named selector)" + (
                f"; closed-loop rows: the demo default until its target ({DEMO_DEFAULTS[args.benchmark]['target']}) holds."
                if closed else "."), "", board]
    write_section(results / "RESULTS.md", args.benchmark, "\n".join(text) + "\n")
    print(f"wrote {out}/results.csv, leaderboard.md, {results}/RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
