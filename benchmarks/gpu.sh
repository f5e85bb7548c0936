#!/usr/bin/env bash
# The sampling and training benchmarks on one rented GPU (H100/H200), in about 6 minutes wall.
#
# What travels: the git working tree plus two ignored folders (carry), ~4 MiB in all:
#   .whl/         ml_collections 1.1.0 and gguf 0.19.0 (pure-python wheels; the image lacks them and subl_jax
#                 imports both at import time), installed here into /tmp/site with no index and no dependencies
#   .gpu_inputs/  SmolLM2-135M-Instruct's tokenizer and model_config.json, no weights
#                 (`.venv/bin/python benchmarks/sampling.py --export_inputs .gpu_inputs/smollm2`)
# The 94 MB SmolLM2 GGUF cannot travel (64 MiB limit), so both benchmarks use RANDOM weights of the real
# architectures (no step's cost depends on weight values), and generation runs at a fixed length on both sides (with
# random weights a stop token is an arbitrary draw). Both JSON files say so (`weights`, `fixed_length`).
#
# The lead's device call:  carry=[".whl", ".gpu_inputs"]   command="bash benchmarks/gpu.sh"
#   1. sampling: SmolLM2-135M shapes, bf16, 1024 paper prompts, batches 256/512/1024, 48 new tokens; ours vs
#      transformers `generate` on the same GPU -> $OUT/sampling.json
#   2. training: Llama-3.2-1B shapes, bf16 compute / f32 params + AdamW, batch 32 x 8 steps of paper-shaped rows
#      (~150 tokens), full fine-tuning then LoRA r=8; ours vs transformers + torch AdamW -> $OUT/training.json
# Each step runs under `timeout` (SAMPLE_TIMEOUT, TRAIN_TIMEOUT seconds) and writes its JSON after every measured
# configuration, so a hang or a cut keeps what was measured. Log: $OUT/log.txt.
#
# Smoke run of the same path on a CPU (seconds-scale shapes):
#   GPU_SH_TINY=1 JAX_PLATFORMS=cpu PY=.venv/bin/python OUT=/tmp/gpu_out bash benchmarks/gpu.sh
#
# GPU_SH_QWEN=1 runs only the paper's open-weight recipe (configs/qwen25_7b.py) on RANDOM weights of Qwen2.5-7B's
# shapes, stage by stage (benchmarks/qwen7b_recipe.py: a measured fraction of each stage, cold then warm, scaled up
# to the recipe's counts) -> $OUT/qwen7b_recipe.json, under `timeout` QWEN_TIMEOUT (default 420) seconds, without
# the persistent compilation cache (its compile times are the figures a first run pays):
#   the lead's device call:  carry=[".whl", ".gpu_inputs"]  command="GPU_SH_QWEN=1 bash benchmarks/gpu.sh"
#                            timeout_s=540
#   smoke run on a CPU (tiny shapes, ~3 min):
#   GPU_SH_QWEN=1 GPU_SH_TINY=1 JAX_PLATFORMS=cpu PY=.venv/bin/python OUT=/tmp/qwen_out bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
PY=${PY:-python3}
SAMPLE_TIMEOUT=${SAMPLE_TIMEOUT:-180}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-210}
QWEN_TIMEOUT=${QWEN_TIMEOUT:-420}
mkdir -p "$OUT"

main() {
  local t0=$SECONDS
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "!! wheel install failed"
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
  export XLA_PYTHON_CLIENT_PREALLOCATE=false        # torch shares the GPU in the same process
  export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache   # a rerun on the same warm machine skips the compiles
  nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
  timeout 90 "$PY" -c "
import jax, flax, optax, torch, transformers, ml_collections, gguf
print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| torch', torch.__version__,
      'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__)
print('from /tmp/site:', ml_collections.__file__, gguf.__file__)" || echo "!! import check failed"

  if [[ ${GPU_SH_QWEN:-0} == 1 ]]; then
    qwen7b "$t0"
    return
  fi

  local sample=(--random_weights .gpu_inputs/smollm2 --dtype bfloat16 --n_prompts 1024 --batches 256,512,1024
                --max_new_tokens 48 --peak_n 8192)
  local train=(--arch llama-3.2-1b --inputs .gpu_inputs/smollm2 --dtype bfloat16 --one_shape --peak_n 8192
               --batch 32 --steps 8)
  if [[ ${GPU_SH_TINY:-0} == 1 ]]; then
    sample=(--random_weights .gpu_inputs/smollm2 --arch tiny --dtype bfloat16 --n_prompts 16 --batches 8,16
            --max_new_tokens 4 --peak_n 256)
    train=(--arch tiny --inputs .gpu_inputs/smollm2 --dtype bfloat16 --one_shape --peak_n 256 --batch 4 --steps 2)
  fi

  echo "== sampling ($((SECONDS - t0)) s)"
  timeout "$SAMPLE_TIMEOUT" "$PY" benchmarks/sampling.py "${sample[@]}" --out "$OUT/sampling.json"
  echo "== sampling exit $? ($((SECONDS - t0)) s)"
  echo "== training ($((SECONDS - t0)) s)"
  timeout "$TRAIN_TIMEOUT" "$PY" benchmarks/training.py "${train[@]}" --out "$OUT/training.json"
  echo "== training exit $? ($((SECONDS - t0)) s)"
  ls -la "$OUT"
}

qwen7b() {
  local t0=$1
  local args=()
  if [[ ${GPU_SH_TINY:-0} == 1 ]]; then
    args=(--arch tiny --sample_batch_size 32 --max_new_tokens 16 --sample_batches 2 --train_steps 2
          --eval_fraction 0.04)
  fi
  unset JAX_COMPILATION_CACHE_DIR  # a rerun would load its compiles from the cache and report them as near zero
  echo "== qwen7b recipe ($((SECONDS - t0)) s)"
  timeout -k 30 "$QWEN_TIMEOUT" "$PY" benchmarks/qwen7b_recipe.py "${args[@]}" --out "$OUT/qwen7b_recipe.json"
  echo "== qwen7b recipe exit $? ($((SECONDS - t0)) s)"
  ls -la "$OUT"
}

main 2>&1 | tee "$OUT/log.txt"
