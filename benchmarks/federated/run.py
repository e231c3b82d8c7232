"""Federated unlearning vs federated retrain on digits over 5 and 10 clients (issue #5 benchmark).

For each federation (n clients, seed) the server trains FedAvg once (`DeletionCoordinator.train`, history on disk);
then, for each deletion level, a fresh copy of that trained state gets one request and `process_pending()` drives it
through the same code the Flower ServerApp runs (unlearn -> repair / FedEraser -> verify against the federated
retrain baseline). The transport is `InProcessTransport`: the client functions of `client_app.py` are called
directly, every message still goes through `to_content()` / `from_content()` (Flower RecordDicts), so rounds and
bytes are those of the Flower path; only process start-up and gRPC are absent.

Measured per request, split by phase (a subclass of the coordinator meters `_exchange`):
- unlearn: `_unlearn_batch` (sample/class: one `train.unlearn` round on the owning clients + `repair_rounds`
  `train.repair` rounds on all clients; client: FedEraser calibration rounds) - rounds, client-rounds, bytes sent
  (server -> clients, model arrays as Flower counts them), bytes received, seconds;
- retrain: `retrain_baseline` (sample/class: FedAvg from the common initialisation for the same rounds without the
  deleted ids; client: rollback to the round before it joined + FedAvg without it) - same counters;
- Avg.Gap (evaluation module, mean |metric - retrained metric|) of the unlearned model and of the original model.

Batching (one more fresh copy per federation, twice): 3 requests - the operator's class 3, 30 ids of client-1, 30 ids
of client-2 - arriving in one round and served as one batch by one `process_pending()`, against the same 3 requests
arriving one at a time (submit, `process_pending()`, next). Totals of both phases, and the Avg.Gap on the union of
the three requests' ids of the final model against the retrain without all of them (the ledger's
`deleted_after_avg_gap` of the last verification).

Usage:
    python benchmarks/federated/run.py --clients 5,10 --seeds 0,1,2 --out benchmarks/federated
    python benchmarks/federated/run.py --report-only --out benchmarks/federated [--note TEXT ...]
        # rewrite RESULTS.md from results.json (no re-run); --note replaces the stored findings
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from erasus_ray.utils.atomic import atomic_open, atomic_write_text

LEVELS = ("sample", "class", "client")
PHASE_KEYS = ("rounds", "client_rounds", "bytes_sent", "bytes_received", "seconds")


def _metered_coordinator_class():
    from erasus_ray.federated.coordinator import DeletionCoordinator
    from erasus_ray.federated.messages import MSG_REPAIR, MSG_TRAIN, MSG_UNLEARN

    class MeteredCoordinator(DeletionCoordinator):
        """The coordinator unchanged, with per-phase counters around `_exchange`, `_unlearn_batch` and `retrain_baseline`."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.phase = "other"
            self.meter = {p: dict.fromkeys(PHASE_KEYS, 0) for p in ("unlearn", "retrain", "other")}

        def _exchange(self, message_type, contents):
            sent0, recv0 = self.stats["bytes_sent"], self.stats["bytes_received"]
            replies = super()._exchange(message_type, contents)
            m = self.meter[self.phase]
            m["bytes_sent"] += self.stats["bytes_sent"] - sent0
            m["bytes_received"] += self.stats["bytes_received"] - recv0
            if message_type in (MSG_TRAIN, MSG_REPAIR, MSG_UNLEARN):
                m["rounds"] += 1
                m["client_rounds"] += len(contents)
            return replies

        def _timed(self, phase, fn, *args, **kwargs):
            self.phase, t0 = phase, time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.meter[phase]["seconds"] += time.perf_counter() - t0
                self.phase = "other"

        def _unlearn_batch(self, *args, **kwargs):
            return self._timed("unlearn", super()._unlearn_batch, *args, **kwargs)

        def retrain_baseline(self, *args, **kwargs):
            return self._timed("retrain", super().retrain_baseline, *args, **kwargs)

    return MeteredCoordinator


def _request(level: str, fed, n_clients: int, seed: int, n_sample_ids: int):
    import numpy as np

    from erasus_ray.ledger import DeletionRequest

    if level == "sample":
        ids = np.random.default_rng(seed).choice(fed.partitions["client-1"], size=n_sample_ids, replace=False)
        return DeletionRequest(f"sample-{seed}", "client-1", "sample", ids=sorted(int(i) for i in ids))
    if level == "class":
        return DeletionRequest(f"class3-{seed}", "operator", "class", label=3)
    return DeletionRequest(f"leave-{seed}", f"client-{n_clients - 1}", "client")


def _batch_requests(fed, seed: int, n_sample_ids: int):
    import numpy as np

    from erasus_ray.ledger import DeletionRequest

    rng = np.random.default_rng(seed)
    out = [DeletionRequest(f"class3-{seed}", "operator", "class", label=3)]
    for c in ("client-1", "client-2"):
        ids = rng.choice(fed.partitions[c], size=n_sample_ids, replace=False)
        out.append(DeletionRequest(f"sample-{c}-{seed}", c, "sample", ids=sorted(int(i) for i in ids)))
    return out


def run_batching(args, Metered, spec, base: Path, work: Path, config: dict, seed: int) -> list[dict]:
    """The same 3 requests served as one batch vs one at a time, each from a fresh copy of the trained state."""
    from erasus_ray.federated.coordinator import InProcessTransport, ServerConfig

    rows = []
    for mode in ("batched", "one at a time"):
        state = work / f"batch-{mode.replace(' ', '-')}-{spec.n_clients}-{seed}"
        shutil.copytree(base / "history", state / "history")
        mc = Metered(spec, InProcessTransport(spec), state, config=ServerConfig(seed=seed, **config))
        mc.discover()
        requests = _batch_requests(mc.fed, seed, args.sample_ids)
        t0 = time.perf_counter()
        if mode == "batched":
            for req in requests:
                mc.submit(req)
            mc.process_pending()
        else:
            for req in requests:
                mc.submit(req)
                mc.process_pending()
        total = time.perf_counter() - t0
        entries = [mc.ledger.get(r.request_id) for r in requests]
        last = max(entries, key=lambda e: e.updated_at).metrics
        first = mc.ledger.get(requests[0].request_id).metrics
        row = {
            "n_clients": spec.n_clients, "seed": seed, "mode": mode, "n_requests": len(requests),
            "batches": len({e.batch_id for e in entries}), "states": sorted({e.state for e in entries}),
            "failed": {e.request_id: e.state_reason for e in entries if e.state == "failed"},
            "n_forget": last.get("deleted_n_forget"),
            **{f"unlearn_{k}": v for k, v in mc.meter["unlearn"].items()},
            **{f"retrain_{k}": v for k, v in mc.meter["retrain"].items()},
            "process_seconds_total": total,
            "avg_gap_after": last.get("deleted_after_avg_gap"),
            # the original model against the same final retrain: the first batch's 'before' in batched mode
            "avg_gap_original": first.get("deleted_before_avg_gap") if mode == "batched" else None,
            "forget_acc_after": last.get("deleted_after_forget_acc"), "forget_acc_retrain": last.get("deleted_after_gold_forget_acc"),
            "load_avg_1m": os.getloadavg()[0],
        }
        rows.append(row)
        mc.ledger.close()
        print(json.dumps({k: row[k] for k in ("n_clients", "seed", "mode", "batches", "states", "unlearn_rounds", "retrain_rounds",
                                                "unlearn_seconds", "retrain_seconds", "avg_gap_after")}), flush=True)
    return rows


def run(args) -> tuple[list[dict], list[dict]]:
    import torch

    torch.set_num_threads(1)
    from erasus_ray.federated.coordinator import DeletionCoordinator, InProcessTransport, ServerConfig
    from erasus_ray.federated.messages import FederationSpec

    Metered = _metered_coordinator_class()
    config = dict(rounds=args.rounds, wait_clients_s=0.0, pass_wait_s=0.0, process_passes=1)
    rows, batch_rows = [], []
    work = Path(tempfile.mkdtemp(prefix="fl-bench-"))
    try:
        for n in args.clients:
            for seed in args.seeds:
                spec = FederationSpec(n_clients=n, seed=seed)
                base = work / f"base-{n}-{seed}"
                co = DeletionCoordinator(spec, InProcessTransport(spec), base, config=ServerConfig(seed=seed, **config))
                co.discover()
                t0 = time.perf_counter()
                co.train()
                train = {"seconds": time.perf_counter() - t0, "rounds": co.stats["rounds"], "bytes_sent": co.stats["bytes_sent"]}
                co.ledger.close()
                for level in LEVELS:
                    state = work / f"{level}-{n}-{seed}"
                    shutil.copytree(base / "history", state / "history")
                    mc = Metered(spec, InProcessTransport(spec), state, config=ServerConfig(seed=seed, **config))
                    mc.discover()
                    req = _request(level, mc.fed, n, seed, args.sample_ids)
                    mc.submit(req)
                    t0 = time.perf_counter()
                    final = mc.process_pending()
                    total = time.perf_counter() - t0
                    entry = mc.ledger.get(req.request_id)
                    m = entry.metrics
                    row = {
                        "n_clients": n, "seed": seed, "level": level, "request_id": req.request_id,
                        "state": final.get(req.request_id), "state_reason": entry.state_reason, "n_forget": m.get("n_forget"),
                        "strategy": entry.strategy,
                        **{f"unlearn_{k}": v for k, v in mc.meter["unlearn"].items()},
                        **{f"retrain_{k}": v for k, v in mc.meter["retrain"].items()},
                        "process_seconds_total": total,
                        "avg_gap_after": m.get("after_avg_gap"), "avg_gap_original": m.get("before_avg_gap"),
                        "forget_acc_original": m.get("before_forget_acc"), "forget_acc_after": m.get("after_forget_acc"),
                        "forget_acc_retrain": m.get("after_gold_forget_acc"),
                        "test_acc_original": m.get("before_test_acc"), "test_acc_after": m.get("after_test_acc"),
                        "test_acc_retrain": m.get("after_gold_test_acc"),
                        "gap_forget_acc_after": m.get("after_gap_forget_acc"), "verify_tolerance": m.get("verify_tolerance"),
                        "train_seconds": train["seconds"], "train_rounds": train["rounds"], "train_bytes_sent": train["bytes_sent"],
                        "load_avg_1m": os.getloadavg()[0],
                    }
                    rows.append(row)
                    mc.ledger.close()
                    print(json.dumps({k: row[k] for k in ("n_clients", "seed", "level", "state", "unlearn_rounds", "retrain_rounds",
                                                            "unlearn_seconds", "retrain_seconds", "avg_gap_after", "avg_gap_original")}),
                          flush=True)
                batch_rows += run_batching(args, Metered, spec, base, work, config, seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows, batch_rows


def _ms(values, scale=1.0, fmt="{:.2f}"):
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.mean(vals))} ± {fmt.format(statistics.stdev(vals))}"


def report(out: Path, meta: dict, rows: list[dict], batch_rows: list[dict] | None = None) -> str:
    lines = [
        "# Federated unlearning vs federated retrain (digits, 5 and 10 clients)",
        "",
        "Generated by `benchmarks/federated/run.py` (do not edit by hand; re-run the command).",
        "",
        "## Command",
        "",
        "```",
        meta["command"],
        "```",
        "",
        *(["The findings at the end were added afterwards with `python benchmarks/federated/run.py --report-only --out "
            "benchmarks/federated --note ...` (no re-run: every number is this run's).", ""] if meta.get("notes") else []),
        "## Path and protocol",
        "",
        "- **Path: in-process coordinator** (`DeletionCoordinator` + `InProcessTransport`), not Flower processes. The "
        "coordinator is the code the Flower `ServerApp` runs (`server_app.main` builds the same `DeletionCoordinator` over a "
        "`GridTransport`); `InProcessTransport` calls the ClientApp's handler functions directly and every message goes "
        "through the Flower `RecordDict` encoding (`to_content`/`from_content`). So rounds, client-rounds and bytes are "
        "those of the Flower path; seconds exclude Flower/Ray start-up, gRPC and per-message ClientApp processes.",
        f"- digits (`FederationSpec(benchmark='digits', scheme='iid')`), {meta['rounds']} FedAvg rounds of the default "
        "`ServerConfig` (3 local Adam epochs, lr 3e-3, strategy grad_diff, selector el2n at fraction 1.0, 1 repair round, "
        "FedEraser calibration 2 epochs, history every round).",
        f"- Seeds: {', '.join(map(str, meta['seeds']))} (seed = partition seed = training seed). Cells are mean ± std over seeds "
        "(a single number where there is one seed).",
        f"- Requests, one per fresh copy of the trained state: **sample** = {meta['sample_ids']} random ids of client-1 "
        "(filed by client-1); **class** = label 3, filed by the operator (every client's samples of that label); "
        "**client** = the last client (client-4 / client-9) leaves.",
        "- **unlearn** = the coordinator's `_unlearn_batch`: sample/class: one `train.unlearn` round on the owning clients "
        "(grad_diff through the runner) + 1 `train.repair` FedAvg round on every client's retain data; client: FedEraser "
        "calibration rounds on the remaining clients (rounds 1..R-1; round 0 reuses stored updates). **retrain** = "
        "`retrain_baseline`: FedAvg from the common initialisation, same rounds and local epochs, without the deleted ids "
        "(client: rollback to the checkpoint before it joined - round 0 here - then FedAvg without it).",
        "- rounds = server->clients training/unlearning exchanges; client-rounds = sum of clients addressed; bytes sent = "
        "server -> clients model arrays (`content_bytes`: what Flower's `ArrayRecord.count_bytes()` reports; config records "
        "and gRPC framing not counted); bytes received are about equal (one model back per client). Seconds = wall time of "
        "the phase, `torch.set_num_threads(1)`.",
        "- Avg.Gap = mean |metric - federated retrain metric| over forget acc, retain acc, test acc and MIA efficacy "
        "(`erasus_ray.evaluation.evaluate`), in points (x100); **original** = the trained model before the request.",
        "- **ledger** = the state the coordinator's verification gave the request: `verified` only if forget accuracy and "
        "MIA efficacy on its forget ids are each within tolerance of the federated retrain model (max(0.05, the 95% Agresti-Coull "
        "half-width of a rate on n forget ids)) "
        "or unlearning closed >= 90% of the original model's gap; `failed` (with the measured gaps) otherwise.",
        f"- Machine: {meta['machine']}; shared, 1-min load average {meta['load_min']:.1f}-{meta['load_max']:.1f} during the "
        f"run, so seconds are inflated and noisy (rounds and bytes are exact). Total wall time {meta['wall_min']:.1f} min.",
        "",
        "## Results",
        "",
        "| clients | level | n forget | unlearn rounds (client-rounds) | retrain rounds (client-rounds) | unlearn MB sent | "
        "retrain MB sent | unlearn s | retrain s | Avg.Gap unlearned (pts) | Avg.Gap original (pts) | forget acc orig / unl / retrain (%) | ledger |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["n_clients"], r["level"]), []).append(r)
    summary = []
    for (n, level), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], LEVELS.index(kv[0][1]))):
        col = lambda k: [r[k] for r in rs]  # noqa: E731
        states = sorted({r["state"] for r in rs})
        lines.append(
            f"| {n} | {level} | {_ms(col('n_forget'), fmt='{:.0f}')} | {_ms(col('unlearn_rounds'), fmt='{:.0f}')} "
            f"({_ms(col('unlearn_client_rounds'), fmt='{:.0f}')}) | {_ms(col('retrain_rounds'), fmt='{:.0f}')} "
            f"({_ms(col('retrain_client_rounds'), fmt='{:.0f}')}) | {_ms(col('unlearn_bytes_sent'), 1e-6)} | "
            f"{_ms(col('retrain_bytes_sent'), 1e-6)} | {_ms(col('unlearn_seconds'))} | {_ms(col('retrain_seconds'))} | "
            f"{_ms(col('avg_gap_after'), 100)} | {_ms(col('avg_gap_original'), 100)} | "
            f"{_ms(col('forget_acc_original'), 100, '{:.1f}')} / {_ms(col('forget_acc_after'), 100, '{:.1f}')} / "
            f"{_ms(col('forget_acc_retrain'), 100, '{:.1f}')} | {', '.join(states)} |"
        )
        summary.append({
            "n_clients": n, "level": level,
            "bytes_ratio": statistics.mean(r["unlearn_bytes_sent"] / r["retrain_bytes_sent"] for r in rs),
            "seconds_ratio": statistics.mean(r["unlearn_seconds"] / r["retrain_seconds"] for r in rs),
            "gap_after": statistics.mean(r["avg_gap_after"] for r in rs) * 100,
            "gap_orig": statistics.mean(r["avg_gap_original"] for r in rs) * 100,
        })
    lines += ["", "Cost of unlearning relative to the federated retrain (mean over seeds):", ""]
    for s in summary:
        lines.append(
            f"- {s['n_clients']} clients, {s['level']}: {s['bytes_ratio']:.2f}x the bytes, {s['seconds_ratio']:.2f}x the "
            f"seconds; Avg.Gap {s['gap_orig']:.2f} -> {s['gap_after']:.2f} pts."
        )
    if batch_rows:
        lines += [
            "",
            "## Batching: 3 requests arriving in one round vs one at a time",
            "",
            f"The operator's class 3 + {meta['sample_ids']} random ids of client-1 + {meta['sample_ids']} of client-2, "
            "each mode from a fresh copy of the same trained state. **batched**: all three validated before the round, "
            "one `process_pending()` - one `train.unlearn` round (the owners' ids merged per client), one repair round, "
            "one federated retrain for verification. **one at a time**: submit, `process_pending()`, next - three of each. "
            "Totals over unlearn + retrain; Avg.Gap on the union of the three requests' ids, final model vs the federated "
            "retrain without all of them (the last verification's `deleted_after_avg_gap`); original = the trained model "
            "against that same retrain.",
            "",
            "| clients | mode | batches | n forget | rounds (client-rounds) | MB sent | seconds (unlearn + retrain) | "
            "Avg.Gap final (pts) | Avg.Gap original (pts) | forget acc final / retrain (%) | ledger |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        bgroups: dict[tuple, list[dict]] = {}
        for r in batch_rows:
            bgroups.setdefault((r["n_clients"], r["mode"]), []).append(r)
        ratios = []
        for (n, mode), rs in sorted(bgroups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "batched")):
            tot = lambda k: [r[f"unlearn_{k}"] + r[f"retrain_{k}"] for r in rs]  # noqa: E731
            col = lambda k: [r[k] for r in rs]  # noqa: E731
            lines.append(
                f"| {n} | {mode} | {_ms(col('batches'), fmt='{:.0f}')} | {_ms(col('n_forget'), fmt='{:.0f}')} | "
                f"{_ms(tot('rounds'), fmt='{:.0f}')} ({_ms(tot('client_rounds'), fmt='{:.0f}')}) | {_ms(tot('bytes_sent'), 1e-6)} | "
                f"{_ms(tot('seconds'))} | {_ms(col('avg_gap_after'), 100)} | {_ms(col('avg_gap_original'), 100)} | "
                f"{_ms(col('forget_acc_after'), 100, '{:.1f}')} / {_ms(col('forget_acc_retrain'), 100, '{:.1f}')} | "
                f"{', '.join(sorted({s for r in rs for s in r['states']}))} |"
            )
        for n in sorted({k[0] for k in bgroups}):
            b, o = bgroups.get((n, "batched"), []), bgroups.get((n, "one at a time"), [])
            if b and o:
                def mean_tot(rs, k):
                    return statistics.mean(r[f"unlearn_{k}"] + r[f"retrain_{k}"] for r in rs)

                ratios.append(
                    f"- {n} clients: batched = {mean_tot(b, 'rounds') / mean_tot(o, 'rounds'):.2f}x the rounds, "
                    f"{mean_tot(b, 'bytes_sent') / mean_tot(o, 'bytes_sent'):.2f}x the bytes and "
                    f"{mean_tot(b, 'seconds') / mean_tot(o, 'seconds'):.2f}x the seconds of one at a time; final Avg.Gap "
                    f"{statistics.mean(r['avg_gap_after'] for r in b) * 100:.2f} vs {statistics.mean(r['avg_gap_after'] for r in o) * 100:.2f} pts."
                )
        lines += ["", *ratios]
    failures = [f"- {r['n_clients']} clients, seed {r['seed']}, {r['level']}: {r.get('state_reason')}" for r in rows if r["state"] == "failed"]
    failures += [f"- {r['n_clients']} clients, seed {r['seed']}, {r['mode']}, {rid}: {why}" for r in batch_rows or [] for rid, why in r.get("failed", {}).items()]
    if failures:
        lines += ["", "Requests the verification marked `failed` (the ledger's reason, measured numbers):", "", *failures]
    train = {}
    for r in rows:
        train.setdefault((r["n_clients"], r["seed"]), (r["train_rounds"], r["train_bytes_sent"], r["train_seconds"]))
    lines += ["", "Original FedAvg training (for scale): " + "; ".join(
        f"{n} clients seed {s}: {t[0]} rounds, {t[1] / 1e6:.2f} MB sent, {t[2]:.1f} s" for (n, s), t in sorted(train.items())) + "."]
    if meta.get("notes"):
        lines += ["", "## Findings and notes", ""] + [f"- {x}" for x in meta["notes"]]
    lines += ["", "Raw rows: `results.json` / `results.csv` (one row per clients x seed x level; `batch_rows` in results.json "
              "for the batching comparison).", ""]
    text = "\n".join(lines)
    atomic_write_text(out / "RESULTS.md", text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", default="5,10", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--seeds", default="0", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sample-ids", type=int, default=30)
    p.add_argument("--out", default=str(Path(__file__).parent))
    p.add_argument("--note", action="append", default=[])
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        data = json.loads((out / "results.json").read_text())
        if args.note:  # findings written after looking at the numbers; stored with the run's metadata
            data["meta"]["notes"] = args.note
            atomic_write_text(out / "results.json", json.dumps(data, indent=2))
        print(report(out, data["meta"], data["rows"], data.get("batch_rows")))
        return 0
    t0 = time.time()
    rows, batch_rows = run(args)
    import torch

    loads = [r["load_avg_1m"] for r in rows + batch_rows]
    meta = {
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "path": "in-process DeletionCoordinator + InProcessTransport",
        "clients": args.clients, "seeds": args.seeds, "rounds": args.rounds, "sample_ids": args.sample_ids,
        "machine": f"{platform.platform()}, Python {platform.python_version()}, torch {torch.__version__} (CPU), {os.cpu_count()} CPU cores",
        "load_min": min(loads), "load_max": max(loads), "wall_min": (time.time() - t0) / 60, "notes": args.note,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    atomic_write_text(out / "results.json", json.dumps({"meta": meta, "rows": rows, "batch_rows": batch_rows}, indent=2))
    with atomic_open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(report(out, meta, rows, batch_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
