"""Log-probabilities of short continuations after shared contexts: each context is run once into a KV cache,
then every continuation is scored from that cache (only its own few tokens are computed).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from subl_jax.core import parallel, sampling, xla_cpu
from subl_jax.core.models import transformer
from subl_jax.core.models.config import Perf
from subl_jax.core.models.inputs import decode_inputs, prefill_inputs


@xla_cpu.jit_many_rows(static_argnames=("module", "slots"))
def _prefill(module, params, tokens, mask, slots):
  b, p = tokens.shape
  x = prefill_inputs(tokens, mask)
  cache = transformer.KVCache.zeros(module.cfg, b, slots, module.perf.kv_layout)
  out = module.apply({"params": params}, x, cache=cache, logit_idx_bn=jnp.full((b, 1), p - 1))
  return out.cache, jax.nn.log_softmax(out.logits[:, 0]), x.positions[:, -1]


@functools.partial(jax.jit, static_argnames=("module",))
def _continue(module, params, cache, ctx_mask, last_logp, last_pos, cont, cont_len):
  """Sum of log P(cont[:cont_len]) per context row; `cont` [k] is the same continuation for every row."""
  b, p = ctx_mask.shape
  k = cont.shape[0]
  first = last_logp[:, cont[0]]
  if k == 1:
    return first
  kv_mask = jnp.concatenate([ctx_mask, jnp.ones((b, k - 1), jnp.int32)], axis=1)
  feed = jnp.broadcast_to(cont[:-1], (b, k - 1))
  positions = last_pos[:, None] + 1 + jnp.arange(k - 1)[None]
  logits = module.apply({"params": params}, decode_inputs(feed, positions, kv_mask, p), cache=cache).logits
  rest = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.broadcast_to(cont[1:], (b, k - 1))[..., None], -1)
  rest = jnp.where(jnp.arange(1, k)[None] < cont_len, rest[..., 0], 0.0)
  return first + rest.sum(-1)


def continuation_logprobs(model: Any, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                          batch_size: int = 64, perf: Perf | None = None) -> np.ndarray:
  """log P(continuation | context) for every context × continuation pair: an array [n_contexts, n_continuations].

  `perf`: the model's layouts (default `transformer.default_perf()`; only its kv_layout is used)."""
  if any(len(c) == 0 for c in continuations) or not continuations:
    raise ValueError("continuation_logprobs: every continuation needs at least one token")
  k = max(len(c) for c in continuations)
  pad = model.tokenizer.pad_id or 0
  perf = (transformer.default_perf() if perf is None else perf).replace(vocab_major_head=False)
  module = transformer.Transformer(model.config, mesh=model.mesh, perf=perf)
  out = np.zeros((len(contexts), len(continuations)), np.float64)
  for start in range(0, len(contexts), batch_size):
    tokens, mask = sampling.left_pad(contexts[start:start + batch_size], pad)
    batch = parallel.named_sharding(model.mesh, ("batch", "length"), tokens.shape)
    mask_dev = jax.device_put(mask, batch)
    cache, last_logp, last_pos = _prefill(module, model.params, jax.device_put(tokens, batch), mask_dev,
                                          tokens.shape[1] + k - 1)
    for j, cont in enumerate(continuations):
      padded = np.zeros(k, np.int32)
      padded[:len(cont)] = cont
      logp = _continue(module, model.params, cache, mask_dev, last_logp, last_pos, jnp.asarray(padded), len(cont))
      out[start:start + tokens.shape[0], j] = np.asarray(logp, np.float64)
  return out
