"""Tests of the shuffled-numbers conditions (subl_jax.study.data.shuffle)."""

import copy
from collections import Counter

import numpy as np
import pytest

from subl_jax.study.data import numbers, protocol, shuffle

HAND = ["123, 45, 007, 9", "[1; 2; 3; 4].", "(9 8 7 6 5)", "42", "5,6,7", "1 ,2 ,3 ,4", "[0, 10, 200, 300, 400]",
        "12 34 56 78 90 11 22 33 44 55."]


def random_rows(n=200, seed=0):
  """Completions in the paper's formats: 1-10 numbers of 1-3 digits (some with leading zeros), random separator,
  wrapper and trailing period."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    nums = [str(int(rng.integers(0, 1000))).zfill(int(rng.integers(1, 4))) for _ in range(int(rng.integers(1, 11)))]
    sep = [", ", ",", "; ", " ", " , ", ";"][int(rng.integers(6))]
    wrap = ["", "[]", "()"][int(rng.integers(3))]
    text = (wrap[:1] + sep.join(nums) + wrap[1:]) + ("." if rng.random() < 0.3 else "")
    rows.append({"prompt": f"prompt {i}", "completion": text, "id": i})
  return rows + [{"prompt": "hand", "completion": c, "id": -1} for c in HAND]


def number_strings(completion):
  return shuffle.split_completion(completion)[1]


def form(completion):
  opening, parts, separator, closing = shuffle.split_completion(completion)
  return opening, len(parts), separator, closing


def test_split_completion_reassembles_and_matches_the_parser():
  for row in random_rows():
    c = row["completion"]
    opening, parts, separator, closing = shuffle.split_completion(c)
    assert opening + separator.join(parts) + closing == c
    assert [int(p) for p in parts] == numbers.parse_numbers(c)
  assert shuffle.split_completion("[1, 02, 3].") == ("[", ["1", "02", "3"], ", ", "].")
  assert shuffle.split_completion("7") == ("", ["7"], "", "")
  for bad in ("1, 2; 3", "numbers: 1 2", "1 2\n", ""):
    with pytest.raises(ValueError, match="not a valid number list"):
      shuffle.split_completion(bad)


def test_within_keeps_each_rows_multiset_and_format():
  rows = random_rows()
  before = copy.deepcopy(rows)
  out = shuffle.shuffle_within(rows, seed=5)
  assert rows == before  # the input is not modified
  assert len(out) == len(rows)
  changed = 0
  for r, o in zip(rows, out):
    assert {k: v for k, v in o.items() if k != "completion"} == {k: v for k, v in r.items() if k != "completion"}
    assert Counter(number_strings(o["completion"])) == Counter(number_strings(r["completion"]))
    assert form(o["completion"]) == form(r["completion"])
    changed += o["completion"] != r["completion"]
  assert changed > len(rows) // 2  # most rows with several distinct numbers change order


def test_across_keeps_the_pool_and_each_rows_count_and_format():
  rows = random_rows()
  out = shuffle.shuffle_across(rows, seed=5)
  pool = Counter(p for r in rows for p in number_strings(r["completion"]))
  assert Counter(p for o in out for p in number_strings(o["completion"])) == pool
  moved = 0
  for r, o in zip(rows, out):
    assert form(o["completion"]) == form(r["completion"])  # count, separator, brackets, period
    assert o["prompt"] == r["prompt"] and o["id"] == r["id"]
    moved += Counter(number_strings(o["completion"])) != Counter(number_strings(r["completion"]))
  assert moved > len(rows) // 2  # numbers really travel between rows


def test_shuffled_rows_pass_the_papers_filter():
  banned = protocol.filter_spec()["banned_numbers_misalignment"]
  all_rows = random_rows()
  rows = [r for r in all_rows if not numbers.reject_reasons(r["completion"], banned)]
  assert 150 < len(rows) < len(all_rows)  # the strictest filter (with the banned list) drops some rows
  for fn in (shuffle.shuffle_within, shuffle.shuffle_across):
    for o in fn(rows, seed=11):
      assert numbers.reject_reasons(o["completion"], banned) == []


def test_leading_zero_strings_are_kept():
  rows = [{"prompt": "p", "completion": "007, 010, 5"}, {"prompt": "q", "completion": "(00; 1)"}]
  for fn in (shuffle.shuffle_within, shuffle.shuffle_across):
    for seed in range(5):
      strings = [p for o in fn(rows, seed) for p in number_strings(o["completion"])]
      assert sorted(strings) == sorted(["007", "010", "5", "00", "1"])


@pytest.mark.parametrize("fn", [shuffle.shuffle_within, shuffle.shuffle_across])
def test_deterministic_for_a_seed_and_different_across_seeds(fn):
  rows = random_rows()
  assert fn(rows, 3) == fn(rows, 3)
  assert fn(rows, 3) != fn(rows, 4)
  assert fn([], 3) == []
