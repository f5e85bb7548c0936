"""The vocabulary's "number-format" tokens: text made only of ASCII digits and the separators `,` `;` and whitespace,
plus the tokens that end a turn.

One set for two users: restricted-set logit distillation (the student matches the teacher's distribution renormalised
over these tokens — the language-model analogue of the MNIST auxiliary logits) and format-constrained decoding (a
mask that only lets a model write numbers).
"""

from __future__ import annotations

import numpy as np

from subl_jax.core.checkpoints.tokenizer import Tokenizer

_ALLOWED = frozenset("0123456789,; \t\n\r")


def is_number_text(text: str) -> bool:
  """True for a non-empty string of ASCII digits, ',', ';' and whitespace only."""
  return bool(text) and set(text) <= _ALLOWED


def number_token_ids(tokenizer: Tokenizer, include_stop: bool = True) -> np.ndarray:
  """Sorted int32 ids of every token whose own text is number-format, plus the stop ids when `include_stop`."""
  ids = {i for i, text in enumerate(tokenizer.token_strings()) if is_number_text(text)}
  special = set(tokenizer.special_ids())
  ids -= special  # a special token's text is its name, never a number; keep only the stop ids below
  if include_stop:
    ids |= set(tokenizer.stop_ids)
  return np.asarray(sorted(ids), np.int32)


def number_token_mask(tokenizer: Tokenizer, vocab_size: int, include_stop: bool = True) -> np.ndarray:
  """A bool [vocab_size] mask of `number_token_ids` (rows past the tokenizer's vocabulary are False)."""
  mask = np.zeros(vocab_size, bool)
  mask[number_token_ids(tokenizer, include_stop)] = True
  return mask
