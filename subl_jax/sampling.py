"""Batched generation: one jitted prefill, one jitted `lax.while_loop` decode over a preallocated KV cache.

Prompts are left-padded to a bucketed length with explicit positions; temperatures are per-row traced values (0 is
greedy), so one compile serves every setting; rows stop on their stop tokens or at `max_new_tokens`; the loop state is
donated and nothing returns to the host until the batch is done.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from subl_jax import parallel
from subl_jax.models import transformer

BUCKET = 16  # prompt lengths are rounded up to a multiple of this, so a run compiles a handful of shapes


class Generation(NamedTuple):
  tokens: list[list[int]]       # new tokens per row, without the stop token
  logprobs: list[list[float]]   # the model's log-probability of each new token (at temperature 1)
  stopped: list[bool]           # True where the row ended on a stop token, False where it hit max_new_tokens


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int = BUCKET) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [b, p], mask [b, p]) with each prompt right-aligned and p rounded up to `bucket`."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("left_pad: every prompt needs at least one token")
  p = -(-max(len(x) for x in prompts) // bucket) * bucket
  tokens = np.full((len(prompts), p), pad_id, np.int32)
  mask = np.zeros((len(prompts), p), np.int32)
  for i, x in enumerate(prompts):
    tokens[i, p - len(x):] = x
    mask[i, p - len(x):] = 1
  return tokens, mask


def sample_logits(logits_bv: jax.Array, temperature_b: jax.Array, key: jax.Array) -> jax.Array:
  """One token per row: argmax where the temperature is 0, else a draw from softmax(logits / temperature)."""
  safe_t = jnp.where(temperature_b > 0, temperature_b, 1.0)[:, None]
  drawn = jax.random.categorical(key, logits_bv / safe_t, axis=-1)
  return jnp.where(temperature_b > 0, drawn, jnp.argmax(logits_bv, axis=-1)).astype(jnp.int32)


class _State(NamedTuple):
  cache: transformer.KVCache
  kv_mask: jax.Array    # [b, s] which cache slots hold real tokens
  last: jax.Array       # [b] the token fed next
  position: jax.Array   # [b] its position
  out: jax.Array        # [b, n] new tokens
  logprobs: jax.Array   # [b, n]
  done: jax.Array       # [b]
  step: jax.Array       # index of the next token to write into `out`
  key: jax.Array


def _pick(logits_bv, temperature_b, key, stop_ids):
  token = sample_logits(logits_bv, temperature_b, key)
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits_bv), token[:, None], axis=-1)[:, 0]
  return token, logp, jnp.isin(token, stop_ids)


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens"))
def _prefill(module, params, tokens, mask, temperature, key, stop_ids, max_new_tokens):
  b, p = tokens.shape
  cache = transformer.KVCache.zeros(module.cfg, b, p + max_new_tokens)
  cache = transformer.KVCache(*(parallel.constrain(x, transformer.KVCache.LOGICAL, module.mesh) for x in cache))
  kv_mask = jnp.zeros((b, p + max_new_tokens), jnp.int32).at[:, :p].set(mask)
  positions = transformer.positions_from_mask(mask)
  logits, cache = module.apply({"params": params}, tokens, positions, kv_mask, cache, 0,
                               logit_idx_bn=jnp.full((b, 1), p - 1))
  key, sub = jax.random.split(key)
  token, logp, stop = _pick(logits[:, 0], temperature, sub, stop_ids)
  out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(token)
  logprobs = jnp.zeros((b, max_new_tokens), jnp.float32).at[:, 0].set(logp)
  return _State(cache, kv_mask, token, positions[:, -1] + 1, out, logprobs, stop, jnp.int32(1), key)


@functools.partial(jax.jit, static_argnames=("module", "prompt_len"), donate_argnums=(2,))
def _decode(module, params, state, temperature, stop_ids, prompt_len):
  n = state.out.shape[1]

  def cond(s: _State):
    return (s.step < n) & ~jnp.all(s.done)

  def body(s: _State):
    slot = prompt_len + s.step - 1  # the slot of the token being fed (generated at step-1)
    kv_mask = jax.lax.dynamic_update_slice(s.kv_mask, jnp.ones((s.last.shape[0], 1), jnp.int32), (0, slot))
    logits, cache = module.apply({"params": params}, s.last[:, None], s.position[:, None], kv_mask, s.cache, slot)
    key, sub = jax.random.split(s.key)
    token, logp, stop = _pick(logits[:, 0], temperature, sub, stop_ids)
    token = jnp.where(s.done, 0, token)  # finished rows keep emitting padding
    out = jax.lax.dynamic_update_slice(s.out, token[:, None], (0, s.step))
    logprobs = jax.lax.dynamic_update_slice(s.logprobs, jnp.where(s.done, 0.0, logp)[:, None], (0, s.step))
    return _State(cache, kv_mask, token, s.position + 1, out, logprobs, s.done | stop, s.step + 1, key)

  return jax.lax.while_loop(cond, body, state)


def generate(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float | Sequence[float] = 0.0, seed: int = 0) -> Generation:
  """Continues each prompt (token ids) until a stop token of the model's tokenizer or `max_new_tokens`."""
  tok = model.tokenizer
  tokens, mask = left_pad(prompts, tok.pad_id if tok.pad_id is not None else 0)
  b = tokens.shape[0]
  temps = np.broadcast_to(np.asarray(temperature, np.float32), (b,)).copy()
  batch = parallel.named_sharding(model.mesh, ("batch", "length"), tokens.shape)
  rows = parallel.named_sharding(model.mesh, ("batch",), (b,))
  module = model.module
  stop_ids = jnp.asarray(sorted(tok.stop_ids), jnp.int32)
  state = _prefill(module, model.params, jax.device_put(tokens, batch), jax.device_put(mask, batch),
                   jax.device_put(temps, rows), jax.random.key(seed), stop_ids, max_new_tokens)
  state = _decode(module, model.params, state, jax.device_put(temps, rows), stop_ids, tokens.shape[1])
  out, logprobs, stopped = (np.asarray(x) for x in (state.out, state.logprobs, state.done))
  stop_set = set(int(i) for i in tok.stop_ids)
  result_tokens, result_logprobs = [], []
  for row, lp in zip(out.tolist(), logprobs.tolist()):
    end = next((i for i, t in enumerate(row) if t in stop_set), len(row))
    result_tokens.append(row[:end])
    result_logprobs.append(lp[:end])
  return Generation(result_tokens, result_logprobs, [bool(s) for s in stopped])
