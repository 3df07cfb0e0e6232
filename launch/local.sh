#!/usr/bin/env bash
# launch/local.sh N [train args...]
#
# Runs N processes of `python -m spine_jax.train` on this machine, joined into one distributed job the
# way a multi-host launcher joins hosts: for testing multi-process code without a cluster.
#
#   launch/local.sh 2 --config=configs/bone_quality.py:smoke --workdir=/tmp/run2
#
# Expects: run from the repository root (or with the package installed), N >= 1, then the usual train
#   arguments: --config=FILE[:variant] --workdir=DIR [--config.field=value ...] [--heartbeat_timeout=S ...].
# Sets for every process: JAX_PLATFORMS=cpu (unless already set), JAX_NUM_CPU_DEVICES (devices per
#   process), a coordinator on 127.0.0.1 at a free port, --num_processes=N --process_id=i.
# Output: process 0's stdout and stderr unchanged; every other process's lines prefixed "[process i] ".
# Exit status: 0 when every process succeeds; 42 when the run was preempted (SIGTERM: a checkpoint was
#   written; run the same command again to resume); otherwise the status of the first failing process
#   (in index order) and a line naming each process's status. SIGTERM or SIGINT to this script is passed
#   to every process as SIGTERM, so Ctrl-C checkpoints and exits with 42.
# Change with environment variables: PYTHON (interpreter, default python), SPINE_JAX_LOCAL_DEVICES
#   (devices per process, default 2), SPINE_JAX_COORDINATOR_PORT (default: a free port).
set -u

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N [train args...]   (N processes on this machine; see the top of this file)" >&2
  exit 2
fi
n=$1
shift
py=${PYTHON:-python}
port=${SPINE_JAX_COORDINATOR_PORT:-$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export JAX_NUM_CPU_DEVICES=${SPINE_JAX_LOCAL_DEVICES:-2}

pids=()
forward() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
}
# Background processes of a script ignore SIGINT, so both signals go on as SIGTERM (checkpoint + 42).
trap forward TERM INT

for ((i = 0; i < n; i++)); do
  args=(-m spine_jax.train "--coordinator_address=127.0.0.1:$port" "--num_processes=$n" "--process_id=$i" "$@")
  if ((i == 0)); then
    "$py" "${args[@]}" &
  else
    "$py" "${args[@]}" > >(sed -u "s/^/[process $i] /") 2>&1 &
  fi
  pids+=("$!")
done

statuses=()
for i in "${!pids[@]}"; do
  while :; do
    wait "${pids[$i]}"
    s=$?
    # A trapped signal interrupts `wait` (status > 128) while the process may still run (or be unreaped).
    kill -0 "${pids[$i]}" 2>/dev/null || break
  done
  statuses[$i]=$s
done

rc=0
for s in "${statuses[@]}"; do
  if ((s != 0 && s != 42)); then rc=$s; break; fi
done
if ((rc == 0)); then
  for s in "${statuses[@]}"; do ((s == 42)) && rc=42; done
fi
if ((rc != 0)); then
  summary=""
  for i in "${!statuses[@]}"; do summary+="${summary:+, }process $i: ${statuses[$i]}"; done
  echo "local.sh: exit statuses: $summary" >&2
fi
exit "$rc"
