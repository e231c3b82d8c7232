"""Distributed execution on Ray: the scoring actor pool (coreset selection over forget-set shards)."""

from erasus_ray.distributed.pool import AUTO_THRESHOLD, CENTRAL_OBJECTIVE_MAX, PoolSpec, ScoringPool, ensure_ray, materialise, shard_ids

__all__ = ["AUTO_THRESHOLD", "CENTRAL_OBJECTIVE_MAX", "PoolSpec", "ScoringPool", "ensure_ray", "materialise", "shard_ids"]
