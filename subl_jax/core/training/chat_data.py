"""Training examples from JSONL chats: rendered with the model's chat template, loss on assistant tokens only.

A row is `{"prompt": str, "completion": str}` (the paper's format: one user turn, one assistant turn) or
`{"messages": [{"role": ..., "content": ...}, ...]}`. Each assistant turn is a loss segment: its tokens up to and
including the end-of-turn token (e.g. `<|im_end|>`) are targets; everything else (system, user, the template's
`<|im_start|>assistant\n` header) is context only. The context is encoded separately from each completion — the way a
sampled completion continues its prompt's token ids — so the trained token boundaries are the ones generation sees.

A sequence longer than `max_len` tokens is dropped, never cut mid-answer, and the number dropped is reported. A
row whose text is too many bytes to fit in `max_len` tokens even if every token were the vocabulary's longest
(`max_token_bytes`) is dropped without being tokenized: tokenizing a 10 MB row only to drop it takes a minute.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import weakref
from typing import Any, Iterable, Sequence

import numpy as np
import tokenizers

from subl_jax.core.checkpoints.tokenizer import Tokenizer

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
  n_too_long_untokenized: int = 0  # of those, rows whose too-long text was never tokenized (its bytes alone prove it)
  drop: list[np.ndarray] | None = None  # per example, 0/1 over its loss targets: 1 = left out of the loss
                                        # (divergence masking, `divergence.dataset_masks`; `MaskPositions` reads it)

  def __len__(self) -> int:
    return len(self.examples)

  def summary(self) -> dict[str, Any]:
    lengths = [len(e.tokens) for e in self.examples]
    out = dict(rows=self.n_rows, examples=len(self.examples), dropped_too_long=self.n_too_long,
               dropped_too_long_untokenized=self.n_too_long_untokenized,
               tokens=int(sum(lengths)), loss_tokens=int(sum(e.n_targets for e in self.examples)),
               max_tokens=int(max(lengths, default=0)), mean_tokens=float(np.mean(lengths)) if lengths else 0.0)
    if self.drop is not None:
      out["masked_loss_tokens"] = int(sum(int(d.sum()) for d in self.drop))
    return out


class Chats(list):
  """A list of chats that remembers where it was read from (`source`: a file, or what `rows_to_chats` was told), so
  that `build` can name it when no example is left."""

  def __init__(self, chats: Iterable[list[dict[str, str]]] = (), source: str = ""):
    super().__init__(chats)
    self.source = source


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


def read_jsonl(path: str | pathlib.Path) -> Chats:
  """Every row of a JSONL file as a list of messages; a malformed line (not UTF-8, not JSON, not a row) fails with
  its file and line number, and so does a file without any row."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such JSONL file")
  chats = Chats(source=str(path))
  # Read as bytes and decode line by line: a text-mode file decodes ahead in chunks, so a bad byte would surface as
  # a UnicodeDecodeError without a line number. JSON Lines separates rows by "\n" (a "\r" before it is whitespace).
  with path.open("rb") as f:
    for n, raw in enumerate(f, 1):
      where = f"{path}:{n}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line: "
                         f"{e.reason}); expected UTF-8 JSON, one object per line") from None
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
      chats.append(_check_row(row, where))
  if not chats:
    what = "an empty file" if path.stat().st_size == 0 else "only blank lines"
    raise ValueError(f"{path}: no rows ({what}); expected one JSON object per line, "
                     '{"prompt", "completion"} or {"messages": [...]}')
  return chats


def rows_to_chats(rows: Iterable[dict[str, Any]], origin: str = "rows") -> Chats:
  """In-memory rows (same formats as the JSONL) as lists of messages."""
  return Chats((_check_row(r, f"{origin}[{i}]") for i, r in enumerate(rows)), source=origin)


def with_system(messages: Sequence[dict[str, str]], system: str) -> list[dict[str, str]]:
  """The chat with `system` as its system prompt ('' leaves it unchanged; an existing system turn is kept)."""
  if not system or (messages and messages[0]["role"] == "system"):
    return list(messages)
  return [{"role": "system", "content": system}] + list(messages)


# Pre-tokenizers that only split (or respell: ByteLevel, Metaspace) their input, never drop any of it: with them
# every byte of the (normalized) text is covered by some token.
_KEEPING_PRE_TOKENIZERS = ("ByteLevel", "Digits", "Metaspace", "Split", "Punctuation", "UnicodeScripts")


def _pre_tokenizer_keeps_text(spec: dict | None) -> bool:
  if spec is None:
    return True
  if spec.get("type") == "Sequence":
    return all(_pre_tokenizer_keeps_text(p) for p in spec.get("pretokenizers", []))
  return spec.get("type") in _KEEPING_PRE_TOKENIZERS and spec.get("behavior") != "Removed"


def _pre_tokenizer_is_byte_level(spec: dict | None) -> bool:
  if spec is None:
    return False
  if spec.get("type") == "Sequence":
    return any(_pre_tokenizer_is_byte_level(p) for p in spec.get("pretokenizers", []))
  return spec.get("type") == "ByteLevel"


@dataclasses.dataclass(frozen=True)
class _LengthBound:
  """What `min_tokens` needs of a tokenizer, computed once per tokenizer (scanning the vocabulary takes ~0.1 s)."""
  max_token_bytes: int | None
  normalizer: Any          # the backend's normalizer, or None
  stop_texts: tuple[str, ...]


_BOUNDS: "weakref.WeakKeyDictionary[Any, _LengthBound]" = weakref.WeakKeyDictionary()


def _compute_max_token_bytes(tokenizer: Tokenizer) -> int | None:
  backend = getattr(tokenizer, "backend", None)
  if not isinstance(backend, tokenizers.Tokenizer):
    return None
  spec = json.loads(backend.to_str())
  model = spec.get("model") or {}
  # WordPiece, Unigram and WordLevel can turn an unknown word of any length into one token; so can BPE's fuse_unk
  # (a run of unknown characters), truncation cuts tokens off, and some pre-tokenizers drop text (e.g. Whitespace).
  if model.get("type") != "BPE" or (model.get("unk_token") is not None and model.get("fuse_unk")):
    return None
  if spec.get("truncation") is not None or not _pre_tokenizer_keeps_text(spec.get("pre_tokenizer")):
    return None
  byte_level = _pre_tokenizer_is_byte_level(spec.get("pre_tokenizer"))
  added = {t.content for t in backend.get_added_tokens_decoder().values()}
  # An unknown character (BPE with unk_token, no byte fallback) becomes one token of at most 4 UTF-8 bytes.
  longest = 4 if model.get("unk_token") is not None else 1
  for token in backend.get_vocab(with_added_tokens=True):
    if byte_level and token not in added:
      # Spelled in GPT-2's byte alphabet: one character per byte of text.
      n = len(token)
    else:
      # Added tokens match their text as is; other vocabularies are spelled in the (normalized, pre-tokenized) text,
      # which is at least as many bytes as the text it came from (Metaspace's "▁" is 3 bytes for a 1-byte space, a
      # byte-fallback "<0x41>" 6 for 1).
      n = len(token.encode("utf-8"))
    longest = max(longest, n)
  return longest


def max_token_bytes(tokenizer: Tokenizer) -> int | None:
  """The most bytes of (normalized) text one token of `tokenizer` can stand for — so a text of N bytes encodes to at
  least N / max_token_bytes tokens — or None where no such bound holds (not a BPE vocabulary, unknown-token fusing,
  truncation, a pre-tokenizer that drops text). SmolLM2: 81 (a newline and 80 spaces). Computed once per tokenizer."""
  return _bound(tokenizer).max_token_bytes


def _bound(tokenizer: Tokenizer) -> _LengthBound:
  try:
    return _BOUNDS[tokenizer]
  except KeyError:
    pass
  backend = getattr(tokenizer, "backend", None)
  bound = _LengthBound(
      max_token_bytes=_compute_max_token_bytes(tokenizer),
      normalizer=getattr(backend, "normalizer", None),
      stop_texts=tuple(t for t in (tokenizer.decode([i], skip_special_tokens=False) for i in tokenizer.stop_ids) if t))
  _BOUNDS[tokenizer] = bound
  return bound


def min_tokens(tokenizer: Tokenizer, text: str) -> int:
  """A lower bound on `len(tokenizer.encode(text))`, found without tokenizing: ceil(bytes / max_token_bytes) of the
  text as the tokenizer normalizes it (e.g. Qwen's NFC, which can shorten text); 0 where there is no such bound."""
  bound = _bound(tokenizer)
  if bound.max_token_bytes is None:
    return 0
  n = len(text.encode("utf-8"))
  if bound.normalizer is not None:
    n = min(n, len(bound.normalizer.normalize_str(text).encode("utf-8")))
  return math.ceil(n / bound.max_token_bytes)


def _cannot_fit(tokenizer: Tokenizer, text: str, budget: int) -> bool:
  """Whether `text` provably encodes to more than `budget` tokens (`min_tokens`). The raw byte count decides first:
  normalizing a long text costs time, and only a text whose raw bytes could exceed the budget needs it."""
  longest = _bound(tokenizer).max_token_bytes
  if longest is None or math.ceil(len(text.encode("utf-8")) / longest) <= budget:
    return False
  return min_tokens(tokenizer, text) > budget


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, str]],
                max_len: int | None = None) -> Example | None:
  """Tokens and loss mask of a chat: every assistant turn's tokens through its end-of-turn token are targets.

  With `max_len`, returns None as soon as the tokens so far plus a lower bound on the next piece's tokens
  (`min_tokens`) exceed `max_len`: that piece is never tokenized. A sequence that is only found to be too long once
  encoded is still returned (the caller compares its length)."""
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
    if max_len is not None and _cannot_fit(tokenizer, prefix[len(text):], max_len - len(tokens)):
      return None
    context = tokenizer.encode(prefix[len(text):])
    if max_len is not None:
      # Only the answer's tokens through its first end-of-turn token are kept: bound the text before it.
      answer_text = full[len(prefix):]
      cut = min((j for j in (answer_text.find(t) for t in _bound(tokenizer).stop_texts) if j >= 0), default=0)
      if _cannot_fit(tokenizer, answer_text[:cut], max_len - len(tokens) - len(context)):
        return None
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
          teacher_system: str | None = None, origin: str | None = None) -> ChatDataset:
  """Encodes chats (with `system` as the student's system prompt); with `teacher_system` given, also the teacher's
  view of each chat (its own system prompt, the same completion tokens). A chat whose student or teacher sequence
  exceeds `max_len` tokens is dropped and counted; one that provably cannot fit (`encode_chat`'s `max_len`) is
  dropped without tokenizing it. No example left is an error naming `origin` (default: `chats.source`, which
  `read_jsonl` and `rows_to_chats` set)."""
  origin = origin or getattr(chats, "source", "") or "chats"
  ds = ChatDataset([], [] if teacher_system is not None else None, n_rows=len(chats))
  for chat in chats:
    student = encode_chat(tokenizer, with_system(chat, system), max_len)
    teacher = None
    if student is not None and teacher_system is not None:
      teacher = encode_chat(tokenizer, with_system(chat, teacher_system), max_len)
      if teacher is not None and not np.array_equal(student.tokens[student.mask == 1],
                                                    teacher.tokens[teacher.mask == 1]):
        raise ValueError(f"{origin}: the teacher's and the student's completion tokens differ for chat {chat!r}")
    if student is None or (teacher_system is not None and teacher is None):
      ds.n_too_long += 1
      ds.n_too_long_untokenized += 1
      continue
    if len(student.tokens) > max_len or (teacher is not None and len(teacher.tokens) > max_len):
      ds.n_too_long += 1
      continue
    ds.examples.append(student)
    if teacher is not None:
      ds.teacher.append(teacher)
  if not ds.examples:
    if not ds.n_rows:
      raise ValueError(f"{origin}: no training examples: no rows")
    raise ValueError(f"{origin}: no training examples left: all {ds.n_rows} rows were dropped, {ds.n_too_long} "
                     f"longer than max_len={max_len} tokens (of which {ds.n_too_long_untokenized} too many bytes to "
                     f"fit, not tokenized); raise train.max_len or shorten the rows")
  return ds
