#!/usr/bin/env bash
# N processes on this machine, talking over loopback, each with M CPU devices: the multi-host code paths
# without a cluster (development and tests).
#
#   launch/local.sh N M COMMAND...
#   launch/local.sh 2 2 scalingnote train --config configs/tiny.py:smoke --workdir runs/mp --config.mesh='(2,2,1)'
#
# Every process runs COMMAND with SCALINGNOTE_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID / _CPU_DEVICES
# set (read by scalingnote_jax/distributed.py). Process 0 prints to this terminal; the others' output goes
# to stderr prefixed with "[process i]". If any process fails or is killed, the others are stopped (they
# would wait forever in a collective) and this script exits with the first failure's status.
# SCALINGNOTE_PORT picks the coordinator port (default: a free one).
set -euo pipefail

if [[ $# -lt 3 || ! $1 =~ ^[1-9][0-9]*$ || ! $2 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES CPU_DEVICES_PER_PROCESS COMMAND..." >&2
  exit 2
fi
n=$1 m=$2
shift 2
port=${SCALINGNOTE_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
# jax.distributed catches SIGTERM (a preemption notice, acted on at the next step), but a process blocked in a
# collective whose peer is gone never gets there: after SCALINGNOTE_STOP_GRACE seconds (default 10), SIGKILL.
stop_all() {
  kill "${pids[@]}" 2>/dev/null || true
  local deadline=$((SECONDS + ${SCALINGNOTE_STOP_GRACE:-10}))
  while ((SECONDS < deadline)) && kill -0 "${pids[@]}" 2>/dev/null; do sleep 0.2; done
  kill -9 "${pids[@]}" 2>/dev/null || true
}
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < n; i++)); do
  export SCALINGNOTE_COORDINATOR=127.0.0.1:$port SCALINGNOTE_NUM_PROCESSES=$n SCALINGNOTE_PROCESS_ID=$i \
         SCALINGNOTE_CPU_DEVICES=$m JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  if ((i == 0)); then
    "$@" &
  else
    "$@" > >(sed -u "s/^/[process $i] /" >&2) 2>&1 &
  fi
  pids+=($!)
done

status=0
running=("${pids[@]}")
while ((${#running[@]})); do
  finished=
  wait -n -p finished "${running[@]}" || { status=$?; stop_all; break; }  # the first failure (or kill) ends it
  left=()
  for pid in "${running[@]}"; do [[ $pid == "$finished" ]] || left+=("$pid"); done
  running=("${left[@]}")
done
wait 2>/dev/null || true
exit $status
