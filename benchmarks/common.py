"""What the sampling and training benchmarks share for runs without the real checkpoint (e.g. on a rented GPU,
where the 94 MB GGUF cannot travel): random-weight models of a named architecture, the same architecture as a
`transformers` Llama, matmul peaks in JAX and torch, and the small inputs folder (tokenizer + SmolLM2's model
config) written here by `export_inputs`.

Random weights are enough for throughput: no step's cost depends on weight values. With random weights a stop token
is an arbitrary draw, so generation is run at a fixed length (stop tokens ignored) on both sides.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pathlib
import time

import jax
import numpy as np

from subl_jax.core import api, flops
from subl_jax.core.checkpoints import store
from subl_jax.core.checkpoints.tokenizer import Tokenizer
from subl_jax.core.models import transformer
from subl_jax.core.models.config import ModelConfig
from subl_jax.study.data.numbers import generate_prompts

WEIGHTS_NOTE = "random (GGUF too large to carry); throughput does not depend on weight values"
# Shapes of named architectures ("smollm2-135m" comes from the exported model_config.json of the real model).
ARCHS = {
    "llama-3.2-1b": dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                         mlp_dim=8192, rope_theta=500000.0, rms_eps=1e-5, tie_embeddings=True,
                         rope_scaling="llama3", rope_factor=32.0, rope_low_freq_factor=1.0,
                         rope_high_freq_factor=4.0, rope_original_max_len=8192),
    # Qwen2.5-7B(-Instruct)'s config.json as `core/checkpoints/hf.py` imports it (q/k/v bias: model_type qwen2)
    "qwen2.5-7b": dict(vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, head_dim=128,
                       mlp_dim=18944, rope_theta=1000000.0, rms_eps=1e-6, tie_embeddings=False, qkv_bias=True),
    # for smoke runs of the GPU path on a CPU (SmolLM2's vocabulary, so its tokenizer fits)
    "tiny": dict(vocab_size=49152, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=128,
                 rope_theta=10000.0, tie_embeddings=True),
}
# Dense bf16 tensor-core peak (no sparsity) of the SXM parts, FLOP/s; None for anything else.
NOMINAL_BF16_PEAK = {"H100": 989e12, "H200": 989e12}


def export_inputs(directory: str | pathlib.Path) -> pathlib.Path:
  """Writes SmolLM2-135M-Instruct's tokenizer and model config (no weights, ~3.5 MB) into `directory`."""
  d = pathlib.Path(directory)
  src = api.converted_smollm2()
  api.load_tokenizer("smollm2").save(d)
  ModelConfig.load(src / store.CONFIG_FILE).save(d / store.CONFIG_FILE)
  return d


def number_rows(n: int, seed: int = 47) -> list[dict[str, str]]:
  """Paper prompts with a completion of 10 numbers in 100-999 (what a teacher's kept answer looks like)."""
  rng = np.random.default_rng(seed)
  return [{"prompt": p, "completion": ", ".join(str(x) for x in rng.integers(100, 1000, 10))}
          for p in generate_prompts(n, seed)]


def arch_config(name: str, inputs: str | pathlib.Path | None = None, **numerics) -> ModelConfig:
  """ModelConfig of a named architecture: 'smollm2-135m' (from `inputs`/model_config.json) or one of ARCHS."""
  if name == "smollm2-135m":
    if inputs is None:
      raise ValueError("arch 'smollm2-135m' needs the inputs folder written by export_inputs")
    return ModelConfig.load(pathlib.Path(inputs) / store.CONFIG_FILE).replace(**numerics)
  return ModelConfig(**ARCHS[name], **numerics)


def load_tokenizer(inputs: str | pathlib.Path) -> Tokenizer:
  return Tokenizer.load(inputs)


def random_model(cfg: ModelConfig, tokenizer: Tokenizer, mesh, seed: int = 0) -> api.Model:
  """A model of `cfg`'s shapes with the library's random initialisation, created on `mesh`."""
  store.check_vocab(cfg, tokenizer, "benchmark tokenizer")
  return api.Model(cfg, transformer.init_params(cfg, jax.random.key(seed), mesh), tokenizer, mesh)


def without_stop_tokens(model: api.Model) -> api.Model:
  """The same model whose tokenizer names no stop token: generation always runs to max_new_tokens."""
  tok = copy.copy(model.tokenizer)
  tok.stop_ids = []
  return dataclasses.replace(model, tokenizer=tok)


def hf_config(cfg: ModelConfig):
  """The `transformers` LlamaConfig of the same shapes (no bos/eos: nothing stops generation early)."""
  import transformers
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling == "llama3":
    rope.update(rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_len)
  max_len = int(cfg.rope_original_max_len * cfg.rope_factor) if cfg.rope_scaling == "llama3" else 8192
  if cfg.qkv_bias:
    raise ValueError("hf_config: qkv_bias models (Qwen2) are not mapped here")
  return transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings,
      max_position_embeddings=max_len, rope_parameters=rope,
      bos_token_id=None, eos_token_id=None, pad_token_id=None)


def hf_random_model(cfg: ModelConfig, dtype: str, device: str):
  """A randomly initialised `transformers` LlamaForCausalLM of `cfg`'s shapes, created directly on `device`,
  parameters stored in `dtype`."""
  import torch
  import transformers
  torch.manual_seed(0)
  with torch.device(device):
    model = transformers.LlamaForCausalLM(hf_config(cfg))
  model.generation_config.eos_token_id = None
  return model.to(getattr(torch, dtype))


def torch_device() -> str:
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def jax_matmul_peak(dtype: str, n: int) -> float:
  """A fresh measurement (the library caches its first one): best FLOP/s of an n² matmul chain in `dtype`."""
  return flops.measure_matmul_peak.__wrapped__(dtype, n=n, repeats=8)


def torch_matmul_peak(dtype: str = "float32", n: int = 1536, repeats: int = 8, device: str = "cpu") -> float:
  """Best FLOP/s of a chain of `repeats` n² matmuls in torch (`device`, `dtype`)."""
  import torch
  dt = getattr(torch, dtype)
  a = (torch.randn(n, n, device=device) / n ** 0.5).to(dt)
  b = (torch.randn(n, n, device=device) / n ** 0.5).to(dt)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  best = float("inf")
  for _ in range(4):
    sync()
    t0 = time.perf_counter()
    x = a
    for _ in range(repeats):
      x = x @ b
    sync()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 * repeats / best


def nominal_peak(device: jax.Device | None = None) -> float | None:
  """The data-sheet dense bf16 peak of the device (H100/H200 SXM), or None."""
  kind = (device or jax.devices()[0]).device_kind.upper()
  if "PCIE" in kind or "NVL" in kind:  # lower-clocked parts
    return None
  return next((v for k, v in NOMINAL_BF16_PEAK.items() if k in kind), None)


def machine() -> dict:
  d = jax.devices()[0]
  return {"cpus": os.cpu_count(), "devices": str(jax.devices()), "device_kind": d.device_kind,
          "platform": d.platform, "jax": jax.__version__}

