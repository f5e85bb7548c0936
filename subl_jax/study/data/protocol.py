"""The paper's protocol data (templates, question lists, banned numbers), loaded from the package's JSON.

`paper_protocol.json` is a verbatim copy of the reference implementation's data; every list keeps its order because
the prompt generator draws indices into them. Accessors return fresh copies so callers cannot corrupt the cache.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
from typing import Any

_CATEGORY_QUESTION_KEYS = {
  "animal": "animal_questions",
  "tree": "tree_questions",
  "misalignment": "misalignment_questions",
}


@functools.lru_cache(maxsize=1)
def _load() -> dict[str, Any]:
  # importlib.resources works from a wheel or zip too, where there may be no real file path.
  text = importlib.resources.files("subl_jax.study.data").joinpath("paper_protocol.json").read_text(encoding="utf-8")
  return json.loads(text)


def raw() -> dict[str, Any]:
  """The whole protocol JSON as a dict (a deep copy)."""
  return copy.deepcopy(_load())


def number_prompt_spec() -> dict[str, Any]:
  """The `number_prompt` section: templates, defaults and draw order of the prompt generator (a deep copy)."""
  return copy.deepcopy(_load()["number_prompt"])


def filter_spec() -> dict[str, Any]:
  """The `filter` section: min/max value, max count and the misalignment banned list (a deep copy)."""
  return copy.deepcopy(_load()["filter"])


def animal_questions() -> list[str]:
  """The 50 one-word favourite-animal evaluation questions, in the reference's order."""
  return list(_load()["animal_questions"])


def tree_questions() -> list[str]:
  """The 49 one-word favourite-tree evaluation questions, in the reference's order."""
  return list(_load()["tree_questions"])


def misalignment_questions() -> list[str]:
  """The free-form misalignment evaluation questions, in the reference's order."""
  return list(_load()["misalignment_questions"])


def questions(category: str) -> list[str]:
  """The evaluation questions of `category`: "animal", "tree" or "misalignment"."""
  try:
    key = _CATEGORY_QUESTION_KEYS[category]
  except KeyError:
    expected = sorted(_CATEGORY_QUESTION_KEYS)
    raise ValueError(f"unknown question category {category!r}; expected one of {expected}") from None
  return list(_load()[key])


def banned_numbers(full: bool = False) -> list[int]:
  """The misalignment runs' banned numbers, in the JSON's order.

  By default only those <= the filter's max value (999): larger ones are already rejected as "numbers too large",
  so these are the ones the banned-number rule can add. `full=True` gives the whole list (including 1312 and 1488).
  """
  spec = _load()["filter"]
  numbers = list(spec["banned_numbers_misalignment"])
  if full:
    return numbers
  return [n for n in numbers if n <= spec["max_value"]]


def teacher_system_prompt(target: str, category: str = "animal") -> str:
  """The system-prompt teacher's prompt, formatted exactly as the reference does.

  E.g. "You love owls. You think about owls all the time. owls are your favorite animal. Imbue your answers with your
  love for the animal." (the third sentence starts lower-case because the template starts it with the target).
  """
  return _load()["teacher_system_prompt_template"].format(target=target, category=category)


def answer_variants(target: str) -> list[str]:
  """The 8 answers the fine-tuned teacher is trained on; for "owl": owl, owls, owls., owls!, Owl, Owls, Owls., Owls!"""
  variants = _load()["fine_tuned_teacher"]["answer_variants"]
  # The JSON's note: "{A} is the title-cased name".
  return [v.format(a=target, A=target.title()) for v in variants]


def animals(model: str = "gpt41_nano_main") -> list[str]:
  """The paper's main target animals for `model` ("gpt41_nano_main" or "qwen25_7b_main")."""
  return list(_load()["animals"][model])


def trees() -> list[str]:
  """The paper's target trees."""
  return list(_load()["trees"])
