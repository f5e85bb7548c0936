"""Per-token losses at the loss positions, and their masked (sum, count) reduction.

Every loss here is per token [b, n]; `masked_sum` turns it into (Σ w·loss, Σ w), and the train step divides the two
global sums only at the end, so the result is the mean over all loss tokens of the (accumulated, sharded) batch —
never a mean of per-row or per-micro-batch means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from subl_jax.core.models.layers import accum_dtype

KD_TOKENS = ("all", "topk", "numbers")


def masked_sum(loss_bn: jax.Array, weights_bn: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(Σ weights·loss, Σ weights) in float32 (or the loss's wider dtype)."""
  w = weights_bn.astype(accum_dtype(loss_bn.dtype))
  return jnp.sum(loss_bn.astype(w.dtype) * w), jnp.sum(w)


def token_nll(logits: jax.Array, targets_bn: jax.Array, vocab_axis: int = -1) -> jax.Array:
  """-log p(target) per position [b, n], in float32 (or wider); logits [b, n, vocab], or [vocab, b, n] with
  vocab_axis=0."""
  if vocab_axis not in (0, -1, logits.ndim - 1):
    raise ValueError(f"vocab_axis={vocab_axis}: expected 0 or -1 (the vocabulary first or last)")
  axis = 0 if vocab_axis == 0 else -1
  logits = logits.astype(accum_dtype(logits.dtype))
  picked = jnp.squeeze(jnp.take_along_axis(logits, jnp.expand_dims(targets_bn, axis), axis=axis), axis)
  return jax.nn.logsumexp(logits, axis=axis) - picked


def restricted_log_probs(logits_bnv: jax.Array, idx: jax.Array) -> jax.Array:
  """log-softmax over the chosen vocabulary entries only: idx [K] (a fixed set) or [b, n, K] (per position).

  Probabilities over the set sum to 1; logits outside the set do not enter at all.
  """
  logits = logits_bnv.astype(accum_dtype(logits_bnv.dtype))
  if idx.ndim == 1:
    picked = jnp.take(logits, idx, axis=-1)
  else:
    picked = jnp.take_along_axis(logits, idx, axis=-1)
  return jax.nn.log_softmax(picked, axis=-1)


def kd_token_loss(student_bnv: jax.Array, teacher_bnv: jax.Array, temperature: float, kd_tokens: str = "all",
                  topk: int = 0, token_ids: jax.Array | None = None) -> jax.Array:
  """KL(teacher || student) per position at temperature τ, times τ² (so gradients keep their scale across τ).

  kd_tokens: 'all' — the full vocabulary; 'topk' — the teacher's `topk` most likely tokens at each position;
  'numbers' — the fixed set `token_ids`. With a restricted set both distributions are renormalised over it.
  The teacher is a constant (no gradient flows into it).
  """
  if kd_tokens not in KD_TOKENS:
    raise ValueError(f"kd_tokens={kd_tokens!r}: expected one of {KD_TOKENS}")
  teacher = jax.lax.stop_gradient(teacher_bnv.astype(accum_dtype(teacher_bnv.dtype))) / temperature
  student = student_bnv.astype(accum_dtype(student_bnv.dtype)) / temperature
  if kd_tokens == "all":
    log_p, log_q = jax.nn.log_softmax(teacher, axis=-1), jax.nn.log_softmax(student, axis=-1)
  else:
    if kd_tokens == "topk":
      if topk <= 0:
        raise ValueError(f"kd_tokens='topk' needs topk > 0, got {topk}")
      idx = jax.lax.top_k(teacher, topk)[1]
    else:
      if token_ids is None:
        raise ValueError("kd_tokens='numbers' needs the token set (token_ids)")
      idx = jnp.asarray(token_ids, jnp.int32)
    log_p, log_q = restricted_log_probs(teacher, idx), restricted_log_probs(student, idx)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return kl * (temperature ** 2)
