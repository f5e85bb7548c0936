"""A decoder-only transformer for the Llama family and Qwen2: RMSNorm, RoPE, GQA, SwiGLU, scanned layers, KV cache.

One call serves every mode; the caller builds its `Inputs` (tokens, positions, attention mask) with the helper of
its mode (`inputs.train_inputs`, `prefill_inputs`, `decode_inputs`) and gets an `Output` (logits, cache):

    out = Transformer(cfg).apply({"params": p}, train_inputs(tokens, positions, kv_mask), logit_idx_bn=idx)
    out = module.apply(v, prefill_inputs(tokens, mask), cache=KVCache.zeros(cfg, b, slots, module.perf.kv_layout))
    out = module.apply(v, decode_inputs(last[:, None], pos[:, None], kv_mask, slot), cache=out.cache)

A prefix every row shares (a chat template and system prompt) is held once, as a KV cache of batch 1 that every
row attends to in full: sampling prefills it before the prompts and passes it as `prefix_cache`; a training batch
(`train_inputs(shared_prefix=p)`) prefills it within the call, so gradients flow through it.

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
from subl_jax.core import perf as perf_lib
from subl_jax.core.models.attention import Attention
from subl_jax.core.models.config import ModelConfig, Perf
# the input helpers and `rope_inv_freq` are re-exported: callers need only this module
from subl_jax.core.models.inputs import (Inputs, decode_inputs, positions_from_mask, prefill_inputs,  # noqa: F401
                                         train_inputs)
from subl_jax.core.models.kv_cache import KVCache
from subl_jax.core.models.layers import DENSE_INIT, MLP, Rope, accum_dtype, constrain, param, rms_norm
from subl_jax.core.models.layers import rope_inv_freq  # noqa: F401

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


def default_perf() -> Perf:
  """The layouts the process's `perf` settings choose (`core/perf.py`: per platform unless configured), the callers'
  default."""
  s = perf_lib.current()
  return Perf("transposed" if s.kv_layout_transposed else "standard", s.vocab_major_head)


class Output(NamedTuple):
  """logits: [b, n, vocab] float32 (n: the `logit_idx_bn` positions, else every token), [vocab, b, n] with
  `Perf.vocab_major_head`; cache: the KV cache with the new tokens' keys and values written, or None."""
  logits: jax.Array
  cache: KVCache | None


class Carry(NamedTuple):
  """What the layer scan passes from one layer to the next."""
  x: jax.Array            # [b, t, d_model] the residual stream
  cache: KVCache | None   # every layer's keys and values; each layer writes its slice


class PerLayer(NamedTuple):
  """What the layer scan slices along the layers axis: one layer's share."""
  index: jax.Array             # [] the layer's index into the cache
  adapters: dict | None        # its LoRA factors
  prefix: KVCache | None       # its keys and values of the shared prefix, [1, ...]


class Shared(NamedTuple):
  """What every layer reads alike."""
  rope: Rope                # [b, t, head_dim] each
  mask: jax.Array           # [b, t, s] bool (`Inputs.mask`)
  cache_index: jax.Array    # [] int32 (`Inputs.cache_index`)


class Block(nn.Module):
  """One pre-norm layer, the body of the layer scan: x + Attention(x), then + MLP(x).

  Its submodules' parameters live in its own scope (`layers/q`, `layers/gate`, ...), so the tree is that of one flat
  layer.

  Args:
    carry: `Carry` (x [b, t, d_model], cache).
    layer: `PerLayer` (index, adapters, prefix) of this layer.
    shared: `Shared` (rope, mask, cache_index) of every layer.
  Returns:
    (the `Carry` after this layer, None).
  """
  cfg: ModelConfig
  layout: str
  mesh: Mesh | None = None

  def setup(self):
    self.attention = Attention(self.cfg, self.layout, self.mesh)
    self.mlp = MLP(self.cfg, self.mesh)
    nn.share_scope(self, self.attention)
    nn.share_scope(self, self.mlp)

  def __call__(self, carry: Carry, layer: PerLayer, shared: Shared) -> tuple[Carry, None]:
    adapters = layer.adapters
    update, cache = self.attention(carry.x, shared.rope, shared.mask, carry.cache, layer.index, shared.cache_index,
                                   layer.prefix, adapters)
    x = constrain(carry.x + update, self.mesh, "act_embed")
    x = constrain(x + self.mlp(x, adapters), self.mesh, "act_embed")
    return Carry(x, cache), None


class Transformer(nn.Module):
  """The decoder (see the module docstring). `perf` (static) picks array layouts: the same numbers either way.
  `hidden` (static): `Output.logits` is the residual stream after the last layer instead ([b, n, d_model], no final
  norm, no head): with `cfg.n_layers` = k and the first k layers' parameters, the stream after layer k."""
  cfg: ModelConfig
  mesh: Mesh | None = None
  perf: Perf = Perf()
  hidden: bool = False

  @nn.compact
  def __call__(self, inputs: Inputs, cache: KVCache | None = None, prefix_cache: KVCache | None = None,
               logit_idx_bn: jax.Array | None = None, adapters: dict | None = None) -> Output:
    """Runs `inputs` through every layer and the LM head.

    Args:
      inputs: tokens, positions and mask of this call (`inputs.train_inputs`, `prefill_inputs`, `decode_inputs`).
      cache: the KV cache to write the tokens' keys and values into and attend over (`KVCache.zeros(cfg, b, slots,
        perf.kv_layout)` for a prefill), or None (attend to the tokens themselves).
      prefix_cache: keys and values of a prefix every row shares ([layers, 1, ...], the cache of a batch-1 prefill
        of it), attended to in full before each row's own keys; positions continue after it. Or None.
      logit_idx_bn: [b, n] the positions (indices into the whole row, shared prefix included) whose logits are
        computed; None computes all of them.
      adapters: LoRA terms of the layer projections (see the module docstring).
    Returns:
      `Output` (logits, cache).
    """
    cfg = self.cfg
    b, t = inputs.tokens.shape
    s = inputs.mask.shape[-1]
    if inputs.mask.shape != (b, t, s):
      raise ValueError(f"inputs.mask: expected [b, t, s] with b, t = {b, t}, got {inputs.mask.shape}")
    if cache is None and s != t:
      raise ValueError(f"inputs.mask: without a cache the tokens attend to themselves ({t}), got {s} key slots")
    if cache is not None and not t <= s <= cache.slots:
      raise ValueError(f"inputs.mask: {s} key slots, expected between the new tokens ({t}) and the cache's slots "
                       f"({cache.slots})")
    embed = param(self, "embed", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), DENSE_INIT)
    layers = self._layers()

    def run(x: Inputs, cache, prefix_cache):
      h = constrain(jnp.take(embed, x.tokens, axis=0).astype(cfg.dtype), self.mesh, "act_embed")
      per_layer = PerLayer(jnp.arange(cfg.n_layers), (adapters or {}).get("layers") or None, prefix_cache)
      carry, _ = layers(Carry(h, cache), per_layer, Shared(Rope.of(x.positions, cfg), x.mask, x.cache_index))
      return carry

    if inputs.prefix is None:
      x, cache = run(inputs, cache, prefix_cache)
    else:  # the prefix every row shares: prefilled at batch 1 into its own cache, which every row then attends to
      if cache is not None or prefix_cache is not None:
        raise ValueError("inputs.prefix (train_inputs' shared_prefix): for a forward without a cache")
      p = inputs.prefix.tokens.shape[1]
      x_prefix, prefix_cache = run(inputs.prefix, KVCache.zeros(cfg, 1, p, self.perf.kv_layout), None)
      x, _ = run(inputs, None, prefix_cache)
      x = jnp.concatenate([jnp.broadcast_to(x_prefix, (b, p, cfg.d_model)), x], axis=1)  # the rows in full
    if self.hidden:
      return Output(x if logit_idx_bn is None else jnp.take_along_axis(x, logit_idx_bn[..., None], axis=1), cache)
    return Output(self._head(x, embed, logit_idx_bn), cache)

  def _layers(self) -> nn.Module:
    """The layer scan: one `Block`, its parameters stacked over layers under `layers/`."""
    block = Block
    if self.cfg.remat_policy != "none":
      block = nn.remat(Block, policy=_REMAT[self.cfg.remat_policy], prevent_cse=False)
    scan = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=(0, nn.broadcast),
                   length=self.cfg.n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    return scan(self.cfg, self.perf.kv_layout, self.mesh, name="layers")

  def _head(self, x: jax.Array, embed: jax.Array, logit_idx_bn: jax.Array | None) -> jax.Array:
    """Logits of the final hidden states x [b, t, d] at `logit_idx_bn` (see `Output`)."""
    cfg, mesh = self.cfg, self.mesh
    if logit_idx_bn is not None:  # the vocab projection only where logits are needed
      x = jnp.take_along_axis(x, logit_idx_bn[..., None], axis=1)
    x = rms_norm(x, param(self, "final_norm", (cfg.d_model,), ("norm",), nn.initializers.ones), cfg.rms_eps)
    x2 = x.reshape(-1, cfg.d_model)  # 2-D, as in `layers.dense`
    if cfg.tie_embeddings:
      head, head_axes = embed, "vd"
    else:
      head, head_axes = param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), DENSE_INIT), "dv"
    if self.perf.vocab_major_head:
      logits = jnp.einsum(f"{head_axes},nd->vn", head.astype(cfg.dtype), x2,
                          preferred_element_type=accum_dtype(cfg.dtype))
      logits = logits.reshape((cfg.vocab_size,) + x.shape[:2])
      return parallel.constrain(logits, ("vocab", "batch", "length"), mesh)
    logits = jnp.einsum(f"nd,{head_axes}->nv", x2, head.astype(cfg.dtype),
                        preferred_element_type=accum_dtype(cfg.dtype))
    logits = logits.reshape(x.shape[:2] + (cfg.vocab_size,))
    return parallel.constrain(logits, ("batch", "length", "vocab"), mesh)


def _init_inputs() -> Inputs:
  tokens = jnp.zeros((1, 1), jnp.int32)
  return train_inputs(tokens, tokens, tokens)


def abstract_params(cfg: ModelConfig) -> tuple[Any, Any]:
  """(shape tree of the parameters, tree of their logical axis names) without allocating anything."""
  model = Transformer(cfg)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), _init_inputs())["params"])
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
  init = lambda k: nn.meta.unbox(model.init(k, _init_inputs())["params"])
  if mesh is None:
    return jax.jit(init)(key)
  return jax.jit(init, out_shardings=param_shardings(cfg, mesh))(key)
