"""Wall-clock seconds of the closed loop in process vs inside Ray Train workers (1 and 2), same defaults.

Command: ``python benchmarks/closed_loop/ray_train_timing.py [benchmark:scenario ...]`` (default ``wine:class
digits:class``). Ray is started once before the runs (its start-up is printed on its own line, not charged to a
run); each Ray Train run pays its own TorchTrainer start. Not a test: timings depend on the machine's load.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import ray

from erasus_ray import ErasusUnlearner
from erasus_ray.benchmarks import load_benchmark
from erasus_ray.evaluation.verification import set_stats
from erasus_ray.runners.ray_train import RayTrainRunner


def run(b, **kw):
    """One fit with the defaults; ``checkpoint_every_s`` (ray_train only) overrides the runner's default."""
    every = kw.pop("checkpoint_every_s", None)
    u = ErasusUnlearner(b.original, progress=False, **kw)
    if every is not None:
        u.make_runner = lambda cfg, controller=None: RayTrainRunner(cfg, closed_loop=controller, checkpoint_every_s=every,
                                                                   **u.train_scaling)
    t = time.perf_counter()
    r = u.fit(forget_data=b.forget, retain_data=b.retain)
    v = r.verification
    return time.perf_counter() - t, v, set_stats(r.model, b.task, b.forget).acc


def main(cases: list[str]) -> None:
    warnings.simplefilter("ignore")
    t = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024**2)
    print(f"ray.init: {time.perf_counter() - t:.1f} s")
    print("| case | backend | seconds | mode | verified | steps | verifications | coreset growth | forget acc |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for case in cases:
        name, scenario = case.split(":")
        b = load_benchmark(name, scenario=scenario, seed=0)
        run(b)  # warm-up (first forward passes, allocator)
        local = [run(b) for _ in range(3)]
        rows = [("local (median of 3)", statistics.median(s for s, _, _ in local), local[0][1], local[0][2])]
        for label, kw in (("ray_train, 1 worker", {"num_workers": 1}), ("ray_train, 2 workers", {"num_workers": 2}),
                          ("ray_train, 2 workers, checkpoint every window", {"num_workers": 2, "checkpoint_every_s": 0})):
            s, v, acc = run(b, backend="ray_train", **kw)
            rows.append((label, s, v, acc))
        for label, s, v, acc in rows:
            print(f"| {case} | {label} | {s:.1f} | {v['mode']} | {v['passed']} | {v['steps']} | {v['verifications']} | "
                  f"{v['coreset_growth']} | {acc:.2f} |", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:] or ["wine:class", "digits:class"])
