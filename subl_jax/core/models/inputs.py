"""What one forward reads besides weights and caches: token ids, their positions and the attention mask, built by the
caller with one helper per mode.

- `train_inputs`: a full forward without a cache (training, or the logits of a whole batch); rows may share their
  first tokens (`shared_prefix`), which then run once.
- `prefill_inputs`: left-padded prompts into the first slots of an empty cache.
- `decode_inputs`: new tokens (one per row when decoding) written after those already in the cache.

Positions are explicit (each row counts only its real tokens), so padding never changes a row's numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Inputs(NamedTuple):
  """The tokens of one forward and what each may attend to.

  tokens: [b, t] int32 token ids.
  positions: [b, t] int32 RoPE positions.
  mask: [b, t, s] bool: token i attends key slot j. Without a cache the keys are the t tokens' own (s = t); with
    one, the cache's first s slots (the rest are not read: a prefill skips the slots reserved for later tokens).
  cache_index: [] int32: the cache slot of token 0 (the t tokens are written to slots cache_index .. +t-1).
  prefix: tokens every row begins with ([1, p]: `train_inputs(shared_prefix=p)`), run once and attended to in full
    by every row; the fields above then cover the rest of each row. None: no such prefix.
  """
  tokens: jax.Array
  positions: jax.Array
  mask: jax.Array
  cache_index: jax.Array
  prefix: Inputs | None = None


def positions_from_mask(mask_bt: jax.Array) -> jax.Array:
  """Positions for a left-padded batch: 0 at each row's first real token (pads get 0 too)."""
  return jnp.maximum(jnp.cumsum(mask_bt.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(kv_mask_bs: jax.Array, t: int, first_slot: jax.Array | int = 0) -> jax.Array:
  """[b, t, s]: token i, at slot first_slot + i, attends slots j <= first_slot + i that hold real keys
  (`kv_mask` [b, s] nonzero)."""
  s = kv_mask_bs.shape[1]
  q_slot = first_slot + jnp.arange(t)
  return (jnp.arange(s)[None, :] <= q_slot[:, None])[None] & kv_mask_bs[:, None, :].astype(bool)


def train_inputs(tokens_bt: jax.Array, positions_bt: jax.Array, kv_mask_bt: jax.Array,
                 shared_prefix: int = 0) -> Inputs:
  """A full forward without a cache: token i attends tokens j <= i of its row where `kv_mask` [b, t] is nonzero.

  `shared_prefix` (static): every row's first this many tokens are the same and real (e.g. the chat template's
  default system turn; row 0's tokens and positions serve all rows). They run once, as a batch of one, and every row
  attends to that copy: the same logits, without paying for the prefix b times. The caller guarantees the rows agree
  there. `logit_idx_bn` of the forward still indexes whole rows.
  """
  t = tokens_bt.shape[1]
  p = shared_prefix
  if not p:
    return Inputs(tokens_bt, positions_bt, causal_mask(kv_mask_bt, t), jnp.int32(0))
  if not 0 < p < t:
    raise ValueError(f"shared_prefix={p}: expected fewer than the {t} tokens of a row")
  prefix = train_inputs(tokens_bt[:1, :p], positions_bt[:1, :p], jnp.ones((1, p), jnp.int32))
  rest = train_inputs(tokens_bt[:, p:], positions_bt[:, p:], kv_mask_bt[:, p:])
  return rest._replace(prefix=prefix)


def prefill_inputs(tokens_bt: jax.Array, mask_bt: jax.Array, position_offset: jax.Array | int = 0) -> Inputs:
  """Left-padded prompts (`mask` [b, t]: 1 at real tokens) into slots 0 .. t-1 of an empty cache, attending to those
  slots only. `position_offset`: the positions of a prefix already in another cache (`prefix_cache`), which the
  prompts continue."""
  t = tokens_bt.shape[1]
  positions = position_offset + positions_from_mask(mask_bt)
  return Inputs(tokens_bt, positions, causal_mask(mask_bt, t), jnp.int32(0))


def decode_inputs(tokens_bt: jax.Array, positions_bt: jax.Array, kv_mask_bs: jax.Array,
                  cache_index: jax.Array | int) -> Inputs:
  """t new tokens per row (decoding: t = 1) written at cache slots cache_index .. +t-1; each attends to every slot up
  to its own where `kv_mask` [b, slots] is nonzero (the new tokens' slots included)."""
  cache_index = jnp.asarray(cache_index, jnp.int32)
  return Inputs(tokens_bt, positions_bt, causal_mask(kv_mask_bs, tokens_bt.shape[1], cache_index), cache_index)
