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
the LoRA scale already folded into `b` (see `subl_jax.core.lora`). Each projection becomes x@W + (x@A)@B, so
differentiating with respect to the adapters only never builds a gradient of W.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from subl_jax.core import parallel
from subl_jax.core.models.config import ModelConfig

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


def _kv_layout(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Keys and values as projected ([b, s, kv_heads, hd]) in the layouts attention reads them (KVCache's): keys
  [b, kv_heads, hd, s], values [b, kv_heads, s, hd]."""
  return k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)


def _masked_attention(q: jax.Array, keys: jax.Array, values: jax.Array, allowed_bts: jax.Array,
                      prefix: KVCache | None = None) -> jax.Array:
  """Softmax attention: q [b, t, heads, hd]; keys, values [b, kv_heads, .., s] in `_kv_layout`; `allowed` [b, t, s].
  With `prefix` (keys and values one batch row holds for all rows, [1, ...] in the same layouts), every query also
  attends to all of it, before its own keys.

  Batched matmuls in canonical form ([b, kv_heads] batch, a head group's queries as rows), which XLA:CPU hands to
  its matmul library as they are: q and the output are transposed once each, the [.., t, s] scores and probabilities
  never (with einsums over [b, t, kv_heads, groups, hd] XLA:CPU copied the scores into and out of the dot's layout;
  SmolLM2 train step fwd+bwd, in-process A/B: 6 % faster median at batch 16 × 152 tokens)."""
  b, t, h, dh = q.shape
  kvh, s = keys.shape[1], keys.shape[-1]
  g = h // kvh
  q_bkmd = q.reshape(b, t, kvh, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, dh)
  scores = jnp.matmul(q_bkmd, keys, preferred_element_type=jnp.float32) / np.sqrt(dh)
  scores = scores.reshape(b, kvh, g, t, s)
  if prefix is not None:  # every row shares the prefix's keys: one matmul per kv head, all rows' queries its rows
    p = prefix.k.shape[-1]
    q_km = q_bkmd.transpose(1, 0, 2, 3).reshape(kvh, b * g * t, dh)
    pre = jnp.matmul(q_km, prefix.k[0].astype(q.dtype), preferred_element_type=jnp.float32) / np.sqrt(dh)
    scores = jnp.concatenate([pre.reshape(kvh, b, g, t, p).transpose(1, 0, 2, 3, 4), scores], axis=-1)
    allowed_bts = jnp.concatenate([jnp.ones((b, t, p), bool), allowed_bts], axis=-1)
  scores = jnp.where(allowed_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)  # [b, kv_heads, groups, t, (prefix +) s]
  attn = jnp.matmul(probs[..., -s:].reshape(b, kvh, g * t, s), values)
  if prefix is not None:  # the prefix's part: again one matmul per kv head for all rows
    probs_pre = probs[..., :-s].transpose(1, 0, 2, 3, 4).reshape(kvh, b * g * t, -1)
    pre_attn = jnp.matmul(probs_pre, prefix.v[0].astype(q.dtype)).reshape(kvh, b, g * t, dh)
    attn = attn + pre_attn.transpose(1, 0, 2, 3)
  return attn.reshape(b, kvh, g, t, dh).transpose(0, 3, 1, 2, 4).reshape(q.shape)


def _causal(t: int) -> jax.Array:
  return jnp.tril(jnp.ones((t, t), bool))


def _shared_prefix_attention(qkv_prefix: tuple, qkv_rows: tuple, kv_mask_bs: jax.Array) -> tuple[jax.Array, ...]:
  """Attention of a batch whose rows all begin with the same p tokens, that prefix held once.

  `qkv_prefix`: q, k, v of the prefix ([1, p, ...]), attending causally to itself. `qkv_rows`: q, k, v of the rest
  of each row ([b, s, ...]), attending to all of the prefix and causally to its own real keys (`kv_mask` [b, s]).
  Every row reads the prefix's one copy of keys and values (broadcast: the attention is a small part of the work,
  the projections that made them are not repeated), so under autodiff their gradients sum over the rows — the same
  math as the batch with the prefix repeated in every row. (The cached path's form, `_masked_attention(...,
  prefix=...)`: one matmul per kv head for all rows, was 2 % slower here: SmolLM2 fwd+bwd, batch 16 × 152, 28
  alternating rounds, 0.979 ± 0.016.) Returns (attn of the prefix, of the rows)."""
  qp, kp, vp = qkv_prefix
  q, k, v = qkv_rows
  b, s = q.shape[:2]
  p = kp.shape[1]
  attn_p = _masked_attention(qp, *_kv_layout(kp, vp), _causal(p)[None])
  rows = lambda pre, own: jnp.concatenate([jnp.broadcast_to(pre, (b,) + pre.shape[1:]), own], axis=1)
  allowed = jnp.concatenate([jnp.ones((b, s, p), bool), _causal(s)[None] & kv_mask_bs.astype(bool)[:, None, :]],
                            axis=-1)
  return attn_p, _masked_attention(q, *_kv_layout(rows(kp, k), rows(vp, v)), allowed)


def _param(module: nn.Module, name: str, shape: tuple[int, ...], names: tuple[str, ...], init) -> jax.Array:
  cfg = module.cfg
  return module.param(name, nn.with_logical_partitioning(init, names), shape, cfg.param_dtype)


class Block(nn.Module):
  """One pre-norm transformer layer; the scan body (carry = (x, cache or None)).

  `x` is one array [b, t, d], or, for a batch whose rows share their first tokens (training, see
  `Transformer.__call__`'s `shared_prefix`), a pair (prefix [1, p, d], rest of the rows [b, t - p, d]) with cos/sin
  pairs to match: every per-token operation runs on each part, and attention joins them.
  `attend_slots` (static): with a cache, attend to its first this many slots only (None: all of them) — a prefill
  skips the empty slots reserved for new tokens."""
  cfg: ModelConfig
  mesh: Mesh | None = None
  attend_slots: int | None = None

  @nn.compact
  def __call__(self, carry, layer_idx, cos_btd, sin_btd, kv_mask_bs, cache_index, adapters=None, prefix=None):
    cfg, mesh = self.cfg, self.mesh
    x, cache = carry
    split = isinstance(x, tuple)  # (shared prefix, rest of the rows)
    parts, cos_parts, sin_parts = (x, cos_btd, sin_btd) if split else ((x,), (cos_btd,), (sin_btd,))
    each = lambda fn, *args: tuple(map(fn, *args))
    d, h, kvh, dh, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    dense = nn.initializers.normal(0.02)
    ones, zeros = nn.initializers.ones, nn.initializers.zeros
    dt = cfg.dtype
    act = lambda a, *names: parallel.constrain(a, ("batch", "length") + names, mesh)

    # --- attention
    attn_norm = _param(self, "attn_norm", (d,), ("norm",), ones)
    wq = _param(self, "q", (d, h, dh), ("embed", "heads", "head_dim"), dense)
    wk = _param(self, "k", (d, kvh, dh), ("embed", "kv_heads", "head_dim"), dense)
    wv = _param(self, "v", (d, kvh, dh), ("embed", "kv_heads", "head_dim"), dense)
    wo = _param(self, "o", (h, dh, d), ("heads", "head_dim", "embed"), dense)
    biases = {}
    if cfg.qkv_bias:
      biases = {"q": _param(self, "q_bias", (h, dh), ("heads", "head_dim"), zeros),
                "k": _param(self, "k_bias", (kvh, dh), ("kv_heads", "head_dim"), zeros),
                "v": _param(self, "v_bias", (kvh, dh), ("kv_heads", "head_dim"), zeros)}

    def qkv(xp, cos, sin):
      hn = rms_norm(xp, attn_norm, cfg.rms_eps)
      q, k, v = (_projection(hn, w, adapters, name, 1, dt) + (biases[name].astype(dt) if biases else 0)
                 for name, w in (("q", wq), ("k", wk), ("v", wv)))
      return act(apply_rope(q, cos, sin), "heads", "head_dim"), apply_rope(k, cos, sin), v

    if split:
      attn_parts = _shared_prefix_attention(*each(qkv, parts, cos_parts, sin_parts), kv_mask_bs)
    else:
      attn, cache = self._attention(*qkv(x, cos_btd, sin_btd), layer_idx, kv_mask_bs, cache_index, cache, prefix)
      attn_parts = (attn,)
    attn_parts = each(lambda a: act(a, "heads", "head_dim"), attn_parts)
    parts = each(lambda xp, a: act(xp + _projection(a, wo, adapters, "o", 2, dt), "act_embed"), parts, attn_parts)

    # --- SwiGLU MLP
    mlp_norm = _param(self, "mlp_norm", (d,), ("norm",), ones)
    w_gate = _param(self, "gate", (d, f), ("embed", "mlp"), dense)
    w_up = _param(self, "up", (d, f), ("embed", "mlp"), dense)
    w_down = _param(self, "down", (f, d), ("mlp", "embed"), dense)

    def mlp(xp):
      hn = rms_norm(xp, mlp_norm, cfg.rms_eps)
      gate = _projection(hn, w_gate, adapters, "gate", 1, dt)
      gated = act(jax.nn.silu(gate) * _projection(hn, w_up, adapters, "up", 1, dt), "mlp")
      return act(xp + _projection(gated, w_down, adapters, "down", 1, dt), "act_embed")

    parts = each(mlp, parts)
    return (parts if split else parts[0], cache), None

  def _attention(self, q, k, v, layer_idx, kv_mask_bs, cache_index, cache, prefix):
    """(attn [b, t, heads, head_dim], updated cache or None) of one array of queries (see `Transformer.__call__`)."""
    t = q.shape[1]
    q_slot = cache_index + jnp.arange(t)
    if cache is None:  # a full forward (training): the keys and values as projected
      allowed = (jnp.arange(t)[None, :] <= q_slot[:, None])[None] & kv_mask_bs[:, None, :].astype(bool)
      return _masked_attention(q, *_kv_layout(k, v), allowed), None
    k, v = _kv_layout(k, v)
    dt = self.cfg.dtype
    cache = KVCache(
        jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), (layer_idx, 0, 0, 0, cache_index)),
        jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), (layer_idx, 0, 0, cache_index, 0)))
    s = cache.k.shape[-1] if self.attend_slots is None else self.attend_slots
    keys = jax.lax.dynamic_index_in_dim(cache.k, layer_idx, 0, keepdims=False)[..., :s].astype(dt)
    values = jax.lax.dynamic_index_in_dim(cache.v, layer_idx, 0, keepdims=False)[:, :, :s].astype(dt)
    allowed = (jnp.arange(s)[None, :] <= q_slot[:, None])[None] & kv_mask_bs[:, None, :s].astype(bool)  # [b,t,s]
    return _masked_attention(q, keys, values, allowed, prefix), cache


class Transformer(nn.Module):
  """The decoder. `__call__` returns (logits [b, n, vocab] in float32 — [vocab, b, n] with `vocab_first` — and the
  updated cache or None)."""
  cfg: ModelConfig
  mesh: Mesh | None = None

  @nn.compact
  def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array, kv_mask_bs: jax.Array,
               cache: KVCache | None = None, cache_index: jax.Array | int = 0,
               logit_idx_bn: jax.Array | None = None, adapters: dict | None = None,
               attend_slots: int | None = None, prefix: KVCache | None = None,
               shared_prefix: int = 0, vocab_first: bool = False) -> tuple[jax.Array, KVCache | None]:
    """tokens/positions [b, t]; kv_mask [b, s] (s = t without a cache, else the cache's slots).

    `logit_idx_bn` picks the positions (indices into t) whose logits are computed; None computes all t.
    `adapters` adds LoRA terms to the layer projections (see the module docstring).
    `attend_slots` (static, with a cache): the queries attend to the cache's first this many slots only (they must
    hold every real key: a prefill passes cache_index + t and skips the slots reserved for later tokens).
    `prefix` (with a cache): keys and values of a prefix every row shares ([layers, 1, ...] in KVCache's layouts,
    e.g. the chat template and system prompt), stored once and attended to in full before the row's own cache slots
    (`kv_mask` covers those only; positions count the prefix). The prefix's scores are one matmul for all rows.
    `shared_prefix` (static, without a cache: training): every row's first this many tokens are the same (e.g. the
    chat template's default system turn; row 0's tokens and positions serve all rows, every one of them a real key),
    so they run through the layers once, as a batch of one, and every row attends to that copy — the same logits,
    without paying for the prefix b times. The caller guarantees the rows agree there.
    `vocab_first` (static): logits come as [vocab, b, n], from the vocabulary-major matmul (embedding @ x^T), for a
    loss that reduces over axis 0 (`losses.token_nll(..., vocab_axis=0)`). On XLA:CPU that head, forward and backward
    with the cross-entropy, ran 27 % faster than the [b, n, vocab] one (SmolLM2, 784 positions: 0.83 against 1.14 s);
    transposing its output back costs more than it saves.
    """
    cfg, mesh = self.cfg, self.mesh
    embed = _param(self, "embed", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                   nn.initializers.normal(0.02))
    inv_freq = jnp.asarray(rope_inv_freq(cfg))

    def embed_part(tokens, positions):
      """Embeddings and RoPE cos/sin of tokens [b, t]."""
      x = jnp.take(embed, tokens, axis=0).astype(cfg.dtype)
      x = parallel.constrain(x, ("batch", "length", "act_embed"), mesh)
      freqs = positions.astype(jnp.float32)[..., None] * inv_freq
      cos, sin = jnp.cos(freqs), jnp.sin(freqs)
      return x, jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, sin], -1)

    b, t, p = tokens_bt.shape[0], tokens_bt.shape[1], shared_prefix
    if p:
      if cache is not None or prefix is not None:
        raise ValueError("shared_prefix: for a full forward without a cache (training); a cached call takes `prefix`")
      if not 0 < p < t:
        raise ValueError(f"shared_prefix={p}: expected fewer than the {t} tokens of a row")
      (xp, cos_p, sin_p), (xs, cos_s, sin_s) = (embed_part(tokens_bt[:1, :p], positions_bt[:1, :p]),
                                                embed_part(tokens_bt[:, p:], positions_bt[:, p:]))
      x, cos, sin, kv_mask_bs = (xp, xs), (cos_p, cos_s), (sin_p, sin_s), kv_mask_bs[:, p:]
    else:
      x, cos, sin = embed_part(tokens_bt, positions_bt)

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
    if p:  # the rows again in full, [b, t, d] (cheap next to any layer)
      x = jnp.concatenate([jnp.broadcast_to(x[0], (b, p, cfg.d_model)), x[1]], axis=1)

    if logit_idx_bn is not None:  # the vocab projection only where logits are needed
      x = jnp.take_along_axis(x, logit_idx_bn[..., None], axis=1)
    x = rms_norm(x, _param(self, "final_norm", (cfg.d_model,), ("norm",), nn.initializers.ones), cfg.rms_eps)
    x2 = x.reshape(-1, cfg.d_model)  # 2-D, as in `dense`
    if cfg.tie_embeddings:
      head, head_axes = embed, "vd"
    else:
      head, head_axes = _param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                               nn.initializers.normal(0.02)), "dv"
    if vocab_first:
      logits = jnp.einsum(f"{head_axes},nd->vn", head.astype(cfg.dtype), x2, preferred_element_type=jnp.float32)
      logits = logits.reshape((cfg.vocab_size,) + x.shape[:2])
      return parallel.constrain(logits, ("vocab", "batch", "length"), mesh), cache
    logits = jnp.einsum(f"nd,{head_axes}->nv", x2, head.astype(cfg.dtype), preferred_element_type=jnp.float32)
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
