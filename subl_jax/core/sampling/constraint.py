"""Format-constrained decoding: a finite automaton over a small token universe that decides, per row and step, which
tokens may come next.

Two constraints, both built from the tokenizer's vocabulary (any byte-level BPE):
  * `token_constraint`: one state; any number-format token (digits, `,` `;` whitespace — see
    `subl_jax.core.number_tokens`) or end-of-turn, in any order. Weak models still mix separators or write 4-digit
    numbers, which the filter rejects.
  * `format_constraint`: the paper's filter as an automaton — 1..max_digits digits per number, one separator from
    SEPARATORS used consistently, at most max_numbers numbers, end-of-turn only right after a digit. A token is
    also refused when the tokens left before `max_new_tokens` could not finish the list from where it leads, so
    whatever is drawn passes the filter, even when a row is cut at the cap.
The automaton runs over each token's text character by character, so multi-character tokens (" ,", "\\n\\n", "12")
are handled for any vocabulary. Sampling renormalises over the allowed tokens; the log-probabilities recorded stay
the model's own (see `draw`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from subl_jax.core.checkpoints.tokenizer import Tokenizer
from subl_jax.core import number_tokens

SEPARATORS = (", ", ",", " ", "; ", ";", "\n")  # each passes the filter's rule: strip() is "", "," or ";"
_DIGITS = frozenset("0123456789")


class Constraint(NamedTuple):
  """A token automaton: `table[state, j]` is the next state after token `universe[j]`, or -1 where not allowed."""
  universe: jax.Array | np.ndarray  # [U] int32 token ids that can ever be allowed
  index: jax.Array | np.ndarray     # [vocab] int32: position of a token in `universe`, -1 if absent
  table: jax.Array | np.ndarray     # [states, U] int32; state 0 is the start
  to_end: jax.Array | np.ndarray    # [states] int32: fewest tokens from the state to one where a row may end


def allowed_mask(constraint: Constraint, state_b: jax.Array, vocab: int, tokens_left: jax.Array) -> jax.Array:
  """bool [b, vocab]: the tokens each row may draw in its automaton state, with `tokens_left` (this one included)."""
  nxt = constraint.table[state_b]
  allowed_bu = (nxt >= 0) & (constraint.to_end[jnp.maximum(nxt, 0)] < tokens_left)
  return jnp.zeros((state_b.shape[0], vocab), bool).at[:, constraint.universe].set(allowed_bu)


def advance(constraint: Constraint, state_b: jax.Array, token_b: jax.Array) -> jax.Array:
  """Each row's next automaton state after drawing `token_b` (an allowed token)."""
  j = jnp.maximum(constraint.index[token_b], 0)
  return jnp.maximum(jnp.take_along_axis(constraint.table[state_b], j[:, None], axis=1)[:, 0], 0)


def _build(tokenizer: Tokenizer, vocab: int, step, accepting, start) -> Constraint:
  """Tabulates a character automaton (`step(state, ch)` -> state or None) over the number-format tokens."""
  universe = number_tokens.number_token_ids(tokenizer, include_stop=True)
  texts = tokenizer.token_strings()
  stops = set(tokenizer.stop_ids)
  states, table = [start], []
  seen = {start: 0}
  i = 0
  while i < len(states):  # breadth-first over the states reachable by whole tokens
    row = []
    for t in universe.tolist():
      if t in stops:
        nxt = "done" if accepting(states[i]) else None
      else:
        nxt = states[i]
        for ch in texts[t]:
          nxt = step(nxt, ch)
          if nxt is None:
            break
      if nxt is not None and nxt not in seen:
        seen[nxt] = len(states)
        states.append(nxt)
      row.append(-1 if nxt is None else seen[nxt])
    table.append(row)
    i += 1
  index = np.full(vocab, -1, np.int32)
  index[universe] = np.arange(len(universe), dtype=np.int32)
  table = np.asarray(table, np.int32)
  # Fewest tokens to a state where a row may end (Bellman-Ford over the token graph; "done" itself is an end).
  big = np.iinfo(np.int32).max // 2
  to_end = np.asarray([0 if s == "done" or accepting(s) else big for s in states], np.int64)
  while True:
    via = np.where(table >= 0, to_end[np.maximum(table, 0)] + 1, big).min(axis=1)
    nxt = np.minimum(to_end, via)
    if (nxt == to_end).all():
      break
    to_end = nxt
  return Constraint(universe.astype(np.int32), index, table, to_end.astype(np.int32))


def token_constraint(tokenizer: Tokenizer, vocab: int) -> Constraint:
  """Any number-format token or end-of-turn, in any order."""
  return _build(tokenizer, vocab, step=lambda s, ch: s, accepting=lambda s: True, start="any")


def format_constraint(tokenizer: Tokenizer, vocab: int, max_numbers: int = 10, max_digits: int = 3,
                      separators: tuple[str, ...] = SEPARATORS) -> Constraint:
  """Only completions the paper's filter keeps: `max_numbers` numbers of at most `max_digits` digits, joined by one
  consistent separator, then end-of-turn."""
  def is_prefix(typed: str, chosen: str | None) -> bool:
    return any(s.startswith(typed) for s in separators) if chosen is None else chosen.startswith(typed)

  # States: ("start",); ("num", numbers before this one, digits so far, separator or None);
  # ("sep", numbers so far, separator or None, separator text typed so far).
  def step(state, ch):
    kind = state[0]
    if kind == "start":
      return ("num", 0, 1, None) if ch in _DIGITS else None
    if kind == "num":
      _, before, digits, chosen = state
      if ch in _DIGITS:
        return ("num", before, digits + 1, chosen) if digits < max_digits else None
      if before + 1 < max_numbers and is_prefix(ch, chosen):
        return ("sep", before + 1, chosen, ch)
      return None
    if kind == "sep":
      _, count, chosen, typed = state
      if ch in _DIGITS:
        complete = typed in separators and (chosen is None or typed == chosen)
        return ("num", count, 1, typed) if complete else None
      return ("sep", count, chosen, typed + ch) if is_prefix(typed + ch, chosen) else None
    return None

  return _build(tokenizer, vocab, step, accepting=lambda s: s[0] == "num", start=("start",))
