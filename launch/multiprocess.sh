#!/usr/bin/env bash
# One job as N processes on this machine: JAX's distributed runtime over 127.0.0.1 (CPU collectives over gloo),
# the same code path as a TPU pod (launch/tpu_pod.sh) or a SLURM array (launch/gpu_slurm.sbatch).
#   launch/multiprocess.sh N --config=configs/X.py --workdir=DIR [--config.field=value ...]
# Env: DEVICES (fake CPU devices per process, default 2), PORT (coordinator port, default 12355), PYTHON, XLA_FLAGS
# (kept, the device count added).
set -euo pipefail
n="$1"; shift
py="${PYTHON:-python}"
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS="127.0.0.1:${PORT:-12355}" SUBL_JAX_NUM_PROCESSES="$n" \
  SUBL_JAX_PROCESS_ID="$i" XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES:-2}" \
    "$py" -m subl_jax.main "$@" --config.mesh.distributed=true &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done  # every process's status; any failure fails the job
exit "$rc"
