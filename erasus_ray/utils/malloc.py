"""glibc ``malloc`` tuning for compute processes (the CLI, Ray scoring actors, Ray Train workers, Tune trials).

By default glibc serves allocations above a *dynamic* threshold (128 KiB, raised up to 32 MiB as large blocks are
freed) with a fresh ``mmap`` and hands freed memory back to the kernel, so every scoring batch page-faults its
per-sample gradient buffers in again. Measured here (2-core VM, MNIST-5k CNN, ``gradient_norm`` via ``torch.func``
on 4000 samples): a fresh Ray actor took 3.1-3.7 s per request against 1.4-1.6 s in a driver whose heap had
already grown; with the thresholds below the actor took 1.5-1.6 s. Fixing the thresholds keeps freed blocks in the
process for reuse, so its resident memory stays at its high-water mark (one batch's working set). The same
page faults cost in-process scoring ~15% on small models: ``influence`` on the digits MLP took 11.8 ms per call
with glibc's defaults and 10.0 ms with the thresholds held (median of 100; ``benchmarks/selector_scoring``).

erasus-ray's own processes apply :func:`hold_freed_memory_from_env` when they start (``erasus-ray`` commands,
Ray Train workers, Tune trials; the scoring actors read ``malloc_mmap_threshold_mb`` from ``actors/scoring.yaml``).
A program that imports the library keeps its allocator as it is unless it calls :func:`hold_freed_memory`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from erasus_ray.errors import InvalidConfigError

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: environment variable read by :func:`hold_freed_memory_from_env` (MiB; 0 keeps glibc's defaults)
ENV_VAR = "ERASUS_RAY_MALLOC_MMAP_MB"
#: the threshold erasus-ray's processes use unless ``ERASUS_RAY_MALLOC_MMAP_MB`` says otherwise (as the actors')
DEFAULT_MMAP_THRESHOLD_MB = 512


def hold_freed_memory(mmap_threshold_mb: int | None) -> bool:
    """Serve allocations up to ``mmap_threshold_mb`` MiB from the heap and keep up to twice that freed memory in
    the process (``mallopt(M_MMAP_THRESHOLD)`` / ``mallopt(M_TRIM_THRESHOLD)``). ``None`` or 0 leaves glibc's
    defaults. Returns whether the setting was applied (False off glibc, e.g. macOS or musl)."""
    if not mmap_threshold_mb or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    size = int(mmap_threshold_mb) * 1024 * 1024
    # glibc caps M_MMAP_THRESHOLD at HEAP_MAX_SIZE / 2 (32 MiB on 64-bit) only for the *dynamic* rule; an explicit
    # value up to INT_MAX is accepted
    size = min(size, 2**31 - 1)
    ok = bool(mallopt(M_MMAP_THRESHOLD, size)) and bool(mallopt(M_TRIM_THRESHOLD, min(2 * size, 2**31 - 1)))
    return ok


def hold_freed_memory_from_env(default_mb: int = DEFAULT_MMAP_THRESHOLD_MB) -> bool:
    """:func:`hold_freed_memory` with the threshold from ``$ERASUS_RAY_MALLOC_MMAP_MB`` (MiB; ``0`` keeps glibc's
    defaults), else ``default_mb``. Raises :class:`~erasus_ray.errors.InvalidConfigError` for a value that is not
    an integer in [0, 2047]."""
    raw = os.environ.get(ENV_VAR)
    try:
        mb = default_mb if raw is None or not raw.strip() else int(raw)
    except ValueError:
        raise InvalidConfigError(f"{ENV_VAR} must be an integer number of MiB in [0, 2047] (0: glibc defaults), got {raw!r}") from None
    if not 0 <= mb <= 2047:
        raise InvalidConfigError(f"{ENV_VAR} must be an integer number of MiB in [0, 2047] (0: glibc defaults), got {raw!r}")
    return hold_freed_memory(mb)
