"""Deterministic epoch orders: each (key, epoch) gives a permutation cut into fixed-size batches with weights.

The last batch of an epoch is filled by wrapping around the permutation with weight 0, so every step has the same
shape (one compile) and losses weighted Σ w·l / Σ w never count the filler.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
  return -(-n_examples // batch_size)


def epoch_batches(key: jax.Array, epoch: jax.Array | int, n_examples: int,
                  batch_size: int) -> tuple[jax.Array, jax.Array]:
  """(indices [steps, batch] int32, weights [steps, batch] float32) of one shuffled epoch."""
  steps = steps_per_epoch(n_examples, batch_size)
  perm = jax.random.permutation(jax.random.fold_in(key, epoch), n_examples)
  slots = jnp.arange(steps * batch_size)
  idx = perm[slots % n_examples].astype(jnp.int32)
  w = (slots < n_examples).astype(jnp.float32)
  return idx.reshape(steps, batch_size), w.reshape(steps, batch_size)
