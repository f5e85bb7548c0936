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


@xla_cpu.jit_many_rows(static_argnames=("module", "slots"))
def _prefill(module, params, tokens, mask, slots):
  b, p = tokens.shape
  cache = transformer.KVCache.zeros(module.cfg, b, slots)
  kv_mask = jnp.zeros((b, slots), jnp.int32).at[:, :p].set(mask)
  positions = transformer.positions_from_mask(mask)
  logits, cache = module.apply({"params": params}, tokens, positions, kv_mask, cache, 0,
                               logit_idx_bn=jnp.full((b, 1), p - 1), attend_slots=p)
  return cache, jax.nn.log_softmax(logits[:, 0]), positions[:, -1]


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
  logits, _ = module.apply({"params": params}, feed, positions, kv_mask, cache, p)
  rest = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.broadcast_to(cont[1:], (b, k - 1))[..., None], -1)
  rest = jnp.where(jnp.arange(1, k)[None] < cont_len, rest[..., 0], 0.0)
  return first + rest.sum(-1)


def continuation_logprobs(model: Any, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                          batch_size: int = 64) -> np.ndarray:
  """log P(continuation | context) for every context × continuation pair: an array [n_contexts, n_continuations]."""
  if any(len(c) == 0 for c in continuations) or not continuations:
    raise ValueError("continuation_logprobs: every continuation needs at least one token")
  k = max(len(c) for c in continuations)
  pad = model.tokenizer.pad_id or 0
  module = model.module
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
