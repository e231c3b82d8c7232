"""glibc malloc thresholds for the scoring actors: freed gradient buffers are reused instead of page-faulted in
again (counted in minor page faults, not timed)."""

import os
import subprocess
import sys

import pytest

from erasus_ray.errors import InvalidConfigError
from erasus_ray.utils.malloc import hold_freed_memory

CHILD = """
import resource, sys, torch
from erasus_ray.utils.malloc import hold_freed_memory
applied = {setup}
x = torch.ones(16 * 1024 * 1024); del x  # 64 MiB: over glibc's dynamic mmap ceiling of 32 MiB
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    x = torch.ones(16 * 1024 * 1024); del x
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mb, setup=None, env=None):
    code = CHILD.format(setup=setup or f"hold_freed_memory({mb})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)

PAGES = 64 * 1024 * 1024 // 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_held_memory_is_reused_not_faulted_in_again():
    applied, held = _faults(512)
    default_applied, default = _faults(None)
    assert applied and not default_applied
    assert default >= 15 * PAGES  # every 64 MiB buffer mapped and faulted in afresh
    assert held < 2 * PAGES  # the freed buffer is reused in place


CLI_SETUP = "__import__('erasus_ray.cli', fromlist=['_common_env'])._common_env() or True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_cli_process_holds_freed_memory_unless_disabled():
    """Every ``erasus-ray`` command starts with the thresholds held (ERASUS_RAY_MALLOC_MMAP_MB, default 512);
    0 keeps glibc's defaults."""
    _, held = _faults(None, CLI_SETUP, {"ERASUS_RAY_MALLOC_MMAP_MB": ""})
    _, off = _faults(None, CLI_SETUP, {"ERASUS_RAY_MALLOC_MMAP_MB": "0"})
    assert held < 2 * PAGES
    assert off >= 15 * PAGES


def test_env_threshold_validation(monkeypatch):
    from erasus_ray.utils.malloc import ENV_VAR, hold_freed_memory_from_env

    for bad in ("lots", "-5", "4096"):
        monkeypatch.setenv(ENV_VAR, bad)
        with pytest.raises(InvalidConfigError, match=ENV_VAR):
            hold_freed_memory_from_env()
    monkeypatch.setenv(ENV_VAR, "0")
    assert hold_freed_memory_from_env() is False


def test_off_and_bad_values():
    assert hold_freed_memory(None) is False and hold_freed_memory(0) is False
    from erasus_ray.distributed import PoolSpec

    with pytest.raises(InvalidConfigError, match="malloc_mmap_threshold_mb"):
        PoolSpec(malloc_mmap_threshold_mb=-1)
    with pytest.raises(InvalidConfigError, match="malloc_mmap_threshold_mb"):
        PoolSpec(malloc_mmap_threshold_mb=4096)
    assert PoolSpec(malloc_mmap_threshold_mb=None).malloc_mmap_threshold_mb is None
