#!/usr/bin/env bash
# Runs one moe-jax command as NPROC processes of DEVICES_PER_PROC fake CPU devices each, joined by jax.distributed
# through a coordinator on this machine: what a multi-host pod does, on one machine.
#
#   scripts/launch_local.sh NPROC DEVICES_PER_PROC -- moe-jax train --config configs/tiny.yaml ...
#
# Each process gets --coordinator 127.0.0.1:PORT --num-processes NPROC --process-id I --local-devices DEVICES_PER_PROC.
# Process 0 prints; the others log to $LOG_DIR/process-I.log (default: a temporary directory). Exits non-zero if any
# process fails, with each failing process's exit status.
set -uo pipefail
if [ $# -lt 4 ] || [ "$3" != "--" ]; then
  echo "usage: $0 NPROC DEVICES_PER_PROC -- moe-jax COMMAND [ARGS...]" >&2
  exit 2
fi
nproc=$1; per=$2; shift 3
case "$nproc$per" in *[!0-9]*|"") echo "$0: NPROC and DEVICES_PER_PROC must be positive integers" >&2; exit 2;; esac
port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
logs=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$logs"
pids=()
for ((i = 0; i < nproc; i++)); do
  args=("$@" --coordinator "127.0.0.1:$port" --num-processes "$nproc" --process-id "$i" --local-devices "$per")
  if [ "$i" -eq 0 ]; then
    JAX_PLATFORMS=cpu "${args[@]}" &
  else
    JAX_PLATFORMS=cpu "${args[@]}" >"$logs/process-$i.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "launch_local: process $i exited with status $rc (log: $logs/process-$i.log)" >&2
    status=1
  fi
done
exit $status
