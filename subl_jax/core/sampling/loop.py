"""The two jitted programs of sampling: `prefill` (prompts into a preallocated KV cache, first token) and `decode`
(one `lax.while_loop` until every row has stopped or `max_new_tokens`), with the loop state donated.

Each row's cache slots: [left-padded suffix (T) | new tokens (N)]. A prefix that every prompt shares (chat template
+ system prompt, P tokens) is prefilled once at batch 1 into its own cache and kept once, not per row: every layer
attends to it with one matmul for all rows (`Transformer.apply(prefix_cache=...)`), so a decode step reads P fewer
slots per row. Without a shared prefix (P = 0) the prompts are simply left-padded.
Positions are explicit (each row counts only its real tokens), so padding never changes a row's numbers.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from subl_jax.core import parallel, xla_cpu
from subl_jax.core.models import transformer
from subl_jax.core.models.inputs import decode_inputs, prefill_inputs
from subl_jax.core.sampling import constraint as constraint_lib
from subl_jax.core.sampling.draw import Knobs, draw, row_uniforms


class Rows(NamedTuple):
  """What is fixed per row for a whole generation."""
  ids: jax.Array       # [b] int32 row ids: with the key, they alone decide a row's random draws
  knobs: Knobs         # per-row temperature / top-k / top-p
  constraint: constraint_lib.Constraint | None  # which tokens may be drawn (None: any)
  stop_ids: jax.Array  # [n_stop] int32
  key: jax.Array       # the generation's key


class State(NamedTuple):
  cache: transformer.KVCache
  prefix: transformer.KVCache | None  # the shared prefix's keys and values (batch 1), or None
  kv_mask: jax.Array    # [b, slots] which cache slots hold real tokens
  last: jax.Array       # [b] the token fed next
  position: jax.Array   # [b] its position
  out: jax.Array        # [b, N] new tokens (0 after a row's stop token)
  logprobs: jax.Array   # [b, N] the model's log-probability of each (0 after the stop token)
  n_new: jax.Array      # [b] tokens generated so far, the stop token included
  done: jax.Array       # [b] the row has emitted a stop token
  fsa: jax.Array        # [b] int32 state of the constraint automaton (0 without a constraint)
  step: jax.Array       # index of the next token to write into `out`


def _empty_cache(module: transformer.Transformer, batch: int, slots: int) -> transformer.KVCache:
  layout = module.perf.kv_layout
  cache = transformer.KVCache.zeros(module.cfg, batch, slots, layout)
  return transformer.KVCache(*(parallel.constrain(x, names, module.mesh)
                               for x, names in zip(cache, transformer.KVCache.logical(layout))))


def _pick(logits_bv, rows: Rows, step, n_steps, done_b, fsa_b):
  """(token, logprob, stopped now, next automaton state) per row; finished rows emit 0 with log-probability 0."""
  c = rows.constraint
  allowed = None if c is None else constraint_lib.allowed_mask(c, fsa_b, logits_bv.shape[-1], n_steps - step)
  token, logprob = draw(logits_bv, rows.knobs, allowed, row_uniforms(rows.key, rows.ids, step))
  token = jnp.where(done_b, 0, token)
  fsa_b = fsa_b if c is None else jnp.where(done_b, fsa_b, constraint_lib.advance(c, fsa_b, token))
  return token, jnp.where(done_b, 0.0, logprob), ~done_b & jnp.isin(token, rows.stop_ids), fsa_b


@xla_cpu.jit_many_rows(static_argnames=("module", "max_new_tokens"))
def prefill(module: transformer.Transformer, params, prefix_p: jax.Array, tokens_bt: jax.Array,
            mask_bt: jax.Array, rows: Rows, max_new_tokens: int) -> State:
  """Runs the shared prefix [P] (P may be 0) and the left-padded suffixes [b, T]; draws each row's first token."""
  (b, t), p = tokens_bt.shape, prefix_p.shape[0]
  kv_mask = jnp.concatenate([mask_bt.astype(jnp.int32), jnp.zeros((b, max_new_tokens), jnp.int32)], axis=1)
  prefix = None
  if p:
    prefix = module.apply({"params": params}, prefill_inputs(prefix_p[None], jnp.ones((1, p), jnp.int32)),
                          cache=_empty_cache(module, 1, p), logit_idx_bn=jnp.zeros((1, 1), jnp.int32)).cache
  x = prefill_inputs(tokens_bt, mask_bt, position_offset=p)
  out = module.apply({"params": params}, x, cache=_empty_cache(module, b, t + max_new_tokens), prefix_cache=prefix,
                     logit_idx_bn=jnp.full((b, 1), t - 1))
  cache, positions = out.cache, x.positions
  done = jnp.zeros((b,), bool)
  token, logprob, stop, fsa = _pick(out.logits[:, 0], rows, 0, max_new_tokens, done, jnp.zeros((b,), jnp.int32))
  out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(token)
  logprobs = jnp.zeros((b, max_new_tokens), jnp.float32).at[:, 0].set(logprob)
  return State(cache, prefix, kv_mask, token, positions[:, -1] + 1, out, logprobs, jnp.ones((b,), jnp.int32), stop,
               fsa, jnp.int32(1))


@functools.partial(jax.jit, static_argnames=("module",), donate_argnums=(2,))
def decode(module: transformer.Transformer, params, state: State, rows: Rows) -> State:
  """Feeds the last token and draws the next, for every row, until all rows are done or the buffer is full."""
  b, n = state.out.shape
  first_new_slot = state.kv_mask.shape[1] - n

  def cond(s: State):
    return (s.step < n) & ~jnp.all(s.done)

  def body(s: State):
    slot = first_new_slot + s.step - 1  # where the token drawn at step-1 goes
    kv_mask = jax.lax.dynamic_update_slice(s.kv_mask, jnp.ones((b, 1), jnp.int32), (0, slot))
    out = module.apply({"params": params}, decode_inputs(s.last[:, None], s.position[:, None], kv_mask, slot),
                       cache=s.cache, prefix_cache=s.prefix)
    cache = out.cache
    token, logprob, stop, fsa = _pick(out.logits[:, 0], rows, s.step, n, s.done, s.fsa)
    out = jax.lax.dynamic_update_slice(s.out, token[:, None], (0, s.step))
    logprobs = jax.lax.dynamic_update_slice(s.logprobs, logprob[:, None], (0, s.step))
    n_new = s.n_new + (~s.done).astype(jnp.int32)
    return State(cache, s.prefix, kv_mask, token, s.position + 1, out, logprobs, n_new, s.done | stop, fsa, s.step + 1)

  return jax.lax.while_loop(cond, body, state)
