#!/usr/bin/env bash
# launch/tpu_vm.sh: the same training command on every worker of a Cloud TPU VM slice, rerun after preemption.
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a launch/tpu_vm.sh --config=configs/bone_quality.py:paper --workdir=/mnt/runs/bone_quality
#
# Expects: gcloud installed and authenticated on this machine; a TPU VM slice TPU_NAME in ZONE (PROJECT
#   optional, else gcloud's default); on every worker this repository at REPO_DIR (default ~/spine_jax)
#   with spine_jax and jax[tpu] installed for PYTHON (default python3); a --workdir that every worker
#   mounts (Filestore/NFS, or a bucket through gcsfuse), because every worker writes its part of each
#   checkpoint there.
# Sets: SPINE_JAX_DISTRIBUTED=1 on every worker (`gcloud ... ssh --worker=all`), so jax.distributed.initialize
#   takes the coordinator, process count and index from the TPU metadata; PYTHONUNBUFFERED=1. The global
#   batch is config.batch_size whatever the slice size (it must divide by the number of TPU cores).
# Preemption: a worker that gets SIGTERM (maintenance event, spot notice) makes every worker write a
#   checkpoint at the same step and exit with 42; this script then runs the command again after
#   RESTART_WAIT_S seconds (default 60), at most MAX_RESTARTS times (default 20), and the run resumes from
#   the latest complete checkpoint. A deleted spot slice must be recreated (e.g. by a queued resource)
#   before this script is run again. Any other failure ends the script with that status.
# Change: the training arguments after the script name (any train flag: --config.batch_size=1024,
#   --heartbeat_timeout=300, ...), TPU_NAME, ZONE, PROJECT, REPO_DIR, PYTHON, MAX_RESTARTS, RESTART_WAIT_S.
set -u

: "${TPU_NAME:?set TPU_NAME to the TPU VM slice}" "${ZONE:?set ZONE to the zone of the slice}"
project=()
if [[ -n "${PROJECT:-}" ]]; then project=(--project="$PROJECT"); fi
args=$(printf '%q ' "$@")
# Each worker reports its exit status on a line of its own: gcloud's own status does not say which.
remote="cd ${REPO_DIR:-\$HOME/spine_jax} && SPINE_JAX_DISTRIBUTED=1 PYTHONUNBUFFERED=1 ${PYTHON:-python3} -m spine_jax.train $args
rc=\$?; echo \"spine_jax-exit-status \$(hostname) \$rc\"; exit \$rc"

for ((attempt = 0; ; attempt++)); do
  log=$(mktemp)
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${project[@]}" --worker=all --command="$remote" 2>&1 | tee "$log"
  ssh_status=${PIPESTATUS[0]}
  codes=$(sed -n 's/.*spine_jax-exit-status [^ ]* \([0-9][0-9]*\).*/\1/p' "$log" | sort -un)
  rm -f "$log"
  if [[ -z "$codes" ]]; then
    echo "tpu_vm.sh: no worker reported an exit status (gcloud status $ssh_status)" >&2
    exit $((ssh_status == 0 ? 1 : ssh_status))
  fi
  failed=$(grep -vxE '0|42' <<<"$codes" | head -n 1)
  if [[ -n "$failed" ]]; then
    echo "tpu_vm.sh: a worker failed with status $failed (statuses: $(echo $codes))" >&2
    exit "$failed"
  fi
  if ! grep -qx 42 <<<"$codes"; then
    exit 0
  fi
  if ((attempt >= ${MAX_RESTARTS:-20})); then
    echo "tpu_vm.sh: preempted again after $attempt restarts; run this script again to resume" >&2
    exit 42
  fi
  echo "tpu_vm.sh: preempted with a checkpoint written; restarting in ${RESTART_WAIT_S:-60} s" >&2
  sleep "${RESTART_WAIT_S:-60}"
done
