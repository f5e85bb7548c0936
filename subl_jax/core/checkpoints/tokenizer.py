"""Tokenizer and chat template of a model, built from a GGUF file or an HF model directory.

A `Tokenizer` wraps a `tokenizers.Tokenizer` (the fast Rust implementation) plus what a chat model needs around it:
the chat template, the special token ids and the ids that end an assistant turn. How a GGUF's tokenizer is rebuilt,
and how it compares with the original and with transformers' conversion, is in `gguf_tokenizer`.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import decoders

from subl_jax.core.checkpoints import chat_template as chat_lib
from subl_jax.core.checkpoints import gguf_tokenizer

PathLike = str | os.PathLike

# The named special tokens transformers passes to a chat template (`SPECIAL_TOKENS_ATTRIBUTES`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Tokens that end an assistant turn or a document, for the chat families we know (ChatML/SmolLM/Qwen, Llama 3,
# Gemma, Phi-3). Any of them that is a special token of the vocabulary stops generation.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<end_of_turn>",
              "<|end|>")

_CONFIG_FILE = "tokenizer_config.json"
_TOKENIZER_FILE = "tokenizer.json"
_SAVE_FORMAT = 1


def _read_json(path: pathlib.Path) -> Any:
  if not path.is_file():
    raise FileNotFoundError(f"{path}: file not found")
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e


def _load_backend(path: pathlib.Path) -> tokenizers.Tokenizer:
  if not path.is_file():
    raise FileNotFoundError(f"{path}: file not found (a fast-tokenizer `tokenizer.json` is required)")
  try:
    return tokenizers.Tokenizer.from_file(str(path))
  except Exception as e:  # the Rust side raises a bare Exception for malformed files
    raise ValueError(f"{path}: not a valid `tokenizers` tokenizer.json ({e})") from e


class Tokenizer:
  """A model's tokenizer: byte-level BPE encode/decode, special ids, stop ids and chat template.

  Build one with `from_gguf`, `from_hf` or `load`; the constructor takes an assembled `tokenizers.Tokenizer`.
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, special_tokens: Mapping[str, str | None],
               chat_template: str | None, add_bos: bool, stop_ids: Iterable[int] | None = None,
               source: str = "<memory>") -> None:
    self._tok = backend
    self.source = source
    self.chat_template = chat_template
    self.special_tokens = {k: v for k, v in special_tokens.items() if k in SPECIAL_TOKEN_NAMES and v is not None}
    ids = {}
    for name, text in self.special_tokens.items():
      ids[name] = backend.token_to_id(text)
      if ids[name] is None:
        raise ValueError(f"{source}: {name} {text!r} is not in the vocabulary")
    self.bos_id: int | None = ids.get("bos_token")
    self.eos_id: int | None = ids.get("eos_token")
    self.pad_id: int | None = ids.get("pad_token")
    self.unk_id: int | None = ids.get("unk_token")
    self.add_bos = bool(add_bos)
    if self.add_bos and self.bos_id is None:
      raise ValueError(f"{source}: the tokenizer asks for a BOS token but names none")
    if stop_ids is None:
      stop_ids = _end_token_ids(backend) + ([self.eos_id] if self.eos_id is not None else [])
    self.stop_ids: list[int] = sorted({int(i) for i in stop_ids})
    self._vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
    self._token_strings: list[str] | None = None

  # ---------------------------------------------------------------- construction

  @classmethod
  def from_gguf(cls, path: PathLike) -> Tokenizer:
    """The tokenizer stored in a GGUF's `tokenizer.*` metadata (see `gguf_tokenizer`)."""
    p = pathlib.Path(path)
    t = gguf_tokenizer.read_gguf_tokenizer(p)
    return cls(t.backend, special_tokens=t.special_tokens, chat_template=t.chat_template, add_bos=t.add_bos,
               source=str(p))

  @classmethod
  def from_hf(cls, directory: PathLike) -> Tokenizer:
    """From an HF model directory: `tokenizer.json`, `tokenizer_config.json` and optionally `chat_template.jinja`
    and `generation_config.json` (whose `eos_token_id`s join the stop ids).

    Like transformers 5, whether a BOS is added comes from `tokenizer.json`'s post-processor, not from the config's
    `add_bos_token`.
    """
    d = pathlib.Path(directory)
    if not d.is_dir():
      raise FileNotFoundError(f"{d}: not a directory")
    backend = _load_backend(d / _TOKENIZER_FILE)
    config_path = d / _CONFIG_FILE
    config = _read_json(config_path)
    if not isinstance(config, dict):
      raise ValueError(f"{config_path}: expected a JSON object")
    special = {}
    for name in SPECIAL_TOKEN_NAMES:
      value = config.get(name)
      if isinstance(value, dict):  # older configs store AddedToken dicts
        value = value.get("content")
      if value is not None and not isinstance(value, str):
        raise ValueError(f"{config_path}: {name} must be a string, got {value!r}")
      if value is not None and backend.token_to_id(value) is None:
        raise ValueError(f"{config_path}: {name} {value!r} is not in {d / _TOKENIZER_FILE}")
      special[name] = value
    template = _hf_chat_template(d, config)
    stop_ids = _end_token_ids(backend)
    if special.get("eos_token") is not None:
      stop_ids.append(backend.token_to_id(special["eos_token"]))
    gen_path = d / "generation_config.json"
    if gen_path.is_file():
      eos = _read_json(gen_path).get("eos_token_id")  # an id or a list of ids, e.g. Llama 3.1's three
      stop_ids += [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    bos = special.get("bos_token")
    add_bos = bos is not None and _post_processor_prepends(json.loads(backend.to_str()).get("post_processor"), bos)
    return cls(backend, special_tokens=special, chat_template=template, add_bos=add_bos, stop_ids=stop_ids,
               source=str(d))

  def save(self, directory: PathLike) -> None:
    """Writes `tokenizer.json` and `tokenizer_config.json` (HF-readable; `load` reads them back exactly)."""
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    self._tok.save(str(d / _TOKENIZER_FILE))
    config = {
        **self.special_tokens,
        "add_bos_token": self.add_bos,
        "chat_template": self.chat_template,
        "clean_up_tokenization_spaces": False,
        "subl_jax": {"format": _SAVE_FORMAT, "stop_ids": self.stop_ids, "add_bos": self.add_bos,
                     "source": self.source},
    }
    (d / _CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

  @classmethod
  def load(cls, directory: PathLike) -> Tokenizer:
    """Reads a directory written by `save`."""
    d = pathlib.Path(directory)
    config_path = d / _CONFIG_FILE
    config = _read_json(config_path)
    ours = config.get("subl_jax") if isinstance(config, dict) else None
    if not isinstance(ours, dict) or ours.get("format") != _SAVE_FORMAT:
      raise ValueError(f"{config_path}: not written by Tokenizer.save (format {_SAVE_FORMAT}); "
                       "for an HF model directory use Tokenizer.from_hf")
    backend = _load_backend(d / _TOKENIZER_FILE)
    special = {name: config[name] for name in SPECIAL_TOKEN_NAMES if config.get(name) is not None}
    return cls(backend, special_tokens=special, chat_template=config.get("chat_template"), add_bos=ours["add_bos"],
               stop_ids=ours["stop_ids"], source=ours.get("source", str(d)))

  # ---------------------------------------------------------------- encode / decode

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    """Token ids of `text`; special-token strings in it (e.g. "<|im_end|>") become their single ids.

    `encode(text)` equals transformers' `tokenizer(text, add_special_tokens=False)`; `add_bos=True` prepends `bos_id`,
    so `encode(text, add_bos=tok.add_bos)` equals `tokenizer.encode(text, add_special_tokens=True)` (for SmolLM2
    that adds nothing).
    """
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return self._with_bos(ids) if add_bos else ids

  def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
    """`encode` over many texts (in parallel in the Rust backend)."""
    out = [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
    return [self._with_bos(ids) for ids in out] if add_bos else out

  def _with_bos(self, ids: list[int]) -> list[int]:
    if self.bos_id is None:
      raise ValueError(f"{self.source}: add_bos=True but this tokenizer has no BOS token")
    return [self.bos_id] + ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """The text of `ids`; special tokens are dropped unless `skip_special_tokens=False`."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  # ---------------------------------------------------------------- vocabulary

  @property
  def backend(self) -> tokenizers.Tokenizer:
    """The underlying `tokenizers.Tokenizer` (shared, not a copy)."""
    return self._tok

  @property
  def vocab_size(self) -> int:
    """Number of token ids, special tokens included (one past the largest id)."""
    return self._vocab_size

  def id_to_token(self, token_id: int) -> str | None:
    """The vocabulary entry of `token_id` as spelled in the vocab (byte-level alphabet, e.g. "Ġworld")."""
    return self._tok.id_to_token(int(token_id))

  def token_to_id(self, token: str) -> int | None:
    """The id of a vocabulary entry spelled as in the vocab, or None."""
    return self._tok.token_to_id(token)

  def special_ids(self) -> list[int]:
    """Ids of all special tokens (the ones `decode` skips by default)."""
    return sorted(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

  def token_bytes(self) -> list[bytes]:
    """The raw bytes each id stands for, as `decode` sees them (special tokens: their text; unused ids: b"")."""
    u2b = {c: b for b, c in gguf_tokenizer.bytes_to_unicode().items()}
    byte_level = isinstance(self._tok.decoder, decoders.ByteLevel)
    out = [b""] * self.vocab_size
    for token, i in self._tok.get_vocab(with_added_tokens=True).items():
      if byte_level:
        # The ByteLevel decoder maps a token through the byte alphabet only when every character is in it, else it
        # keeps the token's own UTF-8 (e.g. special tokens with a space or "｜").
        out[i] = bytes(u2b[c] for c in token) if all(c in u2b for c in token) else token.encode("utf-8")
      else:
        out[i] = self._tok.decode([i], skip_special_tokens=False).encode("utf-8")
    return out

  def token_strings(self) -> list[str]:
    """The text each id decodes to on its own (bytes that are not whole UTF-8 characters become U+FFFD).

    Special tokens give their own text. Meant for scanning the vocabulary, e.g. for tokens made only of digits.
    """
    if self._token_strings is None:
      self._token_strings = [b.decode("utf-8", errors="replace") for b in self.token_bytes()]
    return list(self._token_strings)

  # ---------------------------------------------------------------- chat

  def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                  tools: list[dict] | None = None, **template_kwargs: Any) -> str:
    """The chat as text, exactly as transformers' `apply_chat_template(messages, tokenize=False, ...)` renders it."""
    return chat_lib.render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                         special_tokens=self.special_tokens, tools=tools, **template_kwargs)

  def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                  tools: list[dict] | None = None, **template_kwargs: Any) -> list[int]:
    """Ids of the rendered chat, without an added BOS: the template writes every special token it wants, and
    transformers' `apply_chat_template(tokenize=True)` also encodes with `add_special_tokens=False`."""
    return self.encode(self.render_chat(messages, add_generation_prompt, tools, **template_kwargs))

  def __repr__(self) -> str:
    return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id}, stop_ids={self.stop_ids}, add_bos={self.add_bos})")


def _end_token_ids(backend: tokenizers.Tokenizer) -> list[int]:
  """Ids of the special tokens in `END_TOKENS` that this vocabulary has."""
  special = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
  return [special[t] for t in END_TOKENS if t in special]


def _hf_chat_template(d: pathlib.Path, config: Mapping[str, Any]) -> str | None:
  """The default chat template of an HF dir: `chat_template.jinja` wins over the config's `chat_template`."""
  jinja_path = d / "chat_template.jinja"
  if jinja_path.is_file():
    return jinja_path.read_text(encoding="utf-8")
  template = config.get("chat_template")
  if isinstance(template, list):  # older format: [{"name": ..., "template": ...}, ...]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if "default" not in named:
      raise ValueError(f"{d / _CONFIG_FILE}: several chat templates {sorted(named)} and none named 'default'")
    template = named["default"]
  if template is not None and not isinstance(template, str):
    raise ValueError(f"{d / _CONFIG_FILE}: chat_template must be a string, got {type(template).__name__}")
  return template


def _post_processor_prepends(post: Mapping[str, Any] | None, bos: str) -> bool:
  """Whether a tokenizer.json post-processor puts `bos` first in a single sequence."""
  if not post:
    return False
  if post.get("type") == "Sequence":
    return any(_post_processor_prepends(p, bos) for p in post.get("processors", ()))
  if post.get("type") == "TemplateProcessing":
    single = post.get("single") or []
    return bool(single) and single[0].get("SpecialToken", {}).get("id") == bos
  return False
