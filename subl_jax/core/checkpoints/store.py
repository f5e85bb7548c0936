"""Converted model directories: `model_config.json`, Orbax `params/`, tokenizer files and `source.json`.

A directory is written under a temporary name and renamed when complete, so a killed conversion never leaves a
half-written model where a stage would load it.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from subl_jax.core.checkpoints.tokenizer import Tokenizer
from subl_jax.core.models import transformer
from subl_jax.core.models.config import ModelConfig

CONFIG_FILE, PARAMS_DIR, SOURCE_FILE = "model_config.json", "params", "source.json"


def is_converted(directory: str | pathlib.Path) -> bool:
  d = pathlib.Path(directory)
  return (d / CONFIG_FILE).is_file() and (d / PARAMS_DIR).is_dir()


def save(directory: str | pathlib.Path, cfg: ModelConfig, params: Any, tokenizer: Tokenizer,
         source: dict[str, Any] | None = None) -> pathlib.Path:
  """Writes a converted model directory atomically (temp dir + rename); replaces an existing one. With several
  processes, every process writes its shards of the parameters and process 0 does the files and the renames."""
  final = pathlib.Path(directory).absolute()
  tmp = final.with_name(final.name + ".partial")
  lead = jax.process_index() == 0
  if lead:
    if tmp.exists():
      shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    cfg.save(tmp / CONFIG_FILE)
    tokenizer.save(tmp)
    (tmp / SOURCE_FILE).write_text(json.dumps(source or {}, indent=2) + "\n")
  _barrier(f"store:{final}:mkdir")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp / PARAMS_DIR, params)
  checkpointer.wait_until_finished()
  if lead:
    if final.exists():
      shutil.rmtree(final)
    tmp.rename(final)
  _barrier(f"store:{final}:done")
  return final


def _barrier(tag: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(tag)


def load(directory: str | pathlib.Path, mesh: Mesh, **config_overrides: Any) -> tuple[ModelConfig, Any, Tokenizer]:
  """(config, params placed in their shardings on `mesh`, tokenizer) of a converted directory.

  `config_overrides` may change numerics (`dtype`, `param_dtype` — parameters are cast on restore, `remat_policy`)
  but not shapes.
  """
  d = pathlib.Path(directory)
  if not is_converted(d):
    raise FileNotFoundError(f"{d}: not a converted model directory (expected {CONFIG_FILE} and {PARAMS_DIR}/; "
                            "make one with `python -m subl_jax.convert`)")
  cfg = ModelConfig.load(d / CONFIG_FILE)
  shape_fields = {"vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim",
                  "tie_embeddings", "qkv_bias"}
  if bad := sorted(shape_fields & set(config_overrides)):
    raise ValueError(f"{d}: cannot override shape fields {bad} of a converted model")
  cfg = cfg.replace(**config_overrides)
  shapes, _ = transformer.abstract_params(cfg)
  shardings = transformer.param_shardings(cfg, mesh)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, jnp.dtype(cfg.param_dtype), sharding=sh),
                        shapes, shardings)
  try:
    params = ocp.StandardCheckpointer().restore((d / PARAMS_DIR).absolute(), target)
  except Exception as e:  # orbax raises many types for missing/corrupt/mismatched arrays
    raise ValueError(f"{d / PARAMS_DIR}: cannot restore the parameters for {CONFIG_FILE}'s shapes "
                     f"({type(e).__name__}: {str(e)[:500]})") from None
  tokenizer = Tokenizer.load(d)
  check_vocab(cfg, tokenizer, str(d))
  return cfg, params, tokenizer


def check_vocab(cfg: ModelConfig, tokenizer: Tokenizer, origin: str) -> None:
  """The embedding must have a row for every token id (it may have more: padded vocabularies)."""
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"{origin}: the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has "
                     f"only {cfg.vocab_size} rows")
