#!/usr/bin/env bash
# The demo at GPU scale (configs/demo_gpu.py: 5 animals × 5 seeds, 2,048 numbers per teacher) on one lent GPU, with
# SmolLM2-135M-Instruct's real weights. Random weights would show no trait, so the weights must travel. The GGUF is
# 94 MiB and one call carries at most 64 MiB, so it travels in two halves, in two calls to the same warm machine: an
# ignored folder that a call leaves in the repo copy is still there at the next call, while the machine stays warm
# (it goes back after ~30 s idle, so make the second call at once).
#
# Here, once (.gitignore keeps these folders from travelling uncarried; the wheels are what the device image
# lacks and subl_jax imports):
#   bash benchmarks/gpu_demo.sh split      # .gpu_w1/, .gpu_w2/: the halves and the whole file's sha256
#   .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl ml-collections==1.1.0 gguf==0.19.0 tensorboardX==2.6.5
# The lead's two device calls, back to back:
#   1. carry=[".gpu_w1"]          command="bash benchmarks/gpu_demo.sh part1"   (checks the first half landed)
#   2. carry=[".whl", ".gpu_w2"]  command="bash benchmarks/gpu_demo.sh run"     (joins, checks, runs the study)
# `run` stops the study after DEMO_TIMEOUT seconds (default 480) and returns what exists: report.{json,md,png} and the
# log under $OUT. Every stage is cached in runs/demo_gpu (ignored, so kept on a warm machine): a second `run` resumes.
#
# Smoke run of the same path on a CPU (two animals × two seeds, 48 numbers each: 3 student steps; ~15 minutes):
#   bash benchmarks/gpu_demo.sh split && GPU_DEMO_TINY=1 JAX_PLATFORMS=cpu PY=.venv/bin/python OUT=/tmp/demo_out \
#     bash benchmarks/gpu_demo.sh run
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
PY=${PY:-python3}
DEMO_TIMEOUT=${DEMO_TIMEOUT:-480}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf

split() {  # here: the GGUF of the local cache (made by `make test` or `make run`) in two halves
  local src=${SUBL_JAX_CACHE:-$HOME/.cache/subl_jax}/smollm2/$GGUF
  [[ -f $src ]] || { echo "no $src: run \`make test\` (or make run) first, which fetches the default model"; exit 1; }
  rm -rf .gpu_w1 .gpu_w2 && mkdir -p .gpu_w1 .gpu_w2
  local half=$(( ($(stat -c %s "$src") + 1) / 2 ))
  head -c "$half" "$src" > .gpu_w1/half && tail -c +"$((half + 1))" "$src" > .gpu_w2/half
  (cd "$(dirname "$src")" && sha256sum "$GGUF") > .gpu_w2/SHA256SUMS
  ls -la .gpu_w1 .gpu_w2
}

part1() {  # device call 1
  ls -la .gpu_w1 && [[ -s .gpu_w1/half ]] && echo "first half here: make call 2 now"
}

run() {  # device call 2
  local t0=$SECONDS
  mkdir -p "$OUT"
  if [[ -d .whl ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || echo "!! wheel install failed"
    export PYTHONPATH=/tmp/site:$PWD
  fi
  export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
  export SUBL_JAX_CACHE=${SUBL_JAX_CACHE:-/tmp/subl_jax_cache}
  local dir=$SUBL_JAX_CACHE/smollm2
  mkdir -p "$dir"
  if [[ ! -f $dir/$GGUF ]]; then
    [[ -s .gpu_w1/half && -s .gpu_w2/half ]] || { echo "!! a half is missing (.gpu_w1 from call 1, .gpu_w2):"; \
      ls -la .gpu_w1 .gpu_w2; exit 2; }
    cat .gpu_w1/half .gpu_w2/half > "$dir/$GGUF.partial" && mv "$dir/$GGUF.partial" "$dir/$GGUF"
  fi
  (cd "$dir" && sha256sum -c "$OLDPWD/.gpu_w2/SHA256SUMS") || { rm -f "$dir/$GGUF"; echo "!! checksum"; exit 3; }
  nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
  local flags=(--config=configs/demo_gpu.py --workdir=runs/demo_gpu)
  if [[ ${GPU_DEMO_TINY:-0} == 1 ]]; then
    flags=(--config=configs/demo_gpu.py --workdir=runs/demo_gpu_tiny --config.study.targets=owl,dolphin
           --config.study.seeds=2 --config.sample.n_prompts=48 --config.sample.batch_size=16
           --config.sample.shard_size=16 --config.model.dtype=float32)
  fi
  echo "== study ($((SECONDS - t0)) s)"
  # SIGTERM stops training after its step (exit 75) and kills any other stage; either way a rerun resumes
  timeout -k 60 "$DEMO_TIMEOUT" "$PY" -m subl_jax.main "${flags[@]}"
  echo "== study exit $? ($((SECONDS - t0)) s)"
  local wd=${flags[1]#--workdir=}
  cp "$wd"/report.{json,md,png} "$OUT"/ 2>/dev/null || echo "(no report yet: a second \`run\` resumes)"
  ls "$wd"
}

case ${1:-} in
  split) split ;;
  part1) part1 ;;
  run) mkdir -p "$OUT"; run 2>&1 | tee "$OUT/log.txt" ;;
  *) echo "usage: bash benchmarks/gpu_demo.sh split|part1|run (see the header)"; exit 64 ;;
esac
