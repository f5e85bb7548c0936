"""Import an HF checkpoint directory (`config.json`, `*.safetensors`, tokenizer files) for Llama and Qwen2."""

from __future__ import annotations

import json
import pathlib
from typing import Any

from jax.sharding import Mesh

from subl_jax.core.checkpoints import mapping
from subl_jax.core.checkpoints.safetensors_io import SafetensorsDir
from subl_jax.core.models.config import ModelConfig

SUPPORTED = ("llama", "qwen2")
# Tensors that carry no parameters of ours (buffers some old exports saved).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config(directory: str | pathlib.Path, **overrides: Any) -> ModelConfig:
  """ModelConfig from an HF `config.json` (transformers 4 `rope_scaling` or 5 `rope_parameters` layouts)."""
  path = pathlib.Path(directory) / "config.json"
  try:
    hf = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read the HF config ({e})") from None

  def need(key: str) -> Any:
    if key not in hf:
      raise ValueError(f"{path}: missing field {key!r}")
    return hf[key]

  model_type = need("model_type")
  if model_type not in SUPPORTED:
    raise ValueError(f"{path}: model_type {model_type!r} is not supported; expected one of {SUPPORTED}")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported; expected 'silu'")
  for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
    if hf.get(flag):
      raise ValueError(f"{path}: {flag}=true is not supported")
  rope = dict(hf.get("rope_parameters") or {})
  rope.update(hf.get("rope_scaling") or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", "llama3"):
    raise ValueError(f"{path}: rope type {rope_type!r} is not supported; expected 'default' or 'llama3'")
  d_model, n_heads = need("hidden_size"), need("num_attention_heads")
  fields = dict(
      vocab_size=need("vocab_size"), d_model=d_model, n_layers=need("num_hidden_layers"), n_heads=n_heads,
      n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=hf.get("head_dim") or d_model // n_heads,
      mlp_dim=need("intermediate_size"), rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
      rms_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=model_type == "qwen2")
  if rope_type == "llama3":
    fields.update(rope_scaling="llama3", rope_factor=float(rope["factor"]),
                  rope_low_freq_factor=float(rope["low_freq_factor"]),
                  rope_high_freq_factor=float(rope["high_freq_factor"]),
                  rope_original_max_len=int(rope["original_max_position_embeddings"]))
  fields.update(overrides)
  try:
    return ModelConfig(**fields)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


def load_params(directory: str | pathlib.Path, cfg: ModelConfig, mesh: Mesh | None = None) -> Any:
  """Parameters from the directory's safetensors, streamed tensor by tensor into their shardings."""
  tensors = SafetensorsDir(directory)
  wanted = {n for names in mapping.source_names(cfg, "hf").values() for n in names}
  if cfg.tie_embeddings:
    wanted.add("lm_head.weight")  # some tied checkpoints still store the head; it equals the embedding
  unused = sorted(n for n in tensors.names() if n not in wanted and not n.endswith(_IGNORED_SUFFIXES))
  if unused:
    raise ValueError(f"{tensors.dir}: tensors not used by a {cfg.n_layers}-layer model: {unused[:8]}"
                     f"{' ...' if len(unused) > 8 else ''} (unsupported architecture features?)")
  return mapping.assemble(cfg, "hf", tensors.__getitem__, str(tensors.dir), mesh)
