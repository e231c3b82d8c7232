#!/usr/bin/env bash
# A single-machine Ray head on 127.0.0.1 for `ray job submit`. Stop it with Ctrl-C (or kill this script's PID);
# never `ray stop`, which ends every Ray process on the machine.
#   bash clusters/local_head.sh            # then, in another shell:
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- erasus-ray unlearn --config examples/configs/digits_class.yaml
set -euo pipefail
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
# The dashboard (job server) modules get 30 s to start by default; loaded small machines need more.
export RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT="${RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT:-180}"
exec ray start --head --node-ip-address=127.0.0.1 --port="${RAY_PORT:-6379}" \
  --dashboard-host=127.0.0.1 --dashboard-port="${RAY_DASHBOARD_PORT:-8265}" \
  --num-cpus="${RAY_NUM_CPUS:-2}" --block
