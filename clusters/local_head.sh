#!/usr/bin/env bash
# A single-machine Ray head on 127.0.0.1 for `ray job submit`. Stop it with Ctrl-C (or kill this script's PID);
# never `ray stop`, which ends every Ray process on the machine.
#   bash clusters/local_head.sh            # then, in another shell:
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- erasus-ray unlearn --config examples/configs/digits_class.yaml
set -euo pipefail
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
# The dashboard (job server) modules get 30 s to start by default; loaded small machines need more.
export RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT="${RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT:-180}"
# The job agent (which runs submitted jobs) listens on 52365 unless told otherwise; if another Ray instance on this
# machine (a notebook's ray.init, a test session) holds that port, the agent never registers and every submit
# answers "No available agent to submit job": set RAY_DASHBOARD_AGENT_PORT to a free port.
exec ray start --head --node-ip-address=127.0.0.1 --port="${RAY_PORT:-6379}" \
  --dashboard-host=127.0.0.1 --dashboard-port="${RAY_DASHBOARD_PORT:-8265}" \
  --dashboard-agent-listen-port="${RAY_DASHBOARD_AGENT_PORT:-52365}" \
  --num-cpus="${RAY_NUM_CPUS:-2}" --block
