#!/usr/bin/env bash
# Run one config, or every run of a sweep config (one with get_sweep), on this machine, one after another.
#   launch/local.sh [--dry-run] CONFIG[:arg] WORKDIR [--config.field=value ...]
# For a sweep, WORKDIR is the root: each run writes to WORKDIR/<run name>. Finished stages are skipped on re-runs.
set -euo pipefail
dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
[[ $# -ge 2 ]] || { echo "usage: $0 [--dry-run] CONFIG[:arg] WORKDIR [--config.field=value ...]" >&2; exit 2; }
config=$1; workdir=$2; shift 2
python=${PYTHON:-python}
if grep -q "def get_sweep" "${config%%:*}"; then
  mapfile -t cmds < <("$python" -m subl_jax.sweep --config="$config" --workdir_root="$workdir" --python="$python")
else
  cmds=("$python -m subl_jax.main --config=$config --workdir=$workdir")
fi
for cmd in "${cmds[@]}"; do
  cmd="$cmd${*:+ $*}"
  if (( dry )); then echo "$cmd"; else echo "+ $cmd" >&2; eval "$cmd"; fi
done
