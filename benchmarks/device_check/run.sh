#!/usr/bin/env bash
# The GPU checks (tests/test_device.py) as one prepared run for a lent GPU machine; see README.md beside this file.
#   bash benchmarks/device_check/run.sh            # from the repository root; PYTHON=.venv/bin/python to pick one
# Writes device_check.log (and junit.xml) under $OUT when OUT is set, else under results/device_check/.
# Exit status: pytest's; 3 when no CUDA device is visible (the tests would all skip, which proves nothing).
set -uo pipefail
cd "$(dirname "$0")/../.."

export ERASUS_RAY_CACHE="${ERASUS_RAY_CACHE:-$PWD/.cache/erasus-ray}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
  RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
PY="${PYTHON:-python3}"
DEST="${OUT:-results/device_check}"
mkdir -p "$DEST"
LOG="$DEST/device_check.log"

# Packages the machine's image lacks (Ray and what Ray Train needs), carried as wheels in .whl (README.md).
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # erasus_ray from this checkout, not an installed copy

{
  echo "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo '?') on $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi: not available"
  "$PY" - <<'PY'
import importlib, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| cuda available:", torch.cuda.is_available(), "| bf16:", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
for name in ("transformers", "tokenizers", "peft", "ray"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as err:  # ray missing: the Ray Train test is skipped, and the log says so
        print(f"{name}: not importable ({type(err).__name__}: {err})")
PY
} 2>&1 | tee "$LOG"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"; then
  echo "no CUDA device visible: not running tests/test_device.py (every test would skip)" | tee -a "$LOG"
  exit 3
fi

start=$(date +%s)
"$PY" -m pytest -q tests/test_device.py -rs --durations=5 -p no:cacheprovider --junitxml="$DEST/junit.xml" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
echo "== pytest exit status $status after $(( $(date +%s) - start )) s" | tee -a "$LOG"
exit "$status"
