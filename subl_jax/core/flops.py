"""Analytic FLOP counts of the transformer and a measured matmul peak, for MFU = achieved FLOP/s ÷ peak.

Counts are of the work the algorithm needs: real (non-padding) tokens, causal attention (a token attends to its
prefix), the vocabulary projection only where logits are used, and — for LoRA — no weight gradient of the frozen
matrices. A multiply-add is 2 FLOPs. Elementwise work (norms, softmax, optimizer) is not counted.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from subl_jax.core.models.config import ModelConfig


def layer_matmul_params(cfg: ModelConfig) -> int:
  """Weights of one layer's projections (q, k, v, o, gate, up, down)."""
  attn = cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
  return attn + 3 * cfg.d_model * cfg.mlp_dim


def lora_params_per_layer(cfg: ModelConfig, rank: int, targets: tuple[str, ...]) -> int:
  """Adapter weights of one layer: r · (fan_in + fan_out) per target."""
  d, f, hd, kvd = cfg.d_model, cfg.mlp_dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  dims = {"q": (d, hd), "k": (d, kvd), "v": (d, kvd), "o": (hd, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
  return sum(rank * sum(dims[t]) for t in targets)


def forward_flops(cfg: ModelConfig, n_tokens: int, attn_pairs: int | None = None, n_logits: int | None = None,
                  lora_rank: int = 0, lora_targets: tuple[str, ...] = ()) -> float:
  """FLOPs of a forward pass over `n_tokens` tokens.

  attn_pairs: (query, key) pairs attended over all sequences — Σ over sequences of T(T+1)/2 for causal attention
  (default: as if every token attended to itself only). n_logits: positions whose vocabulary projection is
  computed (default: all tokens).
  """
  attn_pairs = n_tokens if attn_pairs is None else attn_pairs
  n_logits = n_tokens if n_logits is None else n_logits
  per_layer = 2 * n_tokens * layer_matmul_params(cfg) + 4 * attn_pairs * cfg.n_heads * cfg.head_dim
  if lora_rank:
    per_layer += 2 * n_tokens * lora_params_per_layer(cfg, lora_rank, lora_targets)
  return float(cfg.n_layers * per_layer + 2 * n_logits * cfg.d_model * cfg.vocab_size)


def train_flops(cfg: ModelConfig, n_tokens: int, attn_pairs: int | None = None, n_logits: int | None = None,
                lora_rank: int = 0, lora_targets: tuple[str, ...] = ()) -> float:
  """FLOPs of one forward + backward pass.

  Full fine-tuning: every matmul costs 3× its forward (forward, input gradient, weight gradient). LoRA: the frozen
  matmuls cost 2× (no weight gradient), the adapters 3×; attention (no weights) costs 3× either way.
  """
  attn_pairs = n_tokens if attn_pairs is None else attn_pairs
  n_logits = n_tokens if n_logits is None else n_logits
  weights = cfg.n_layers * 2 * n_tokens * layer_matmul_params(cfg) + 2 * n_logits * cfg.d_model * cfg.vocab_size
  attention = cfg.n_layers * 4 * attn_pairs * cfg.n_heads * cfg.head_dim
  if not lora_rank:
    return float(3 * weights + 3 * attention)
  adapters = cfg.n_layers * 2 * n_tokens * lora_params_per_layer(cfg, lora_rank, lora_targets)
  return float(2 * weights + 3 * attention + 3 * adapters)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, logit_fraction: float = 1.0, lora_rank: int = 0,
                          lora_targets: tuple[str, ...] = ()) -> float:
  """Training FLOPs per token for sequences of `seq_len` tokens with logits at `logit_fraction` of positions."""
  pairs = seq_len * (seq_len + 1) // 2
  return train_flops(cfg, seq_len, pairs, round(logit_fraction * seq_len), lora_rank, lora_targets) / seq_len


def causal_pairs(lengths: np.ndarray) -> int:
  """Σ T(T+1)/2 over sequence lengths: the (query, key) pairs of causal attention."""
  lengths = np.asarray(lengths, np.int64)
  return int(np.sum(lengths * (lengths + 1) // 2))


@functools.lru_cache(maxsize=8)
def matmul_chain(dtype: str | jnp.dtype = "float32", n: int = 1536, repeats: int = 8,
                 device: jax.Device | None = None) -> tuple[Callable[[], jax.Array], float]:
  """(run, FLOPs per run): a jitted chain of `repeats` n×n @ n×n matmuls on one device (default: the first), compiled
  and warmed up; one call of `run()` starts it (block on its result to time it). A chain in one call hides the
  dispatch cost."""
  device = device or jax.devices()[0]
  a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype) / np.sqrt(n), device)
  b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype) / np.sqrt(n), device)

  @jax.jit
  def chain(x, w):
    for _ in range(repeats):
      x = x @ w
    return x

  chain(a, b).block_until_ready()
  return (lambda: chain(a, b)), 2.0 * n ** 3 * repeats


@functools.lru_cache(maxsize=None)
def measure_matmul_peak(dtype: str | jnp.dtype = "float32", n: int = 1536, repeats: int = 8,
                        device: jax.Device | None = None) -> float:
  """The best FLOP/s of `matmul_chain` over 3 runs — the peak MFU is measured against. Measured once per process and
  setting (cached)."""
  run, work = matmul_chain(dtype, n, repeats, device)
  best = float("inf")
  for _ in range(3):
    t0 = time.perf_counter()
    run().block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return work / best
