"""Comparing float32 results of two computations that are equal in exact arithmetic but not bitwise the same.

Optimised float32 kernels (MKL / oneDNN with AVX-512, cuBLAS) may round a row differently depending on how many
rows share a matrix product, and may sum in another order with another thread count: a batch of 7 vs 64 rows, a
shard vs the whole set, vmap vs a per-sample loop, factored vs autograd gradients agree only up to float32 rounding
(issue #22). That rounding is relative to the magnitude of the operands, not of each result: an element that is
small through cancellation (a score near zero, ``1 - p`` of a well-fit sample, a gradient entry of a near-dead unit)
carries an absolute error of order eps32 times the scale of its vector, i.e. any relative error. So the promise
checked here is ``|got - ref| <= scale_rtol * max|ref|`` over the compared array, never per element.

``scale_rtol = 1e-4`` (~840 eps32) covers sums over up to ~1e5 terms (error ~ sqrt(n) eps32 on random-signed
rounding, with room for the softmax / log / exp between); a wrong algorithm (a missing term, a wrong sample, a
wrong factor) moves results by a large fraction of the scale and still fails.

Imported by the tests as ``from _tolerances import ...`` (tests/ has no ``__init__.py``: pytest's default
``prepend`` import mode puts tests/ on ``sys.path``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7
SCALE_RTOL = 1e-4


def _as_array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def _aligned(got: Any, ref: Any) -> tuple[np.ndarray, np.ndarray]:
    """Arrays of the same shape; mappings (``Coreset.scores``: id -> score) must have the same keys, compared by key."""
    if isinstance(ref, Mapping) or isinstance(got, Mapping):
        assert isinstance(got, Mapping) and isinstance(ref, Mapping), "compare a mapping with a mapping"
        assert set(got) == set(ref), f"different keys: {sorted(set(got) ^ set(ref))[:10]}"
        keys = list(ref)
        return _as_array([got[k] for k in keys]), _as_array([ref[k] for k in keys])
    g, r = _as_array(got), _as_array(ref)
    assert g.shape == r.shape, f"shapes differ: {g.shape} vs {r.shape}"
    return g, r


def assert_float32_close(got: Any, ref: Any, *, scale_rtol: float = SCALE_RTOL, scale: float | None = None,
                         err_msg: str = "") -> None:
    """Assert ``|got - ref| <= scale_rtol * S`` elementwise, ``S = max|ref|`` over the whole compared array, or a
    given ``scale`` (when ``ref`` is itself a small difference of larger terms). The scale is the array's, not each
    row's: a well-fit sample's gradient ``(p - onehot) a`` carries an absolute error of order eps32 (``p`` rounds
    near 1), not eps32 times its own small norm. Accepts arrays, tensors, lists, scalars and id -> score mappings
    (same keys, compared by key); compares in float64. Cost: one pass over the arrays."""
    g, r = _aligned(got, ref)
    label = f" ({err_msg})" if err_msg else ""
    assert np.all(np.isfinite(g)) and np.all(np.isfinite(r)), f"non-finite values{label}"
    s = float(scale) if scale is not None else float(np.abs(r).max(initial=0.0))
    diff = np.abs(g - r)
    bad = diff > scale_rtol * s
    if bad.any():
        where = np.unravel_index(int(np.argmax(diff)), g.shape)
        raise AssertionError(
            f"float32 results differ beyond {scale_rtol:g} x scale{label}: {int(bad.sum())} of {g.size} elements, "
            f"worst |got - ref| = {float(diff[where]):.3g} = {float(diff[where]) / s if s else np.inf:.3g} x scale at "
            f"{tuple(int(i) for i in where)} (got {float(g[where])!r}, ref {float(r[where])!r}, scale {s:.3g})"
        )

