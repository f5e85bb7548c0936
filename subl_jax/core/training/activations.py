"""The residual stream after a given layer, averaged over a batch's loss positions: the quantity of the
steering-vector account of subliminal learning (docs/protocol.md §11; issue #20's activation signal).

A model's "shift" on a dataset is mean_h(model) − mean_h(base) at the same positions; a system-prompt teacher's is
its prompt's effect (the teacher on its own view, the base on the student's), a student's what training changed.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from subl_jax.core import parallel
from subl_jax.core.lora import LoraConfig, scaled
from subl_jax.core.models import transformer
from subl_jax.core.models.config import ModelConfig


def first_layers(tree: Any, layer: int) -> Any:
  """A parameter (or adapter) tree cut to its first `layer` layers (the stacked `layers` leaves)."""
  if tree is None:
    return None
  return {**tree, "layers": jax.tree.map(lambda x: x[:layer], tree["layers"])}


@functools.lru_cache(maxsize=8)
def mean_hidden_fn(cfg: ModelConfig, layer: int, lora: LoraConfig | None, mesh: Mesh | None) -> Callable:
  """jit: (params, adapters or None, tokens, positions, kv_mask, logit_idx, weights) -> [d_model], the weighted mean
  over the positions `logit_idx` ([b, n], the positions whose next token is a target) of the residual stream after
  `layer` layers (1 ≤ layer ≤ n_layers). `adapters` are raw LoRA adapters of `lora` (scaled here)."""
  if not 1 <= layer <= cfg.n_layers:
    raise ValueError(f"layer={layer}: expected 1..{cfg.n_layers}")
  module = transformer.Transformer(cfg.replace(n_layers=layer), mesh, transformer.default_perf(), hidden=True)

  def fn(params, adapters, tokens, positions, kv_mask, logit_idx, weights):
    ad = None if adapters is None else first_layers(scaled(adapters, lora), layer)
    h = module.apply({"params": first_layers(params, layer)}, transformer.train_inputs(tokens, positions, kv_mask),
                     logit_idx_bn=logit_idx, adapters=ad).logits.astype(jnp.float32)      # [b, n, d]
    w = weights.astype(jnp.float32)[..., None]
    return jnp.sum(h * w, axis=(0, 1)) / jnp.maximum(jnp.sum(w), 1.0)

  return jax.jit(fn, out_shardings=parallel.replicated(mesh) if mesh is not None else None)


SHIFT_EXAMPLES = 32  # dataset rows a shift is averaged over


def shift_batches(ds: Any, mesh: Mesh, pad_id: int, n: int = SHIFT_EXAMPLES) -> tuple[dict, dict]:
  """(the student's view, the teacher's view) of `ds`'s first `n` rows as micro-batches on `mesh`: tokens,
  positions, kv_mask, logit_idx, weights (the teacher's view shares the student's weights: same completions)."""
  from subl_jax.core.training import buckets, step as step_lib  # deferred: step imports the model stack
  from subl_jax.core.training.chat_data import ChatDataset
  if ds.teacher is None:
    raise ValueError("an activation shift needs the dataset's teacher view (chat_data.build(..., teacher_system=...))")
  n = min(n, len(ds))
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  idx = np.r_[np.arange(n), np.full(-(-n // dp) * dp - n, -1)]
  host = buckets.collate_step(ChatDataset(ds.examples, ds.teacher), idx, 1, pad_id)
  batch = jax.tree.map(lambda x: x[0], step_lib.put_batch(host, mesh))
  keys = ("tokens", "positions", "kv_mask", "logit_idx")
  student = {k: batch[k] for k in keys + ("weights",)}
  return student, {k: batch[f"teacher_{k}"] for k in keys} | {"weights": batch["weights"]}


def mean_hidden(cfg: ModelConfig, layer: int, mesh: Mesh, params: Any, view: dict, adapters: Any = None,
                lora: LoraConfig | None = None) -> jax.Array:
  """The mean residual stream after `layer` layers over `view`'s loss positions (`mean_hidden_fn`)."""
  fn = mean_hidden_fn(cfg, layer, lora if adapters is not None else None, mesh)
  return fn(params, adapters, view["tokens"], view["positions"], view["kv_mask"], view["logit_idx"], view["weights"])


def teacher_shift(base: Any, teacher: Any, batches: tuple[dict, dict], layer: int) -> jax.Array:
  """v_T: the teacher's mean residual stream on its own view minus the base model's on the student's ([d_model])."""
  student, view = batches
  cfg, mesh = base.config, base.mesh
  return mean_hidden(cfg, layer, mesh, teacher.params, view) - mean_hidden(cfg, layer, mesh, base.params, student)
