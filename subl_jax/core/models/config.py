"""`ModelConfig`: one config for the Llama family (SmolLM2, Llama 3.x) and Qwen2 (q/k/v bias); `Perf`: the model's
layout switches, which change speed and never numbers."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ROPE_SCALINGS = ("none", "llama3")
DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: numerical checks, under `jax.enable_x64`
KV_LAYOUTS = ("standard", "transposed")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of a decoder-only transformer."""
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  rms_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False
  # Llama 3.1+ frequency-dependent RoPE scaling ("llama3"); "none" is plain RoPE.
  rope_scaling: str = "none"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  dtype: str = "float32"        # compute dtype of activations and matmuls
  param_dtype: str = "float32"  # storage dtype of parameters
  remat_policy: str = "none"    # what the backward pass recomputes per layer (see REMAT_POLICIES)

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the field for any impossible value."""
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"model.{name}: expected a positive integer, got {v!r}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads} (GQA groups)")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim={self.head_dim} must be even (RoPE rotates pairs)")
    if self.rope_theta <= 0 or self.rms_eps <= 0:
      raise ValueError(f"model.rope_theta and model.rms_eps must be positive, got {self.rope_theta}, {self.rms_eps}")
    for name, allowed in (("rope_scaling", ROPE_SCALINGS), ("dtype", DTYPES), ("param_dtype", DTYPES),
                          ("remat_policy", REMAT_POLICIES)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"model.{name}={getattr(self, name)!r}: expected one of {allowed}")
    if "float64" in (self.dtype, self.param_dtype) and not jax.config.jax_enable_x64:
      raise ValueError("model.dtype or model.param_dtype 'float64': needs 64-bit JAX (`with jax.enable_x64(True):`); "
                       "without it JAX would compute in float32")

  @property
  def n_params(self) -> int:
    """Number of parameters (embeddings counted once when tied)."""
    d, f, l = self.d_model, self.mlp_dim, self.n_layers
    attn = d * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
    if self.qkv_bias:
      attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return l * per_layer + emb + d

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any], source: str = "model config") -> "ModelConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"{source}: unknown field(s) {unknown}; expected fields of ModelConfig: {sorted(known)}")
    try:
      return cls(**d)
    except TypeError as e:  # a missing required field
      raise ValueError(f"{source}: {e}") from None

  def save(self, path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

  @classmethod
  def load(cls, path: str | pathlib.Path) -> "ModelConfig":
    path = pathlib.Path(path)
    try:
      d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: cannot read the model config ({e})") from None
    return cls.from_dict(d, source=str(path))


@dataclasses.dataclass(frozen=True)
class Perf:
  """Layouts of the model's arrays: the same numbers (up to float rounding) either way, each faster somewhere.

  `kv_layout`: how keys are laid out, in the KV cache and in attention: "standard", [.., slots, head_dim] like the
  values, or "transposed", [.., head_dim, slots] as q @ k reads them (faster decoding on XLA:CPU).
  `vocab_major_head`: the LM head returns logits [vocab, b, n] (embedding @ x^T) instead of [b, n, vocab], for a
  loss that reduces over axis 0 (SFT's cross-entropy: faster on XLA:CPU). Only for callers that read them so.
  Chosen per platform by the `perf` config section (`core/perf.py`, `transformer.default_perf`); the figures behind
  the CPU choices are in docs/performance.md ("Platform tuning")."""
  kv_layout: str = "standard"
  vocab_major_head: bool = False

  def __post_init__(self):
    if self.kv_layout not in KV_LAYOUTS:
      raise ValueError(f"perf.kv_layout={self.kv_layout!r}: expected one of {KV_LAYOUTS}")
    if not isinstance(self.vocab_major_head, bool):
      raise ValueError(f"perf.vocab_major_head={self.vocab_major_head!r}: expected a bool")

  @classmethod
  def for_platform(cls, platform: str) -> "Perf":
    """The layouts measured fastest on `platform` (`jax.default_backend()`): on "cpu" transposed keys and the
    vocabulary-major head; elsewhere (not measured yet) the standard ones."""
    return cls("transposed", True) if platform == "cpu" else cls()

  def replace(self, **changes: Any) -> "Perf":
    return dataclasses.replace(self, **changes)
