"""Grouped-query self-attention: `attend` (the softmax over the keys a mask allows, plus a prefix every row shares)
and `Attention` (one layer's projections, RoPE and KV-cache update around it)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from subl_jax.core.models.config import ModelConfig
from subl_jax.core.models.kv_cache import KVCache, key_slot_axis, to_layout
from subl_jax.core.models.layers import (DENSE_INIT, Rope, accum_dtype, apply_rope, constrain, param, projection,
                                        rms_norm)


def _scores(q: jax.Array, keys: jax.Array, layout: str) -> jax.Array:
  """q [..., m, head_dim] · keys ([..., head_dim, s] transposed, [..., s, head_dim] standard): [..., m, s] in
  float32 (or wider)."""
  if key_slot_axis(layout) == -1:
    return jnp.matmul(q, keys, preferred_element_type=accum_dtype(q.dtype))
  return jnp.einsum("...md,...sd->...ms", q, keys, preferred_element_type=accum_dtype(q.dtype))


def attend(q: jax.Array, keys: jax.Array, values: jax.Array, mask_bts: jax.Array, layout: str,
           prefix: KVCache | None = None) -> jax.Array:
  """Softmax attention of each query over the keys its mask allows and, with `prefix`, over all of a prefix every
  row shares, before its own keys.

  Args:
    q: [b, t, heads, head_dim] queries.
    keys, values: [b, kv_heads, s, head_dim] (keys [b, kv_heads, head_dim, s] in the transposed `layout`).
    mask_bts: [b, t, s] bool, which keys each query attends.
    layout: the keys' layout, "standard" or "transposed".
    prefix: keys and values of the shared prefix, batch 1 ([1, kv_heads, ...], same layouts), or None.
  Returns:
    [b, t, heads, head_dim].

  Batched matmuls in canonical form, [b, kv_heads] the batch and a head group's queries the rows (docs/performance.md,
  "Layouts"); the prefix's scores are one matmul per kv head for all rows.
  """
  b, t, h, dh = q.shape
  kvh, s = values.shape[1], values.shape[2]
  g = h // kvh
  q_bkmd = q.reshape(b, t, kvh, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, dh)
  scores = (_scores(q_bkmd, keys, layout) / np.sqrt(dh)).reshape(b, kvh, g, t, s)
  if prefix is not None:  # every row's queries are rows of one matmul per kv head against the prefix's one copy
    p = prefix.v.shape[2]
    q_km = q_bkmd.transpose(1, 0, 2, 3).reshape(kvh, b * g * t, dh)
    pre = _scores(q_km, prefix.k[0].astype(q.dtype), layout) / np.sqrt(dh)
    scores = jnp.concatenate([pre.reshape(kvh, b, g, t, p).transpose(1, 0, 2, 3, 4), scores], axis=-1)
    mask_bts = jnp.concatenate([jnp.ones((b, t, p), bool), mask_bts], axis=-1)
  scores = jnp.where(mask_bts[:, None, None], scores, jnp.finfo(scores.dtype).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)  # [b, kv_heads, groups, t, (prefix +) s]
  attn = jnp.matmul(probs[..., -s:].reshape(b, kvh, g * t, s), values)
  if prefix is not None:  # the prefix's part: again one matmul per kv head for all rows
    probs_pre = probs[..., :-s].transpose(1, 0, 2, 3, 4).reshape(kvh, b * g * t, -1)
    pre_attn = jnp.matmul(probs_pre, prefix.v[0].astype(q.dtype)).reshape(kvh, b, g * t, dh)
    attn = attn + pre_attn.transpose(1, 0, 2, 3)
  return attn.reshape(b, kvh, g, t, dh).transpose(0, 3, 1, 2, 4).reshape(q.shape)


class Attention(nn.Module):
  """Pre-norm grouped-query self-attention with RoPE (and Qwen2's q/k/v biases). Parameters attn_norm [d];
  q [d, heads, head_dim]; k, v [d, kv_heads, head_dim]; o [heads, head_dim, d]; q_bias [heads, head_dim], k_bias,
  v_bias [kv_heads, head_dim].

  Args:
    x: [b, t, d_model] the residual stream.
    rope: `Rope` of the tokens' positions, [b, t, head_dim].
    mask: [b, t, s] bool, the keys each token attends (`Inputs.mask`).
    cache: every layer's keys and values, or None (the keys are the t tokens' own).
    layer: [] int32, this layer's index into `cache`.
    cache_index: [] int32, the slot of token 0 in `cache`.
    prefix: this layer's keys and values of a prefix every row shares ([1, ...], see `attend`), or None.
    adapters: this layer's LoRA factors (q, k, v, o may have them), or None.
  Returns:
    ([b, t, d_model] the update to add to x, `cache` with this layer's new keys and values written, or None).
  """
  cfg: ModelConfig
  layout: str
  mesh: Mesh | None = None

  @nn.compact
  def __call__(self, x: jax.Array, rope: Rope, mask: jax.Array, cache: KVCache | None, layer: jax.Array,
               cache_index: jax.Array, prefix: KVCache | None = None,
               adapters: dict | None = None) -> tuple[jax.Array, KVCache | None]:
    cfg, dt, mesh = self.cfg, self.cfg.dtype, self.mesh
    d, h, kvh, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    norm = param(self, "attn_norm", (d,), ("norm",), nn.initializers.ones)
    weights = {"q": param(self, "q", (d, h, dh), ("embed", "heads", "head_dim"), DENSE_INIT),
               "k": param(self, "k", (d, kvh, dh), ("embed", "kv_heads", "head_dim"), DENSE_INIT),
               "v": param(self, "v", (d, kvh, dh), ("embed", "kv_heads", "head_dim"), DENSE_INIT)}
    wo = param(self, "o", (h, dh, d), ("heads", "head_dim", "embed"), DENSE_INIT)
    biases = {}
    if cfg.qkv_bias:
      zeros = nn.initializers.zeros
      biases = {"q": param(self, "q_bias", (h, dh), ("heads", "head_dim"), zeros),
                "k": param(self, "k_bias", (kvh, dh), ("kv_heads", "head_dim"), zeros),
                "v": param(self, "v_bias", (kvh, dh), ("kv_heads", "head_dim"), zeros)}

    hn = rms_norm(x, norm, cfg.rms_eps)
    q, k, v = (projection(hn, weights[n], adapters, n, 1, dt) + (biases[n].astype(dt) if biases else 0)
               for n in ("q", "k", "v"))
    q = constrain(apply_rope(q, rope), mesh, "heads", "head_dim")
    k, v = to_layout(apply_rope(k, rope), v, self.layout)
    s = mask.shape[-1]
    if cache is not None:  # write the new keys and values, then read the first s slots back
      cache = cache.write(layer, cache_index, k, v, self.layout)
      k, v = (a.astype(dt) for a in cache.read(layer, s, self.layout))
    attn = constrain(attend(q, k, v, mask, self.layout, prefix), mesh, "heads", "head_dim")
    return projection(attn, wo, adapters, "o", 2, dt), cache
