"""Choosing one token per row from logits: per-row temperature, top-k, top-p and an allowed-token mask, all traced.

Every knob is a per-row array, so one compile serves every setting: temperature 0 is greedy, top-k 0 and top-p 1 are
off. Randomness is one uniform per row and step, drawn from `fold_in(fold_in(key, row_id), step)`, so a row's tokens
depend on its own id and prompt only — not on the batch it shares, the padding or the device layout.

The draw is an inverse-CDF lookup in two levels (blocks of the vocabulary, then within the chosen block): on CPU this
is ~10x cheaper than Gumbel noise over the vocabulary and ~70x cheaper than a sort. Top-k and top-p never sort either:
their thresholds are found by bisection on the float bit patterns (exact, 32 steps) and only run when a row asks for
them (`lax.cond`). The recorded log-probability is always the model's own: log_softmax of the raw logits, whatever
temperature, filter or mask chose the token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

BLOCK = 256  # vocabulary block of the two-level inverse-CDF draw


class Knobs(NamedTuple):
  """Per-row sampling settings, all traced arrays of shape [b]."""
  temperature: jax.Array  # float32; 0 = greedy
  top_k: jax.Array        # int32; 0 = off
  top_p: jax.Array        # float32; 1 = off


def row_uniforms(key: jax.Array, row_ids_b: jax.Array, step: jax.Array | int) -> jax.Array:
  """One uniform in [0, 1) per row, a function of (key, row id, step) only."""
  def one(row):
    return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, row), step))
  return jax.vmap(one)(row_ids_b)


def _ordered_keys(x: jax.Array) -> jax.Array:
  """uint32 keys that sort like the float32 values of `x` (-inf lowest; no NaNs expected)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _largest_key_where(keys_bv: jax.Array, ok) -> jax.Array:
  """Per row, the largest uint32 t with ok(t) true, given ok is monotone (true up to some t) and ok(0) holds."""
  lo = jnp.zeros(keys_bv.shape[:1], jnp.uint32)
  hi = jnp.full(keys_bv.shape[:1], 0xFFFFFFFF, jnp.uint32)

  def body(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2 + (hi - lo) % 2  # upper middle, without overflowing uint32
    good = ok(mid)
    return jnp.where(good, mid, lo), jnp.where(good, hi, mid - 1)

  lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
  return lo


def nucleus_mask(scaled_bv: jax.Array, top_k_b: jax.Array, top_p_b: jax.Array) -> jax.Array:
  """Which tokens survive top-k then top-p (over the distribution softmax(scaled)); ties at a threshold survive.

  Top-k keeps the k largest; top-p then keeps the smallest most-probable set whose mass (renormalised over the
  top-k survivors) reaches p, as `transformers` does. -inf entries (masked tokens) never survive.
  """
  keys = _ordered_keys(scaled_bv)
  n_finite = jnp.sum(jnp.isfinite(scaled_bv), axis=-1)
  k = jnp.where(top_k_b > 0, jnp.minimum(top_k_b, n_finite), n_finite)
  t_k = _largest_key_where(keys, lambda t: jnp.sum(keys >= t[:, None], axis=-1) >= k)
  weights = jnp.where(keys >= t_k[:, None], jnp.exp(scaled_bv - jnp.max(scaled_bv, -1, keepdims=True)), 0.0)
  need = top_p_b * jnp.sum(weights, axis=-1)
  t_p = _largest_key_where(keys, lambda t: (t <= t_k) | (
      jnp.sum(jnp.where(keys >= t[:, None], weights, 0.0), axis=-1) >= need))
  return (keys >= jnp.maximum(t_k, t_p)[:, None]) & jnp.isfinite(scaled_bv)


def inverse_cdf(weights_bv: jax.Array, u_b: jax.Array) -> jax.Array:
  """Per row, the index i with cdf[i-1] <= u * total < cdf[i] of non-negative `weights` (a zero weight is never
  chosen); two levels so that only a vocabulary block is ever scanned in order."""
  b, v = weights_bv.shape
  pad = -v % BLOCK
  w = jnp.pad(weights_bv, ((0, 0), (0, pad))).reshape(b, -1, BLOCK)
  n_blocks = w.shape[1]
  block_sums = jnp.sum(w, axis=-1)
  block_cdf = jnp.cumsum(block_sums, axis=-1)
  target = u_b * block_cdf[:, -1]
  j = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1), n_blocks - 1)
  # Float rounding can land on an empty block at the very top: take the last non-empty one instead.
  last_nonempty = n_blocks - 1 - jnp.argmax((block_sums > 0)[:, ::-1], axis=-1)
  j = jnp.where(jnp.take_along_axis(block_sums, j[:, None], -1)[:, 0] > 0, j, last_nonempty)
  inner = jnp.take_along_axis(w, j[:, None, None], axis=1)[:, 0]  # [b, BLOCK]
  before = jnp.take_along_axis(block_cdf - block_sums, j[:, None], -1)
  i = jnp.minimum(jnp.sum(before + jnp.cumsum(inner, axis=-1) <= target[:, None], axis=-1), BLOCK - 1)
  last_positive = BLOCK - 1 - jnp.argmax((inner > 0)[:, ::-1], axis=-1)
  i = jnp.where(jnp.take_along_axis(inner, i[:, None], -1)[:, 0] > 0, i, last_positive)
  return (j * BLOCK + i).astype(jnp.int32)


def draw(logits_bv: jax.Array, knobs: Knobs, allowed_bv: jax.Array | None, u_b: jax.Array
         ) -> tuple[jax.Array, jax.Array]:
  """(token [b] int32, the model's log-probability of it [b]) for one step.

  `allowed_bv` (bool [b, vocab], or None for all) restricts the choice, renormalising over the allowed tokens;
  `u_b` are the row uniforms.
  """
  logits = logits_bv.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  masked = logits if allowed_bv is None else jnp.where(allowed_bv, logits, -jnp.inf)
  greedy = knobs.temperature <= 0
  scaled = masked / jnp.where(greedy, 1.0, knobs.temperature)[:, None]
  filtering = jnp.any(~greedy & ((knobs.top_k > 0) | (knobs.top_p < 1)))
  keep = jax.lax.cond(filtering, lambda: nucleus_mask(scaled, knobs.top_k, knobs.top_p),
                      lambda: jnp.isfinite(scaled))
  weights = jnp.where(keep, jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True)), 0.0)
  token = jnp.where(greedy, jnp.argmax(masked, axis=-1).astype(jnp.int32), inverse_cdf(weights, u_b))
  logprob = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - log_z
  return token, logprob
