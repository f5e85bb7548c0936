"""A decoder-only transformer for the Llama family and Qwen2: RMSNorm, RoPE, GQA, SwiGLU, scanned layers, KV cache.

Positions and the key mask are explicit inputs, so left-padded batches are exact. One call serves training (no
cache), prefill and decode (with a cache): with a cache of S slots, the T new tokens are written at slots
`cache_index .. cache_index+T-1`, and a query at slot i attends to key slots j <= i where `kv_mask_bs[b, j]`.
The whole cache rides in the layer scan's carry and each layer updates its slice in place — cheaper inside a decode
`while_loop` than passing per-layer caches as scan inputs and outputs.

Parameters (stacked over layers under `layers/`): embed [V,D]; attn_norm [D]; q [D,H,Dh]; k, v [D,KVH,Dh];
(q_bias [H,Dh]; k_bias, v_bias [KVH,Dh]); o [H,Dh,D]; mlp_norm [D]; gate, up [D,F]; down [F,D]; final_norm [D];
lm_head [D,V] (absent when tied).

LoRA: `apply(..., adapters=...)` adds low-rank terms to the layer projections without touching the weights:
`adapters = {"layers": {name: {"a": [L, *in, r], "b": [L, r, *out]}}}` for any of q, k, v, o, gate, up, down, with
the LoRA scale already folded into `b` (see `subl_jax.training.lora`). Each projection becomes x@W + (x@A)@B, so
differentiating with respect to the adapters only never builds a gradient of W.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from subl_jax import parallel
from subl_jax.models.config import ModelConfig

LOW_RANK = 32  # a dot contracting over at most this many elements is recomputed, not saved (see _except_low_rank)


def _except_low_rank(policy):
  """`policy`, except that dots contracting over <= LOW_RANK elements are not saved: LoRA's (x@A)@B (rank r) costs
  little to recompute, while saving it is a second activation the size of its projection's (on a 1B model at batch
  96 × 176 tokens, 18 GiB of a LoRA step's temporaries)."""
  def saveable(prim, *avals, **params):
    if not policy(prim, *avals, **params):
      return False
    if prim is not jax.lax.dot_general_p:
      return True
    (lhs_contract, _), _ = params["dimension_numbers"]
    return int(np.prod([avals[0].shape[d] for d in lhs_contract])) > LOW_RANK
  return saveable


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": _except_low_rank(jax.checkpoint_policies.checkpoint_dots),
    "dots_no_batch": _except_low_rank(jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
}


class KVCache(NamedTuple):
  """Keys and values of every layer: k [layers, batch, kv_heads, head_dim, slots] (keys transposed), v [layers,
  batch, kv_heads, slots, head_dim].

  Both are laid out as the attention matmuls read them (q @ k, then probs @ v, per row and head): with
  [.., slots, kv_heads, head_dim] XLA:CPU transposed every layer's keys and values on every decode step and ran the
  attention as slow batched dots (SmolLM2 at batch 64 on the 2-core CPU: 380 ms a decode step, now ~240 ms)."""
  k: jax.Array
  v: jax.Array

  @staticmethod
  def shapes(cfg: ModelConfig, batch: int, slots: int) -> "KVCache":
    head = (cfg.n_layers, batch, cfg.n_kv_heads)
    return KVCache(head + (cfg.head_dim, slots), head + (slots, cfg.head_dim))

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, slots: int) -> "KVCache":
    return cls(*(jnp.zeros(shape, cfg.dtype) for shape in cls.shapes(cfg, batch, slots)))


# Logical axis names of the cache (see `parallel`), per field.
KVCache.LOGICAL = KVCache(("layers", "batch", "kv_heads", "head_dim", "length"),
                          ("layers", "batch", "kv_heads", "length", "head_dim"))


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


def apply_rope(x_bthd: jax.Array, cos_btd: jax.Array, sin_btd: jax.Array) -> jax.Array:
  """Rotates halves (the `transformers` layout): x*cos + rotate_half(x)*sin, in float32."""
  x = x_bthd.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos_btd[:, :, None, :], sin_btd[:, :, None, :]
  return (x * cos + rotated * sin).astype(x_bthd.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def dense(x: jax.Array, w: jax.Array, n_in: int, dtype) -> jax.Array:
  """x [..., *in] @ w [*in, *out] as one 2-D matmul over all leading positions.

  Same math as the einsum; the 2-D form matters on CPU, where XLA turns the backward pass of an einsum with several
  contracting axes (batch and length, for a weight gradient) into slow strided transposes.
  """
  in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
  k = int(np.prod(in_shape))
  y = x.reshape(-1, k) @ w.reshape(k, -1).astype(dtype)
  return y.reshape(x.shape[:x.ndim - n_in] + out_shape)


def _projection(x: jax.Array, w: jax.Array, adapters: dict | None, name: str, n_in: int, dtype) -> jax.Array:
  """x@W, plus (x@A)@B when `adapters` has `name` (A contracts the last `n_in` axes of x)."""
  y = dense(x, w, n_in, dtype)
  if not adapters or name not in adapters:
    return y
  a, b = adapters[name]["a"], adapters[name]["b"]
  return y + dense(dense(x, a, n_in, dtype), b, 1, dtype).astype(y.dtype)


def _param(module: nn.Module, name: str, shape: tuple[int, ...], names: tuple[str, ...], init) -> jax.Array:
  cfg = module.cfg
  return module.param(name, nn.with_logical_partitioning(init, names), shape, cfg.param_dtype)


class Block(nn.Module):
  """One pre-norm transformer layer; the scan body (carry = (x, cache or None)).

  `attend_slots` (static): with a cache, attend to its first this many slots only (None: all of them) — a prefill
  skips the empty slots reserved for new tokens."""
  cfg: ModelConfig
  mesh: Mesh | None = None
  attend_slots: int | None = None

  @nn.compact
  def __call__(self, carry, layer_idx, cos_btd, sin_btd, kv_mask_bs, cache_index, adapters=None, prefix=None):
    cfg, mesh = self.cfg, self.mesh
    x, cache = carry
    d, h, kvh, dh, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    dense = nn.initializers.normal(0.02)
    ones, zeros = nn.initializers.ones, nn.initializers.zeros
    dt = cfg.dtype

    # --- attention
    attn_norm = _param(self, "attn_norm", (d,), ("norm",), ones)
    wq = _param(self, "q", (d, h, dh), ("embed", "heads", "head_dim"), dense)
    wk = _param(self, "k", (d, kvh, dh), ("embed", "kv_heads", "head_dim"), dense)
    wv = _param(self, "v", (d, kvh, dh), ("embed", "kv_heads", "head_dim"), dense)
    wo = _param(self, "o", (h, dh, d), ("heads", "head_dim", "embed"), dense)
    hn = rms_norm(x, attn_norm, cfg.rms_eps)
    q = _projection(hn, wq, adapters, "q", 1, dt)
    k = _projection(hn, wk, adapters, "k", 1, dt)
    v = _projection(hn, wv, adapters, "v", 1, dt)
    if cfg.qkv_bias:
      q = q + _param(self, "q_bias", (h, dh), ("heads", "head_dim"), zeros).astype(dt)
      k = k + _param(self, "k_bias", (kvh, dh), ("kv_heads", "head_dim"), zeros).astype(dt)
      v = v + _param(self, "v_bias", (kvh, dh), ("kv_heads", "head_dim"), zeros).astype(dt)
    q = parallel.constrain(apply_rope(q, cos_btd, sin_btd), ("batch", "length", "heads", "head_dim"), mesh)
    k = apply_rope(k, cos_btd, sin_btd)

    t = x.shape[1]
    groups = h // kvh
    b = q.shape[0]
    q_slot = cache_index + jnp.arange(t)
    if cache is None:  # a full forward (training): keys and values as projected, [b, t, kv_heads, head_dim]
      q5 = q.reshape(b, t, kvh, groups, dh)
      scores = jnp.einsum("btkgd,bskd->bkgts", q5, k, preferred_element_type=jnp.float32) / np.sqrt(dh)
      s = t
    else:
      # The cache's layouts (see KVCache) and batched matmuls in canonical form ([b, kv_heads] batch, the queries
      # of a head group as rows), which XLA:CPU hands to its matmul library as they are.
      cache = KVCache(
          jax.lax.dynamic_update_slice(cache.k, k.transpose(0, 2, 3, 1)[None].astype(cache.k.dtype),
                                       (layer_idx, 0, 0, 0, cache_index)),
          jax.lax.dynamic_update_slice(cache.v, v.transpose(0, 2, 1, 3)[None].astype(cache.v.dtype),
                                       (layer_idx, 0, 0, cache_index, 0)))
      s = cache.k.shape[-1] if self.attend_slots is None else self.attend_slots
      keys = jax.lax.dynamic_index_in_dim(cache.k, layer_idx, 0, keepdims=False)[..., :s].astype(dt)
      values = jax.lax.dynamic_index_in_dim(cache.v, layer_idx, 0, keepdims=False)[:, :, :s].astype(dt)
      q_bkmd = q.reshape(b, t, kvh, groups, dh).transpose(0, 2, 3, 1, 4).reshape(b, kvh, groups * t, dh)
      scores = jnp.matmul(q_bkmd, keys, preferred_element_type=jnp.float32) / np.sqrt(dh)
      scores = scores.reshape(b, kvh, groups, t, s)
    allowed = (jnp.arange(s)[None, :] <= q_slot[:, None])[None] & kv_mask_bs[:, None, :s].astype(bool)  # [b,t,s]
    if prefix is not None:  # a shared prefix before every row's own slots, all of it attended to
      # every row shares the prefix's keys: one matmul per kv head, with all rows' queries as its rows
      p = prefix.k.shape[-1]
      q_km = q_bkmd.transpose(1, 0, 2, 3).reshape(kvh, b * groups * t, dh)
      pre = jnp.matmul(q_km, prefix.k[0].astype(dt), preferred_element_type=jnp.float32) / np.sqrt(dh)
      pre = pre.reshape(kvh, b, groups, t, p).transpose(1, 0, 2, 3, 4)
      scores = jnp.concatenate([pre, scores], axis=-1)
      allowed = jnp.concatenate([jnp.ones((b, t, p), bool), allowed], axis=-1)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)  # [b, kv_heads, groups, t, (prefix +) s]
    if cache is None:
      attn = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(q.shape)
    else:
      attn = jnp.matmul(probs[..., -s:].reshape(b, kvh, groups * t, s), values)
      if prefix is not None:  # the prefix's part: again one matmul per kv head for all rows
        probs_pre = probs[..., :-s].transpose(1, 0, 2, 3, 4).reshape(kvh, b * groups * t, -1)
        pre_attn = jnp.matmul(probs_pre, prefix.v[0].astype(dt)).reshape(kvh, b, groups * t, dh)
        attn = attn + pre_attn.transpose(1, 0, 2, 3)
      attn = attn.reshape(b, kvh, groups, t, dh).transpose(0, 3, 1, 2, 4).reshape(q.shape)
    attn = parallel.constrain(attn, ("batch", "length", "heads", "head_dim"), mesh)
    x = x + _projection(attn, wo, adapters, "o", 2, dt)
    x = parallel.constrain(x, ("batch", "length", "act_embed"), mesh)

    # --- SwiGLU MLP
    mlp_norm = _param(self, "mlp_norm", (d,), ("norm",), ones)
    w_gate = _param(self, "gate", (d, f), ("embed", "mlp"), dense)
    w_up = _param(self, "up", (d, f), ("embed", "mlp"), dense)
    w_down = _param(self, "down", (f, d), ("mlp", "embed"), dense)
    hn = rms_norm(x, mlp_norm, cfg.rms_eps)
    gate = _projection(hn, w_gate, adapters, "gate", 1, dt)
    gated = jax.nn.silu(gate) * _projection(hn, w_up, adapters, "up", 1, dt)
    gated = parallel.constrain(gated, ("batch", "length", "mlp"), mesh)
    x = x + _projection(gated, w_down, adapters, "down", 1, dt)
    x = parallel.constrain(x, ("batch", "length", "act_embed"), mesh)
    return (x, cache), None


class Transformer(nn.Module):
  """The decoder. `__call__` returns (logits [b, n, vocab] in float32, updated cache or None)."""
  cfg: ModelConfig
  mesh: Mesh | None = None

  @nn.compact
  def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array, kv_mask_bs: jax.Array,
               cache: KVCache | None = None, cache_index: jax.Array | int = 0,
               logit_idx_bn: jax.Array | None = None, adapters: dict | None = None,
               attend_slots: int | None = None, prefix: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """tokens/positions [b, t]; kv_mask [b, s] (s = t without a cache, else the cache's slots).

    `logit_idx_bn` picks the positions (indices into t) whose logits are computed; None computes all t.
    `adapters` adds LoRA terms to the layer projections (see the module docstring).
    `attend_slots` (static, with a cache): the queries attend to the cache's first this many slots only (they must
    hold every real key: a prefill passes cache_index + t and skips the slots reserved for later tokens).
    `prefix` (with a cache): keys and values of a prefix every row shares ([layers, 1, ...] in KVCache's layouts,
    e.g. the chat template and system prompt), stored once and attended to in full before the row's own cache slots
    (`kv_mask` covers those only; positions count the prefix). The prefix's scores are one matmul for all rows.
    """
    cfg, mesh = self.cfg, self.mesh
    embed = _param(self, "embed", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                   nn.initializers.normal(0.02))
    x = jnp.take(embed, tokens_bt, axis=0).astype(cfg.dtype)
    x = parallel.constrain(x, ("batch", "length", "act_embed"), mesh)

    freqs = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    cos, sin = jnp.cos(freqs), jnp.sin(freqs)
    cos, sin = jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, sin], -1)

    block = Block
    if cfg.remat_policy != "none":
      block = nn.remat(Block, policy=_REMAT[cfg.remat_policy], prevent_cse=False)
    layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, 0),
                     length=cfg.n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    layer_adapters = (adapters or {}).get("layers") or None  # scanned over layers, like the weights
    if prefix is not None and cache is None:
      raise ValueError("prefix: a shared prefix needs a cache (it is for prefill and decoding)")
    if attend_slots is not None and not tokens_bt.shape[1] <= attend_slots <= kv_mask_bs.shape[1]:
      raise ValueError(f"attend_slots={attend_slots}: expected between the new tokens ({tokens_bt.shape[1]}) and "
                       f"the cache's slots ({kv_mask_bs.shape[1]})")
    (x, cache), _ = layers(cfg, mesh, attend_slots, name="layers")(
        (x, cache), jnp.arange(cfg.n_layers), cos, sin, kv_mask_bs, jnp.asarray(cache_index, jnp.int32),
        layer_adapters, prefix)

    if logit_idx_bn is not None:  # the vocab projection only where logits are needed
      x = jnp.take_along_axis(x, logit_idx_bn[..., None], axis=1)
    x = rms_norm(x, _param(self, "final_norm", (cfg.d_model,), ("norm",), nn.initializers.ones), cfg.rms_eps)
    x2 = x.reshape(-1, cfg.d_model)  # 2-D, as in `dense`
    if cfg.tie_embeddings:
      logits = jnp.einsum("nd,vd->nv", x2, embed.astype(cfg.dtype), preferred_element_type=jnp.float32)
    else:
      head = _param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                    nn.initializers.normal(0.02))
      logits = jnp.einsum("nd,dv->nv", x2, head.astype(cfg.dtype), preferred_element_type=jnp.float32)
    logits = logits.reshape(x.shape[:2] + (cfg.vocab_size,))
    return parallel.constrain(logits, ("batch", "length", "vocab"), mesh), cache


def positions_from_mask(mask_bt: jax.Array) -> jax.Array:
  """Positions for a left-padded batch: 0 at each row's first real token (pads get 0 too)."""
  return jnp.maximum(jnp.cumsum(mask_bt.astype(jnp.int32), axis=-1) - 1, 0)


def abstract_params(cfg: ModelConfig) -> tuple[Any, Any]:
  """(shape tree of the parameters, tree of their logical axis names) without allocating anything."""
  model = Transformer(cfg)
  tokens = jnp.zeros((1, 1), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, tokens, tokens)["params"])
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  names = jax.tree.map(lambda b: tuple(b.names), boxed, is_leaf=is_box)
  shapes = jax.tree.map(lambda b: b.value if is_box(b) else b, boxed, is_leaf=is_box)
  return shapes, names


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Any:
  """NamedShardings of every parameter on `mesh`, derived from `jax.eval_shape(init)`."""
  shapes, names = abstract_params(cfg)
  return parallel.tree_shardings(names, shapes, mesh)


def init_params(cfg: ModelConfig, key: jax.Array, mesh: Mesh | None = None) -> Any:
  """Random parameters (normal(0.02) weights, unit norms), created directly in their shardings."""
  model = Transformer(cfg)
  tokens = jnp.zeros((1, 1), jnp.int32)
  init = lambda k: nn.meta.unbox(model.init(k, tokens, tokens, tokens)["params"])
  if mesh is None:
    return jax.jit(init)(key)
  return jax.jit(init, out_shardings=param_shardings(cfg, mesh))(key)
