"""The small public API: `load(spec)` -> `Model` with config, params, tokenizer, chat rendering and logits."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from subl_jax.core import parallel
from subl_jax.core.checkpoints import fetch, gguf_import, hf, store
from subl_jax.core.checkpoints.tokenizer import Tokenizer
from subl_jax.core.models import transformer
from subl_jax.core.models.config import ModelConfig

SPEC_HELP = "'smollm2', 'gguf:FILE', 'hf:DIR' or a converted model directory"


@dataclasses.dataclass
class Model:
  """A loaded model: what every stage works with."""
  config: ModelConfig
  params: Any
  tokenizer: Tokenizer
  mesh: Mesh

  @property
  def module(self) -> transformer.Transformer:
    """The model with the platform's KV layout and the standard head (logits [b, t, vocab])."""
    perf = transformer.default_perf().replace(vocab_major_head=False)
    return transformer.Transformer(self.config, mesh=self.mesh, perf=perf)

  def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
    return self.tokenizer.render_chat(list(messages), add_generation_prompt=add_generation_prompt)

  def logits(self, ids_bt: Any, mask_bt: Any | None = None) -> np.ndarray:
    """Logits [b, t, vocab] (float32) of a batch; `mask_bt` is 1 for real tokens, left padding allowed."""
    ids = np.asarray(ids_bt, np.int32)
    mask = np.ones_like(ids) if mask_bt is None else np.asarray(mask_bt, np.int32)
    if ids.ndim != 2 or mask.shape != ids.shape:
      raise ValueError(f"logits: expected ids and mask of the same shape [batch, length], got {ids.shape}, "
                       f"{mask.shape}")
    batch = parallel.named_sharding(self.mesh, ("batch", "length"), ids.shape)
    ids, mask = jax.device_put(ids, batch), jax.device_put(mask, batch)
    return np.asarray(self._logits_fn(self.params, ids, mask))

  @functools.cached_property
  def _logits_fn(self):
    module = self.module

    def fn(params, ids, mask):  # shardings come from the committed inputs: params and batch are placed
      inputs = transformer.train_inputs(ids, transformer.positions_from_mask(mask), mask)
      return module.apply({"params": params}, inputs).logits

    return jax.jit(fn)


def import_checkpoint(spec: str, mesh: Mesh, **overrides: Any) -> tuple[ModelConfig, Any, Tokenizer, dict]:
  """Reads `gguf:FILE` or `hf:DIR` into (config, sharded params, tokenizer, source description)."""
  kind, _, location = spec.partition(":")
  path = pathlib.Path(location).expanduser()
  if kind == "gguf":
    g = gguf_import.GGUFFile(path)
    cfg = gguf_import.read_config(g, **overrides)
    tokenizer = Tokenizer.from_gguf(path)
    store.check_vocab(cfg, tokenizer, str(path))
    params = gguf_import.load_params(g, cfg, mesh)
  elif kind == "hf":
    if not path.is_dir():
      raise FileNotFoundError(f"{path}: no such HF checkpoint directory")
    cfg = hf.read_config(path, **overrides)
    tokenizer = Tokenizer.from_hf(path)
    store.check_vocab(cfg, tokenizer, str(path))
    params = hf.load_params(path, cfg, mesh)
  else:
    raise ValueError(f"model spec {spec!r}: expected {SPEC_HELP}")
  return cfg, params, tokenizer, {"spec": spec, "path": str(path.absolute())}


def converted_smollm2() -> pathlib.Path:
  """The embedded default model, fetched and converted once into the cache."""
  target = fetch.cache_dir() / "converted" / "smollm2-135m-instruct"
  if not store.is_converted(target):
    path = fetch.smollm2_gguf_path()
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    cfg, params, tokenizer, source = import_checkpoint(f"gguf:{path}", mesh)
    store.save(target, cfg, params, tokenizer, source)
  return target


def load(spec: str, mesh: Mesh | None = None, **overrides: Any) -> Model:
  """Loads a model by spec: 'smollm2', 'gguf:FILE', 'hf:DIR' or a converted directory.

  `mesh` defaults to all devices on the fsdp axis; `overrides` change numerics (dtype, param_dtype, remat_policy).
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  if spec == "smollm2":
    spec = str(converted_smollm2())
  if spec.startswith(("gguf:", "hf:")):
    cfg, params, tokenizer, _ = import_checkpoint(spec, mesh, **overrides)
  elif store.is_converted(pathlib.Path(spec).expanduser()):
    cfg, params, tokenizer = store.load(pathlib.Path(spec).expanduser(), mesh, **overrides)
  else:
    raise ValueError(f"model spec {spec!r}: not a converted model directory; expected {SPEC_HELP}")
  return Model(cfg, params, tokenizer, mesh)


def load_tokenizer(spec: str) -> Tokenizer:
  """Only the tokenizer of a model spec (no parameters are read)."""
  if spec == "smollm2":
    spec = str(converted_smollm2())
  kind, _, location = spec.partition(":")
  if kind == "gguf":
    return Tokenizer.from_gguf(pathlib.Path(location).expanduser())
  if kind == "hf":
    return Tokenizer.from_hf(pathlib.Path(location).expanduser())
  if store.is_converted(pathlib.Path(spec).expanduser()):
    return Tokenizer.load(pathlib.Path(spec).expanduser())
  raise ValueError(f"tokenizer spec {spec!r}: expected {SPEC_HELP}")


def from_config(model_cfg: Any, mesh: Mesh, seed: int = 0) -> Model:
  """The model a config's `model` section names: a checkpoint spec, or 'random' shapes from `model.arch`."""
  numerics = dict(dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype, remat_policy=model_cfg.remat_policy)
  if model_cfg.spec != "random":
    return load(model_cfg.spec, mesh, **numerics)
  arch = dict(model_cfg.arch)
  arch["head_dim"] = arch["head_dim"] or arch["d_model"] // arch["n_heads"]
  cfg = ModelConfig(**arch, **numerics)
  tokenizer = load_tokenizer(model_cfg.tokenizer)
  store.check_vocab(cfg, tokenizer, f"model.tokenizer={model_cfg.tokenizer!r}")
  return Model(cfg, transformer.init_params(cfg, jax.random.key(seed), mesh), tokenizer, mesh)
