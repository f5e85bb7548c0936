#!/usr/bin/env bash
# Run a config or a sweep on every worker of a TPU VM slice: copy the code, install, then one multi-host run at a time
# (each process calls jax.distributed.initialize() via --config.mesh.distributed=true and works on its own slice).
#   launch/tpu_pod.sh [--dry-run] --tpu=NAME --zone=ZONE [--project=P] CONFIG[:arg] WORKDIR [--config.field=value ...]
# WORKDIR must be a directory every worker sees (e.g. a gcsfuse mount of a bucket, /mnt/gcs/runs/x, or NFS):
# stages write temp dirs and rename them, which needs a file system, not a gs:// URL.
set -euo pipefail
dry=0; tpu=""; zone=""; project=""
while [[ $# -gt 0 && "$1" == --* && "$1" != --config.* ]]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --tpu=*) tpu=${1#--tpu=} ;;
    --zone=*) zone=${1#--zone=} ;;
    --project=*) project=${1#--project=} ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$tpu" && -n "$zone" && $# -ge 2 ]] || {
  echo "usage: $0 [--dry-run] --tpu=NAME --zone=ZONE [--project=P] CONFIG[:arg] WORKDIR [--config.f=v ...]" >&2; exit 2; }
config=$1; workdir=$2; shift 2
gcloud=(gcloud compute tpus tpu-vm)
where=("$tpu" "--zone=$zone" ${project:+"--project=$project"})
repo=$(cd "$(dirname "$0")/.." && pwd)
run() { if (( dry )); then echo "$*"; else echo "+ $*" >&2; "$@"; fi; }
run "${gcloud[@]}" scp --recurse "$repo" "${where[0]}:~/subl_jax" "${where[@]:1}" --worker=all
run "${gcloud[@]}" ssh "${where[@]}" --worker=all \
  --command="cd ~/subl_jax && python3 -m pip install -q -e . 'jax[tpu]'"
mapfile -t cmds < <(PYTHON=python3 bash "$repo/launch/local.sh" --dry-run "$config" "$workdir" "$@")
for cmd in "${cmds[@]}"; do
  run "${gcloud[@]}" ssh "${where[@]}" --worker=all --command="cd ~/subl_jax && $cmd --config.mesh.distributed=true"
done
