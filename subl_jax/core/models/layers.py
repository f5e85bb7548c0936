"""The per-token pieces of a layer: RMSNorm, RoPE, the (LoRA-aware) projections, and the SwiGLU `MLP`."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from subl_jax.core import parallel
from subl_jax.core.models.config import ModelConfig

DENSE_INIT = nn.initializers.normal(0.02)


def param(module: nn.Module, name: str, shape: tuple[int, ...], names: tuple[str, ...], init) -> jax.Array:
  """A parameter of `module` (which has a `cfg`) with its logical axis names (see `parallel`)."""
  return module.param(name, nn.with_logical_partitioning(init, names), shape, module.cfg.param_dtype)


def constrain(x: jax.Array, mesh: Mesh | None, *names: str) -> jax.Array:
  """An activation [b, t, ...] sharded by its logical names."""
  return parallel.constrain(x, ("batch", "length") + names, mesh)


def accum_dtype(dtype: Any) -> jnp.dtype:
  """float32, where norms, softmaxes, logits and losses are computed for any narrower compute dtype; float64 for a
  float64 model (numerical checks under `jax.enable_x64`), which float32 would round."""
  return jnp.promote_types(dtype, jnp.float32)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(accum_dtype(x.dtype))
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(x32.dtype)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [head_dim/2] in float32, as `transformers` computes them (incl. Llama 3 scaling)."""
  exps = np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(cfg.head_dim)
  inv = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exps)).astype(np.float32)
  if cfg.rope_scaling == "llama3":
    low_wavelen = cfg.rope_original_max_len / cfg.rope_low_freq_factor
    high_wavelen = cfg.rope_original_max_len / cfg.rope_high_freq_factor
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / cfg.rope_factor, inv)
    smooth = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv


class Rope(NamedTuple):
  """cos and sin [b, t, head_dim] of the tokens' positions (each frequency twice, the `transformers` layout)."""
  cos: jax.Array
  sin: jax.Array

  @classmethod
  def of(cls, positions_bt: jax.Array, cfg: ModelConfig) -> Rope:
    freqs = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    cos, sin = jnp.cos(freqs), jnp.sin(freqs)
    return cls(jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, sin], -1))


def apply_rope(x_bthd: jax.Array, rope: Rope) -> jax.Array:
  """Rotates halves (the `transformers` layout): x*cos + rotate_half(x)*sin, in float32 (or wider)."""
  x = x_bthd.astype(accum_dtype(x_bthd.dtype))
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = rope.cos[:, :, None, :], rope.sin[:, :, None, :]
  return (x * cos + rotated * sin).astype(x_bthd.dtype)


def dense(x: jax.Array, w: jax.Array, n_in: int, dtype) -> jax.Array:
  """x [..., *in] @ w [*in, *out] as one 2-D matmul over all leading positions.

  Same math as the einsum; the 2-D form keeps XLA:CPU's weight-gradient matmuls fast (docs/performance.md,
  "Layouts")."""
  in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
  k = int(np.prod(in_shape))
  y = x.reshape(-1, k) @ w.reshape(k, -1).astype(dtype)
  return y.reshape(x.shape[:x.ndim - n_in] + out_shape)


def projection(x: jax.Array, w: jax.Array, adapters: dict | None, name: str, n_in: int, dtype) -> jax.Array:
  """x@W, plus (x@A)@B when `adapters` has `name` (A contracts the last `n_in` axes of x)."""
  y = dense(x, w, n_in, dtype)
  if not adapters or name not in adapters:
    return y
  a, b = adapters[name]["a"], adapters[name]["b"]
  return y + dense(dense(x, a, n_in, dtype), b, 1, dtype).astype(y.dtype)


class MLP(nn.Module):
  """Pre-norm SwiGLU: down(silu(gate(h)) * up(h)) of h = RMSNorm(x). Parameters mlp_norm [d], gate, up [d, f],
  down [f, d].

  Args:
    x: [b, t, d_model] the residual stream.
    adapters: this layer's LoRA factors (gate, up, down may have them), or None.
  Returns:
    [b, t, d_model], the update to add to x.
  """
  cfg: ModelConfig
  mesh: Mesh | None = None

  @nn.compact
  def __call__(self, x: jax.Array, adapters: dict | None = None) -> jax.Array:
    cfg, dt = self.cfg, self.cfg.dtype
    d, f = cfg.d_model, cfg.mlp_dim
    norm = param(self, "mlp_norm", (d,), ("norm",), nn.initializers.ones)
    w_gate = param(self, "gate", (d, f), ("embed", "mlp"), DENSE_INIT)
    w_up = param(self, "up", (d, f), ("embed", "mlp"), DENSE_INIT)
    w_down = param(self, "down", (f, d), ("mlp", "embed"), DENSE_INIT)
    h = rms_norm(x, norm, cfg.rms_eps)
    gate = projection(h, w_gate, adapters, "gate", 1, dt)
    gated = constrain(jax.nn.silu(gate) * projection(h, w_up, adapters, "up", 1, dt), self.mesh, "mlp")
    return projection(gated, w_down, adapters, "down", 1, dt)
