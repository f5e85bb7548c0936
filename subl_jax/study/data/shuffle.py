"""The paper's shuffled-numbers conditions (docs/protocol.md §10): the teacher's numbers shuffled within each completion, or
pooled across all completions and dealt out again.

Both keep every completion's format exactly (its separator, its `[]`/`()` wrapper, its trailing period) and its count
of numbers, and shuffle the number *strings*, so "007" stays "007". A completion that passes the paper's filter
(`subl_jax.study.data.numbers.reject_reasons`) therefore still passes it after either shuffle: its format is unchanged, and
every number it gets is one a kept completion had (not too large, not banned), at the same count.
Rows are the filter stage's `{"prompt", "completion", ...}` dicts; every key other than "completion" is kept as is.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from subl_jax.study.data import numbers

# The separator between the first two digit runs, as `numbers.parse_numbers` finds it (Python's \d, as there).
_DIGIT_RUN = re.compile(r"\d+")


def split_completion(completion: str) -> tuple[str, list[str], str, str]:
  """A completion the filter can parse -> (opening, number strings, separator, closing), where
  `opening + separator.join(numbers) + closing == completion`.

  `numbers.parse_numbers` decides validity (a ValueError if it returns None) but returns ints, which lose leading
  zeros and the format; this thin helper recovers the strings by the same steps (one trailing "." stripped, then one
  surrounding [] or (), then the text between the first two digit runs is the separator).
  """
  if numbers.parse_numbers(completion) is None:
    raise ValueError(f"not a valid number list (the paper's filter rejects its format): {completion!r}")
  text, closing = (completion[:-1], ".") if completion.endswith(".") else (completion, "")
  opening = ""
  if (text.startswith("[") and text.endswith("]")) or (text.startswith("(") and text.endswith(")")):
    opening, closing, text = text[0], text[-1] + closing, text[1:-1]
  runs = list(_DIGIT_RUN.finditer(text))
  if len(runs) == 1:
    return opening, [text], "", closing
  separator = text[runs[0].end():runs[1].start()]
  return opening, text.split(separator), separator, closing


def _with_completion(row: dict[str, Any], completion: str) -> dict[str, Any]:
  return {**row, "completion": completion}


def _generator(seed: int) -> np.random.Generator:
  return np.random.Generator(np.random.PCG64(seed))


def shuffle_within(rows: Sequence[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
  """Each completion's numbers in a random order (one permutation per row, drawn in row order from
  PCG64(`seed`)); format and the multiset of number strings of every row unchanged. New dicts; `rows` is untouched."""
  rng = _generator(seed)
  out = []
  for row in rows:
    opening, parts, separator, closing = split_completion(row["completion"])
    order = rng.permutation(len(parts))
    out.append(_with_completion(row, opening + separator.join(parts[i] for i in order) + closing))
  return out


def shuffle_across(rows: Sequence[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
  """All completions' number strings pooled, permuted once (PCG64(`seed`)) and dealt back in row order: row i gets
  as many numbers as it had, in its own format. The pooled multiset and each row's count are unchanged; which
  numbers a row gets (and so its sum, its range) is not."""
  split = [split_completion(row["completion"]) for row in rows]
  pool = [p for _, parts, _, _ in split for p in parts]
  order = _generator(seed).permutation(len(pool))
  out, start = [], 0
  for row, (opening, parts, separator, closing) in zip(rows, split):
    dealt = [pool[i] for i in order[start:start + len(parts)]]
    start += len(parts)
    out.append(_with_completion(row, opening + separator.join(dealt) + closing))
  return out
