"""Declarative name mapping from HF and GGUF checkpoints to our parameter tree, and sharded assembly.

Both sources store matrices as [out, in] (torch's Linear layout; GGUF tensors dequantize to the same after llama.cpp's
q/k row permutation is undone by the GGUF source). One table, two name columns, one transform per row.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from subl_jax.core import parallel
from subl_jax.core.models import transformer
from subl_jax.core.models.config import ModelConfig


def _copy(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  return w


def _transpose(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  return w.T


def _in_heads(n_heads: Callable[[ModelConfig], int]):
  def f(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:  # [H*Dh, D] -> [D, H, Dh]
    return w.T.reshape(cfg.d_model, n_heads(cfg), cfg.head_dim)
  return f


def _bias_heads(n_heads: Callable[[ModelConfig], int]):
  def f(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:  # [H*Dh] -> [H, Dh]
    return w.reshape(n_heads(cfg), cfg.head_dim)
  return f


def _out_heads(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:  # [D, H*Dh] -> [H, Dh, D]
  return w.T.reshape(cfg.n_heads, cfg.head_dim, cfg.d_model)


_Q, _KV = (lambda c: c.n_heads), (lambda c: c.n_kv_heads)

# (our path, HF name, GGUF name, transform). "{i}" is the layer index; rows under "layers/" are stacked over layers.
TABLE: tuple[tuple[str, str, str, Callable], ...] = (
    ("embed", "model.embed_tokens.weight", "token_embd.weight", _copy),
    ("final_norm", "model.norm.weight", "output_norm.weight", _copy),
    ("lm_head", "lm_head.weight", "output.weight", _transpose),
    ("layers/attn_norm", "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", _copy),
    ("layers/q", "model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight", _in_heads(_Q)),
    ("layers/k", "model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight", _in_heads(_KV)),
    ("layers/v", "model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight", _in_heads(_KV)),
    ("layers/q_bias", "model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias", _bias_heads(_Q)),
    ("layers/k_bias", "model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias", _bias_heads(_KV)),
    ("layers/v_bias", "model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias", _bias_heads(_KV)),
    ("layers/o", "model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", _out_heads),
    ("layers/mlp_norm", "model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight", _copy),
    ("layers/gate", "model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", _transpose),
    ("layers/up", "model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight", _transpose),
    ("layers/down", "model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight", _transpose),
)
SOURCES = {"hf": 1, "gguf": 2}


def source_names(cfg: ModelConfig, source: str) -> dict[str, list[str]]:
  """Our path -> the source tensor names it is built from (one per layer for stacked rows)."""
  col = SOURCES[source]
  shapes, _ = transformer.abstract_params(cfg)
  wanted = {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(shapes)}
  out = {}
  for row in TABLE:
    if row[0] not in wanted:
      continue
    name = row[col]
    out[row[0]] = [name.format(i=i) for i in range(cfg.n_layers)] if row[0].startswith("layers/") else [name]
  return out


def assemble(cfg: ModelConfig, source: str, get_tensor: Callable[[str], np.ndarray], origin: str,
             mesh: Mesh | None = None) -> Any:
  """Builds the parameter tree tensor by tensor, each placed straight into its sharding on `mesh`.

  `get_tensor(name)` returns the source tensor as a numpy array ([out, in] layout) or raises KeyError.
  Errors name `origin` (the file or directory) and the tensor.
  """
  shapes, names = transformer.abstract_params(cfg)
  transforms = {row[0]: row[3] for row in TABLE}
  dtype = jnp.dtype(cfg.param_dtype)
  flat = {}
  for path, srcs in source_names(cfg, source).items():
    keys = path.split("/")
    expected = shapes[keys[0]] if len(keys) == 1 else shapes[keys[0]][keys[1]]
    logical = names[keys[0]] if len(keys) == 1 else names[keys[0]][keys[1]]
    stacked = path.startswith("layers/")
    want = expected.shape[1:] if stacked else expected.shape
    parts = []
    for src in srcs:
      try:
        raw = np.asarray(get_tensor(src))
      except KeyError:
        raise ValueError(f"{origin}: tensor {src!r} (for {path}) is missing") from None
      try:
        part = transforms[path](raw, cfg)
      except ValueError:  # a reshape that cannot fit
        part = None
      if part is None or part.shape != want:
        raise ValueError(f"{origin}: tensor {src!r} has shape {raw.shape}, which does not fit {path} of shape "
                         f"{want} from the model config")
      parts.append(part)
    value = np.stack(parts) if stacked else parts[0]
    value = value.astype(dtype)
    if mesh is None:
      flat[path] = jnp.asarray(value)
    else:
      sharding = parallel.named_sharding(mesh, logical, value.shape)
      flat[path] = jax.make_array_from_callback(value.shape, sharding, lambda idx, v=value: v[idx])
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree
