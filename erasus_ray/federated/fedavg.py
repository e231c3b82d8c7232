"""FedAvg (McMahan et al., AISTATS 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
Data"): the new global model is the average of the clients' models weighted by their number of training samples.

Used for training rounds, for aggregating unlearning updates of the clients that own a request's ids, and for
repair rounds. Cost: one pass over the parameters per client. Example:

    >>> global_state = fedavg([(state_a, 120), (state_b, 40)])   # 0.75 * a + 0.25 * b
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from erasus_ray.errors import InvalidDataError


def fedavg(updates: Sequence[tuple[Mapping[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """``sum_k n_k * state_k / sum_k n_k`` per tensor; integer buffers (e.g. BatchNorm counters) take the first state's.

    Raises InvalidDataError on no updates, a non-positive total weight, or states whose keys/shapes differ.
    """
    updates = [(s, float(n)) for s, n in updates]
    if not updates:
        raise InvalidDataError("fedavg needs at least one update")
    if any(n < 0 for _, n in updates) or sum(n for _, n in updates) <= 0:
        raise InvalidDataError(f"fedavg weights must be >= 0 with a positive sum, got {[n for _, n in updates]}")
    first = updates[0][0]
    for k, (state, _) in enumerate(updates[1:], 1):
        if set(state) != set(first):
            raise InvalidDataError(f"update {k} has keys {sorted(set(state) ^ set(first))[:5]} that update 0 does not share")
        for name, t in state.items():
            if t.shape != first[name].shape:
                raise InvalidDataError(f"update {k}: {name!r} has shape {tuple(t.shape)}, update 0 {tuple(first[name].shape)}")
    total = sum(n for _, n in updates)
    out: dict[str, torch.Tensor] = {}
    for name, ref in first.items():
        if not torch.is_floating_point(ref):
            out[name] = ref.clone()
            continue
        acc = torch.zeros_like(ref, dtype=torch.float64)
        for state, n in updates:
            acc += state[name].to(torch.float64) * (n / total)
        out[name] = acc.to(ref.dtype)
    return out


def state_delta(after: Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``after - before`` for floating tensors (a client's update)."""
    return {k: after[k] - before[k] for k in before if torch.is_floating_point(before[k])}


def apply_delta(state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state + delta`` (tensors not in ``delta`` copied)."""
    return {k: (v + delta[k]).to(v.dtype) if k in delta else v.clone() for k, v in state.items()}
