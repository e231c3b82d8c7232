"""A scoring pool on a simulated multi-node Ray cluster (``ray.cluster_utils.Cluster``) that loses a worker node
mid-scoring, with no replacement. Run in its own process by
``tests/test_distributed.py::test_node_removed_mid_scoring_keeps_the_coreset`` (a Cluster needs a Ray of its own,
not the test session's); prints one line ``RESULT <json>``: the undisturbed and disturbed coresets and the time of
each select (Ray's own messages about the removed raylet go to the same stdout).

    python tests/pool_node_loss_worker.py [--max-restarts 1] [--max-task-retries 1]
"""

from __future__ import annotations

import argparse
import json
import time

import ray
from ray._private.state import actors  # the GCS actor table (no dashboard needed)
from ray.cluster_utils import Cluster

from erasus_ray.benchmarks import load_benchmark
from erasus_ray.distributed import PoolSpec, ScoringPool
from erasus_ray.selectors import get_selector

SCORE_DELAY_S = 3.0  # each shard's scoring takes at least this long, so the node is removed while it scores


def slow_selector(delay_s: float = SCORE_DELAY_S):
    """gradient_norm whose every shard waits ``delay_s`` first, so a fault injected right after dispatch lands while
    the shard is in flight (a class defined in a function ships to the actors by value)."""
    base = type(get_selector("gradient_norm"))

    class SlowScores(base):
        def score(self, *args, **kwargs):
            time.sleep(delay_s)
            return super().score(*args, **kwargs)

    return SlowScores()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-restarts", type=int, default=1)
    p.add_argument("--max-task-retries", type=int, default=1)
    args = p.parse_args()
    # the head holds no CPU (GCS and the driver only); three 1-CPU worker nodes: two actors and one free node
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(3):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    bench = load_benchmark("digits", scenario="class", seed=0)
    spec = PoolSpec(num_actors=2, num_cpus=1, max_restarts=args.max_restarts, max_task_retries=args.max_task_retries)
    kwargs = dict(task=bench.task, fraction=0.2, seed=0)
    out: dict = {}
    with ScoringPool(spec) as pool:
        pool.start(bench.task)
        t0 = time.perf_counter()
        undisturbed = pool.select(slow_selector(), bench.original, bench.forget, **kwargs)
        out["undisturbed_s"] = time.perf_counter() - t0
    removed: list[str] = []

    with ScoringPool(spec) as pool:
        pool.start(bench.task)
        node_of = [actors(a._actor_id.hex())["Address"]["NodeID"] for a in pool._handles]
        victim = next(n for n in cluster.worker_nodes if n.node_id == node_of[0])

        def remove(actors) -> None:  # called right after the shards are submitted, on the main thread
            time.sleep(SCORE_DELAY_S / 3)
            cluster.remove_node(victim, allow_graceful=False)
            removed.append(victim.unique_id)

        pool.on_dispatch = remove
        t0 = time.perf_counter()
        try:
            disturbed = pool.select(slow_selector(), bench.original, bench.forget, **kwargs)
            out["disturbed_ids"] = disturbed.ids.tolist()
            out["disturbed_info"] = {k: v for k, v in disturbed.info.items() if k in ("lost_actors", "reassigned_shards")}
        except Exception as err:  # reported, not raised: the test asserts on it
            out["error"] = f"{type(err).__module__}.{type(err).__name__}: {err}"[:2000]
        out["disturbed_s"] = time.perf_counter() - t0
    out.update({"undisturbed_ids": undisturbed.ids.tolist(), "removed": removed, "nodes_of_actors": node_of})
    print("RESULT " + json.dumps(out), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
