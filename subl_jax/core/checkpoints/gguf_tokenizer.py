"""The byte-level BPE tokenizer stored in a GGUF file's `tokenizer.*` metadata, rebuilt as a `tokenizers.Tokenizer`.

Control tokens (token_type 3) become special tokens and user-defined ones (4) plain added tokens, as in llama.cpp and
transformers; the pre-tokenizer follows `tokenizer.ggml.pre` (see `byte_level_pre_tokenizer`).


Behaviour of the default model (SmolLM2-135M-Instruct, GGUF `tokenizer.ggml.pre = 'smollm'`):
  * Digits. The original HF tokenizer pre-tokenizes with `Sequence([Digits(individual_digits=True),
    ByteLevel(add_prefix_space=False, use_regex=True)])`, and llama.cpp's 'smollm' pre-tokenizer is the same thing
    (regex `\\p{N}` first, then the GPT-2 regex). We build exactly that. transformers (5.x) builds this GGUF's
    tokenizer with the plain GPT-2 ByteLevel regex and no digit split. No multi-character token of the vocabulary
    holds a whole numeric character, so both give one token per ASCII digit, but they differ on a whitespace run
    before a digit ("  1" is ["ĠĠ", "1"] originally, ["Ġ", "Ġ", "1"] in transformers' conversion) and around
    non-ASCII numerals whose UTF-8 bytes can merge with a preceding space (" ٣": ["Ġ", "Ù", "£"] vs ["ĠÙ", "£"]).
    We follow the original.
  * BOS. This GGUF says add_bos_token=False (bos = `<|im_start|>`), the original tokenizer adds no BOS either, and
    transformers' `encode(text, add_special_tokens=True)` adds nothing. So `add_bos` is False here.
  * Special tokens. The 17 control tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, ...) are special: a
    "<|im_end|>" inside text encodes to its single id, and `decode(..., skip_special_tokens=True)` drops them.
"""

from __future__ import annotations

import pathlib
import warnings
from typing import Any, NamedTuple

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

# Pre-tokenizer regexes (as in llama.cpp's llama-vocab.cpp and transformers' GGUF conversion).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# GGUF `tokenizer.ggml.pre` values whose pre-tokenizer is "each digit alone, then the GPT-2 regex".
_DIGIT_SPLIT_PRES = ("smollm", "starcoder", "refact", "codeshell")
_LLAMA3_PRES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")
_QWEN2_PRES = ("qwen2", "deepseek-r1-qwen")
SUPPORTED_GGUF_PRES = ("gpt2",) + _DIGIT_SPLIT_PRES + _LLAMA3_PRES + _QWEN2_PRES


class GGUFTokenizer(NamedTuple):
  """What `Tokenizer.from_gguf` needs: the assembled backend and the metadata around it."""
  backend: tokenizers.Tokenizer
  special_tokens: dict[str, str]
  chat_template: str | None
  add_bos: bool


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character map that byte-level BPE vocabularies are spelled in."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs = list(bs)
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
  """The pre-tokenizer for a GGUF `tokenizer.ggml.pre` type of a byte-level BPE vocabulary."""
  if pre == "gpt2":
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _DIGIT_SPLIT_PRES:
    # Digits first: a whitespace run before a digit must stay one piece ("  1" -> "ĠĠ", "1"), as in the original.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  split = _LLAMA3_SPLIT if pre in _LLAMA3_PRES else _QWEN2_SPLIT if pre in _QWEN2_PRES else None
  if split is None:
    raise ValueError(f"unsupported pre-tokenizer {pre!r}; supported: {', '.join(SUPPORTED_GGUF_PRES)}")
  return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def bos_post_processor(bos: str | None, bos_id: int | None, add_bos: bool) -> processors.PostProcessor:
  # Only used when someone encodes with add_special_tokens=True (transformers on a saved dir); we never do.
  byte_level = processors.ByteLevel(trim_offsets=False)
  if not add_bos or bos is None:
    return byte_level
  template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, bos_id)])
  return processors.Sequence([byte_level, template])


def _read_metadata(path: pathlib.Path) -> dict[str, Any]:
  """The `tokenizer.*` key/values of a GGUF file."""
  import gguf  # deferred: only GGUF loading needs it
  if not path.is_file():
    raise FileNotFoundError(f"{path}: file not found")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # gguf raises ValueError/struct errors on non-GGUF or truncated files
    raise ValueError(f"{path}: not a readable GGUF file ({e})") from e
  return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def read_gguf_tokenizer(p: pathlib.Path) -> GGUFTokenizer:
  """The tokenizer of the GGUF file `p`; only byte-level BPE (`tokenizer.ggml.model = gpt2`) is supported."""
  meta = _read_metadata(p)
  model = meta.get("tokenizer.ggml.model")
  if model is None:
    raise ValueError(f"{p}: no tokenizer in this GGUF (key tokenizer.ggml.model missing)")
  if model != "gpt2":
    raise ValueError(f"{p}: unsupported tokenizer model {model!r} (tokenizer.ggml.model); "
                     "only 'gpt2' (byte-level BPE) is supported")
  for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
    if key not in meta:
      raise ValueError(f"{p}: byte-level BPE tokenizer without {key}")
  pre = meta.get("tokenizer.ggml.pre")
  if pre is None:
    # What llama.cpp and transformers do for files older than the `pre` key; the model may have used another split.
    warnings.warn(f"{p}: no tokenizer.ggml.pre; using the plain GPT-2 pre-tokenizer", stacklevel=3)
    pre = "gpt2"
  try:
    pre_tokenizer = byte_level_pre_tokenizer(pre)
  except ValueError as e:
    raise ValueError(f"{p}: tokenizer.ggml.pre: {e}") from e

  tokens: list[str] = meta["tokenizer.ggml.tokens"]
  types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  alphabet = bytes_to_unicode()
  spelled = set(alphabet.values())
  # Entries outside the byte alphabet (rare) are respelled byte by byte, as transformers does.
  vocab = {t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8")): i
           for i, t in enumerate(tokens)}
  merges = []
  for m in meta["tokenizer.ggml.merges"]:
    parts = m.split(" ")
    if len(parts) != 2:
      raise ValueError(f"{p}: malformed merge {m!r} in tokenizer.ggml.merges")
    merges.append((parts[0], parts[1]))
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                            fuse_unk=False, byte_fallback=False))
  backend.pre_tokenizer = pre_tokenizer
  backend.decoder = decoders.ByteLevel()
  # A control token spelled outside the byte alphabet is a llama.cpp mislabel; adding it would grow the vocab.
  backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                              for t, ty in zip(tokens, types) if ty == 3 and set(t) <= spelled])
  backend.add_tokens([AddedToken(t, special=False, normalized=False)
                      for t, ty in zip(tokens, types) if ty == 4 and t in vocab])

  special = {}
  for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                    ("pad_token", "padding_token_id")):  # the four transformers reads from a GGUF
    token_id = meta.get(f"tokenizer.ggml.{key}")
    if token_id is not None:
      if not 0 <= token_id < len(tokens):
        raise ValueError(f"{p}: tokenizer.ggml.{key}={token_id} is outside the vocabulary ({len(tokens)} tokens)")
      special[name] = backend.id_to_token(token_id)
  # Missing flag: transformers (GPT2Tokenizer) adds no BOS for a byte-level vocabulary.
  add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
  backend.post_processor = bos_post_processor(special.get("bos_token"), meta.get("tokenizer.ggml.bos_token_id"),
                                              add_bos)
  return GGUFTokenizer(backend, special, meta.get("tokenizer.chat_template"), add_bos)
