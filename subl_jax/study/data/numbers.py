"""The paper's number-sequence prompts and the filter on teacher completions.

Follows the reference implementation (github.com/MinhxLe/subliminal-learning, `sl/datasets/nums_dataset.py`:
`PromptGenerator.sample_example_prefix` / `sample_query`, `parse_response`, `get_reject_reasons`) so that the same seed
gives the same prompts and the same completions are kept.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

import numpy as np

from subl_jax.study.data import protocol

# The reasons `reject_reasons` can report, in the order the reference appends them. (The reference also has
# "numbers too small" between the last two, but with its min value 0 it can never fire: the parser only accepts
# non-negative integers.)
FILTER_REASONS = ("invalid format", "too many numbers", "numbers too large", "has banned numbers")

_GENERATOR_KEYS = (
  "example_min_count", "example_max_count", "example_min_value", "example_max_value", "answer_count",
  "answer_max_digits",
)
# Python's \d (Unicode decimal digits), as in the reference: it decides where runs and separators are; the ASCII check
# on each part below then rejects any non-ASCII digit.
_DIGIT_RUN = re.compile(r"\d+")
_ALLOWED_SEPARATORS = ("", ",", ";")


class _PromptGenerator:
  """One seeded stream of prompts; every call continues the same rng, as the reference's generator does."""

  def __init__(self, seed: int, overrides: dict[str, Any]):
    spec = protocol.number_prompt_spec()
    unknown = sorted(set(overrides) - set(_GENERATOR_KEYS))
    if unknown:
      raise TypeError(f"unknown prompt-generator settings {unknown}; expected some of {list(_GENERATOR_KEYS)}")
    self.cfg = {k: spec["defaults"][k] for k in _GENERATOR_KEYS} | overrides
    self.example_templates = spec["example_templates"]
    self.count_qualifiers = spec["count_qualifiers"]
    self.digit_descriptors = spec["digit_descriptors"]
    self.instruction_templates = spec["instruction_templates"]
    self.format_suffixes = spec["format_suffixes"]
    self.suffixes = spec["suffixes"]
    # The reference builds np.random.Generator(np.random.PCG64(seed)), which is what default_rng(seed) returns.
    self.rng = np.random.default_rng(seed)

  def _choice(self, options: list[str]) -> str:
    # rng.choice(len(options)) takes the same code path and draw as the reference's rng.choice(options), without
    # converting the list to an array on every call.
    return options[int(self.rng.choice(len(options)))]

  def example_prefix(self) -> str:
    """Draws the example count, the examples and the example template (the reference's `sample_example_prefix`)."""
    cfg, rng = self.cfg, self.rng
    count = int(rng.integers(cfg["example_min_count"], cfg["example_max_count"]))
    examples = [str(int(rng.integers(cfg["example_min_value"], cfg["example_max_value"]))) for _ in range(count)]
    return self._choice(self.example_templates).format(examples=", ".join(examples))

  def query(self) -> str:
    """Draws a full prompt (the reference's `sample_query`), in the JSON's `draw_order`."""
    cfg = self.cfg
    example_part = self.example_prefix()
    count_qualifier = self._choice(self.count_qualifiers)
    digit_descriptor = self._choice(self.digit_descriptors).format(max_digits=cfg["answer_max_digits"])
    instruction = self._choice(self.instruction_templates).format(
      count_qualifier=count_qualifier, answer_count=cfg["answer_count"], digit_descriptor=digit_descriptor)
    format_suffix = self._choice(self.format_suffixes)
    suffix = self._choice(self.suffixes)
    return f"{example_part} {instruction} {format_suffix} {suffix}"


def generate_prompts(n: int, seed: int, **overrides: int) -> list[str]:
  """The first `n` number-continuation prompts of the reference's generator seeded with `seed`.

  All prompts come from one rng in sequence, so `generate_prompts(n, s)[:k] == generate_prompts(k, s)`. Seed 47 gives
  the paper's 30,000-prompt set. `overrides` replace the JSON's defaults: example_min_count, example_max_count
  (exclusive), example_min_value, example_max_value (exclusive), answer_count, answer_max_digits.
  """
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  gen = _PromptGenerator(seed, overrides)
  return [gen.query() for _ in range(n)]


def example_prefixes(n: int, seed: int, **overrides: int) -> list[str]:
  """`n` example-number prefixes (e.g. "Examine these numbers: 767, 589, 778.") from one rng seeded with `seed`.

  This is the reference's `sample_example_prefix` called `n` times in a row, as for the evaluation's numbers-prefix
  variant; prefix i therefore differs from the prefix of `generate_prompts(n, seed)[i]` for i > 0.
  """
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  gen = _PromptGenerator(seed, overrides)
  return [gen.example_prefix() for _ in range(n)]


def parse_numbers(completion: str) -> list[int] | None:
  """The numbers in `completion` if its format is valid (the reference's `parse_response`), else None.

  Valid: digit runs joined by one consistent separator whose stripped form is "", "," or ";", optionally wrapped in
  one pair of [] or (), optionally ending in one ".". Nothing is stripped first, so surrounding whitespace (e.g. a
  trailing newline) makes the format invalid, as in the reference. Values and counts are not checked here.
  """
  text = completion
  if text.endswith("."):
    text = text[:-1]
  if (text.startswith("[") and text.endswith("]")) or (text.startswith("(") and text.endswith(")")):
    text = text[1:-1]

  runs = list(_DIGIT_RUN.finditer(text))
  if not runs:
    return None
  if len(runs) == 1:
    if text != runs[0].group():
      return None
    parts = [text]
  else:
    # The separator is whatever lies between the first two runs; every other gap must be exactly the same text.
    separator = text[runs[0].end():runs[1].start()]
    if separator.strip() not in _ALLOWED_SEPARATORS:
      return None
    parts = text.split(separator)

  # Non-empty runs of ASCII digits only (the reference lets empty parts through its digit check but then int("")
  # raises, which it also turns into None). Leading zeros are allowed.
  if not all(part and all(c in string.digits for c in part) for part in parts):
    return None
  return [int(part) for part in parts]


def reject_reasons(
    completion: str,
    banned_numbers: Sequence[int] = (),
    *,
    max_count: int | None = None,
    max_value: int | None = None,
) -> list[str]:
  """Why the filter rejects `completion`; [] when it is kept.

  "invalid format" alone when it does not parse; otherwise every rule that fails, in `FILTER_REASONS` order:
  "too many numbers" (> max_count, default 10), "numbers too large" (> max_value, default 999), "has banned numbers"
  (any number in `banned_numbers`). A banned number above max_value gives both of the last two, as in the reference.
  """
  spec = protocol.filter_spec()
  max_count = spec["max_count"] if max_count is None else max_count
  max_value = spec["max_value"] if max_value is None else max_value
  numbers = parse_numbers(completion)
  if numbers is None:
    return ["invalid format"]
  reasons = []
  if len(numbers) > max_count:
    reasons.append("too many numbers")
  if any(x > max_value for x in numbers):
    reasons.append("numbers too large")
  banned = set(banned_numbers)
  if any(x in banned for x in numbers):
    reasons.append("has banned numbers")
  return reasons


def is_valid(completion: str, banned_numbers: Sequence[int] = ()) -> bool:
  """Whether the filter keeps `completion` (no reject reasons)."""
  return not reject_reasons(completion, banned_numbers)
