"""Import a GGUF checkpoint (architecture `llama`): config from metadata, dequantized tensors, q/k un-permuted.

llama.cpp's converter permutes the rows of q and k so that its interleaved-pair RoPE matches HF's rotate-half RoPE;
we undo that permutation and keep one RoPE (rotate-half) for every source.
"""

from __future__ import annotations

import pathlib
from typing import Any

import gguf
import numpy as np
from gguf import quants
from jax.sharding import Mesh

from subl_jax.core.checkpoints import mapping
from subl_jax.core.models.config import ModelConfig


class GGUFFile:
  """Metadata and dequantized tensors of one GGUF file, with errors that name the file."""

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)
    if not self.path.exists():
      raise FileNotFoundError(f"{self.path}: no such GGUF file")
    try:
      self.reader = gguf.GGUFReader(self.path)
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on truncated or corrupt files
      raise ValueError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    self.tensors = {t.name: t for t in self.reader.tensors}

  def field(self, key: str, default: Any = None) -> Any:
    f = self.reader.fields.get(key)
    return default if f is None else f.contents()

  def need(self, key: str) -> Any:
    value = self.field(key)
    if value is None:
      raise ValueError(f"{self.path}: metadata field {key!r} is missing")
    return value

  def dequantized(self, name: str) -> np.ndarray:
    t = self.tensors[name]  # KeyError for a missing tensor
    try:
      w = quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
      raise ValueError(f"{self.path}: tensor {name!r} has type {t.tensor_type.name}, which the gguf package "
                       "cannot dequantize") from None
    expected = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
    if w.shape != expected:
      raise ValueError(f"{self.path}: tensor {name!r} dequantized to {w.shape}, expected {expected}")
    return w.astype(np.float32)


def read_config(g: GGUFFile, **overrides: Any) -> ModelConfig:
  """ModelConfig from the `llama.*` metadata."""
  arch = g.need("general.architecture")
  if arch != "llama":
    raise ValueError(f"{g.path}: GGUF architecture {arch!r} is not supported; expected 'llama'")
  if "rope_freqs.weight" in g.tensors:
    raise ValueError(f"{g.path}: tensor 'rope_freqs.weight' (Llama 3.1 RoPE scaling in GGUF) is not supported; "
                     "import the HF checkpoint instead")
  d_model, n_heads = int(g.need("llama.embedding_length")), int(g.need("llama.attention.head_count"))
  tokens = g.field("tokenizer.ggml.tokens")
  vocab = g.field("llama.vocab_size") or (len(tokens) if tokens is not None else None)
  if vocab is None:
    raise ValueError(f"{g.path}: neither 'llama.vocab_size' nor 'tokenizer.ggml.tokens' is present")
  fields = dict(
      vocab_size=int(vocab), d_model=d_model, n_layers=int(g.need("llama.block_count")), n_heads=n_heads,
      n_kv_heads=int(g.field("llama.attention.head_count_kv", n_heads)),
      head_dim=int(g.field("llama.attention.key_length", d_model // n_heads)),
      mlp_dim=int(g.need("llama.feed_forward_length")),
      rope_theta=float(g.field("llama.rope.freq_base", 10000.0)),
      rms_eps=float(g.need("llama.attention.layer_norm_rms_epsilon")),
      tie_embeddings="output.weight" not in g.tensors, qkv_bias="blk.0.attn_q.bias" in g.tensors)
  fields.update(overrides)
  try:
    return ModelConfig(**fields)
  except ValueError as e:
    raise ValueError(f"{g.path}: {e}") from None


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's `permute`: per head, rows (pairs interleaved) back to (first half, second half)."""
  rows = w.shape[0]
  return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_params(g: GGUFFile, cfg: ModelConfig, mesh: Mesh | None = None) -> Any:
  """Parameters from the GGUF tensors, dequantized to float32 and placed into their shardings."""
  wanted = {n for names in mapping.source_names(cfg, "gguf").values() for n in names}
  unused = sorted(n for n in g.tensors if n not in wanted)
  if unused:
    raise ValueError(f"{g.path}: tensors not used by a {cfg.n_layers}-layer model: {unused[:8]} "
                     "(unsupported architecture features?)")

  def get(name: str) -> np.ndarray:
    w = g.dequantized(name)
    if name.endswith(("attn_q.weight", "attn_q.bias")):
      return unpermute_rows(w, cfg.n_heads)
    if name.endswith(("attn_k.weight", "attn_k.bias")):
      return unpermute_rows(w, cfg.n_kv_heads)
    return w

  return mapping.assemble(cfg, "gguf", get, str(g.path), mesh)
