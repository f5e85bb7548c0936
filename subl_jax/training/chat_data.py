"""Training examples from JSONL chats: rendered with the model's chat template, loss on assistant tokens only.

A row is `{"prompt": str, "completion": str}` (the paper's format: one user turn, one assistant turn) or
`{"messages": [{"role": ..., "content": ...}, ...]}`. Each assistant turn is a loss segment: its tokens up to and
including the end-of-turn token (e.g. `<|im_end|>`) are targets; everything else (system, user, the template's
`<|im_start|>assistant\n` header) is context only. The context is encoded separately from each completion — the way a
sampled completion continues its prompt's token ids — so the trained token boundaries are the ones generation sees.

A sequence longer than `max_len` tokens is dropped, never cut mid-answer, and the number dropped is reported.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Iterable, Sequence

import numpy as np

from subl_jax.checkpoints.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Example:
  """One training sequence: tokens [L] and a 0/1 loss mask [L] (1 where the token is a target)."""
  tokens: np.ndarray
  mask: np.ndarray

  @property
  def n_targets(self) -> int:
    return int(self.mask.sum())


@dataclasses.dataclass
class ChatDataset:
  """Student examples (and, for distillation, the teacher's view of the same completions in its own context)."""
  examples: list[Example]
  teacher: list[Example] | None = None
  n_rows: int = 0          # rows read
  n_too_long: int = 0      # rows dropped because a sequence exceeded max_len

  def __len__(self) -> int:
    return len(self.examples)

  def summary(self) -> dict[str, Any]:
    lengths = [len(e.tokens) for e in self.examples]
    return dict(rows=self.n_rows, examples=len(self.examples), dropped_too_long=self.n_too_long,
                tokens=int(sum(lengths)), loss_tokens=int(sum(e.n_targets for e in self.examples)),
                max_tokens=int(max(lengths, default=0)), mean_tokens=float(np.mean(lengths)) if lengths else 0.0)


def _check_row(row: Any, where: str) -> list[dict[str, str]]:
  """The row's messages, or ValueError naming `where` (file:line)."""
  if not isinstance(row, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
  if "messages" in row:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
      raise ValueError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
      if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
        raise ValueError(f"{where}: messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}, got {m!r}")
    if not any(m["role"] == "assistant" for m in msgs):
      raise ValueError(f"{where}: no assistant message to train on")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]
  if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
    raise ValueError(f"{where}: expected string fields 'prompt' and 'completion' (or a 'messages' list), "
                     f"got keys {sorted(row)}")
  return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]


def read_jsonl(path: str | pathlib.Path) -> list[list[dict[str, str]]]:
  """Every row of a JSONL file as a list of messages; a malformed line fails with its file and line number."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such JSONL file")
  chats = []
  with path.open(encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{n}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
      chats.append(_check_row(row, where))
  return chats


def rows_to_chats(rows: Iterable[dict[str, Any]], origin: str = "rows") -> list[list[dict[str, str]]]:
  """In-memory rows (same formats as the JSONL) as lists of messages."""
  return [_check_row(r, f"{origin}[{i}]") for i, r in enumerate(rows)]


def with_system(messages: Sequence[dict[str, str]], system: str) -> list[dict[str, str]]:
  """The chat with `system` as its system prompt ('' leaves it unchanged; an existing system turn is kept)."""
  if not system or (messages and messages[0]["role"] == "system"):
    return list(messages)
  return [{"role": "system", "content": system}] + list(messages)


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> Example:
  """Tokens and loss mask of a chat: every assistant turn's tokens through its end-of-turn token are targets."""
  stops = set(tokenizer.stop_ids)
  tokens: list[int] = []
  mask: list[int] = []
  text = ""  # the rendered text consumed so far
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    prefix = tokenizer.render_chat(messages[:i], add_generation_prompt=True)
    full = tokenizer.render_chat(messages[:i + 1], add_generation_prompt=False)
    if not prefix.startswith(text) or not full.startswith(prefix):
      raise ValueError("the chat template does not render turns as prefixes of each other; cannot locate the "
                       f"assistant turn {i} of {messages!r}")
    context = tokenizer.encode(prefix[len(text):])
    answer = tokenizer.encode(full[len(prefix):])
    end = next((j for j, t in enumerate(answer) if t in stops), None)
    if end is None:
      raise ValueError(f"assistant turn {i} renders without an end-of-turn token {tokenizer.stop_ids}: "
                       f"{full[len(prefix):]!r}")
    # What follows the end-of-turn token (e.g. "\n") belongs to the next turn's context: the template renders it.
    answer = answer[:end + 1]
    tokens += context + answer
    mask += [0] * len(context) + [1] * len(answer)
    text = prefix + tokenizer.decode(answer, skip_special_tokens=False)
  return Example(np.asarray(tokens, np.int32), np.asarray(mask, np.int8))


def build(tokenizer: Tokenizer, chats: Sequence[Sequence[dict[str, str]]], max_len: int, system: str = "",
          teacher_system: str | None = None) -> ChatDataset:
  """Encodes chats (with `system` as the student's system prompt); with `teacher_system` given, also the teacher's
  view of each chat (its own system prompt, the same completion tokens). A chat whose student or teacher sequence
  exceeds `max_len` tokens is dropped and counted."""
  ds = ChatDataset([], [] if teacher_system is not None else None, n_rows=len(chats))
  for chat in chats:
    student = encode_chat(tokenizer, with_system(chat, system))
    teacher = None
    if teacher_system is not None:
      teacher = encode_chat(tokenizer, with_system(chat, teacher_system))
      if not np.array_equal(student.tokens[student.mask == 1], teacher.tokens[teacher.mask == 1]):
        raise ValueError(f"the teacher's and the student's completion tokens differ for chat {chat!r}")
    if len(student.tokens) > max_len or (teacher is not None and len(teacher.tokens) > max_len):
      ds.n_too_long += 1
      continue
    ds.examples.append(student)
    if teacher is not None:
      ds.teacher.append(teacher)
  if not ds.examples:
    raise ValueError(f"no training examples left ({ds.n_rows} rows, {ds.n_too_long} longer than max_len={max_len})")
  return ds
