"""glibc malloc thresholds for the scoring actors: freed gradient buffers are reused instead of page-faulted in
again (counted in minor page faults, not timed)."""

import subprocess
import sys

import pytest

from erasus_ray.errors import InvalidConfigError
from erasus_ray.utils.malloc import hold_freed_memory

CHILD = """
import resource, sys, torch
from erasus_ray.utils.malloc import hold_freed_memory
applied = hold_freed_memory({mb})
x = torch.ones(16 * 1024 * 1024); del x  # 64 MiB: over glibc's dynamic mmap ceiling of 32 MiB
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    x = torch.ones(16 * 1024 * 1024); del x
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mb):
    out = subprocess.run([sys.executable, "-c", CHILD.format(mb=mb)], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_held_memory_is_reused_not_faulted_in_again():
    applied, held = _faults(512)
    default_applied, default = _faults(None)
    assert applied and not default_applied
    pages = 64 * 1024 * 1024 // 4096
    assert default >= 15 * pages  # every 64 MiB buffer mapped and faulted in afresh
    assert held < 2 * pages  # the freed buffer is reused in place


def test_off_and_bad_values():
    assert hold_freed_memory(None) is False and hold_freed_memory(0) is False
    from erasus_ray.distributed import PoolSpec

    with pytest.raises(InvalidConfigError, match="malloc_mmap_threshold_mb"):
        PoolSpec(malloc_mmap_threshold_mb=-1)
    with pytest.raises(InvalidConfigError, match="malloc_mmap_threshold_mb"):
        PoolSpec(malloc_mmap_threshold_mb=4096)
    assert PoolSpec(malloc_mmap_threshold_mb=None).malloc_mmap_threshold_mb is None
