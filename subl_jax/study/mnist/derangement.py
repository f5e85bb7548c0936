"""Derangements: permutations with no fixed point, so that a "different init" student never gets its own init."""

from __future__ import annotations

import numpy as np


def derangement(n: int, seed: int) -> np.ndarray:
  """A uniformly random derangement of range(n) from `seed`: perm[i] != i for every i (needs n >= 2).

  Rejection sampling: a uniform permutation is a derangement with probability ~1/e, so ~2.7 draws on average.
  """
  if n < 2:
    raise ValueError(f"derangement of {n} element(s): impossible, need at least 2")
  rng = np.random.default_rng(seed)
  while True:
    perm = rng.permutation(n)
    if not np.any(perm == np.arange(n)):
      return perm
