"""The KV cache, in either key layout (`Perf.kv_layout`), and one layer's keys and values in the layout attention
reads them.

Values are [layers, batch, kv_heads, slots, head_dim]; keys the same ("standard") or [layers, batch, kv_heads,
head_dim, slots] ("transposed"). The whole cache rides in the layer scan's carry and each layer updates its slice in
place (cheaper inside a decode `while_loop` than per-layer caches as scan inputs and outputs).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from subl_jax.core.models.config import KV_LAYOUTS, ModelConfig


def _check(layout: str) -> None:
  if layout not in KV_LAYOUTS:
    raise ValueError(f"kv layout {layout!r}: expected one of {KV_LAYOUTS}")


def key_slot_axis(layout: str) -> int:
  """The slot axis of keys (counted from the end, so it holds with or without the layers axis)."""
  _check(layout)
  return -1 if layout == "transposed" else -2


def to_layout(k_bskd: jax.Array, v_bskd: jax.Array, layout: str) -> tuple[jax.Array, jax.Array]:
  """Keys and values as projected ([b, s, kv_heads, head_dim]) in attention's layouts: values [b, kv_heads, s,
  head_dim], keys the same or (transposed) [b, kv_heads, head_dim, s]."""
  v = v_bskd.transpose(0, 2, 1, 3)
  k = k_bskd.transpose(0, 2, 3, 1) if key_slot_axis(layout) == -1 else k_bskd.transpose(0, 2, 1, 3)
  return k, v


class KVCache(NamedTuple):
  """Keys and values of every layer (see the module docstring for their layouts)."""
  k: jax.Array
  v: jax.Array

  @staticmethod
  def shapes(cfg: ModelConfig, batch: int, slots: int, layout: str) -> KVCache:
    head = (cfg.n_layers, batch, cfg.n_kv_heads)
    v = head + (slots, cfg.head_dim)
    return KVCache(head + (cfg.head_dim, slots) if key_slot_axis(layout) == -1 else v, v)

  @staticmethod
  def logical(layout: str) -> KVCache:
    """The logical axis names of each field (see `parallel`)."""
    v = ("layers", "batch", "kv_heads", "length", "head_dim")
    k = ("layers", "batch", "kv_heads", "head_dim", "length") if key_slot_axis(layout) == -1 else v
    return KVCache(k, v)

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, slots: int, layout: str) -> KVCache:
    return cls(*(jnp.zeros(shape, cfg.dtype) for shape in cls.shapes(cfg, batch, slots, layout)))

  @property
  def slots(self) -> int:
    return self.v.shape[-2]

  def write(self, layer: jax.Array, index: jax.Array, k: jax.Array, v: jax.Array, layout: str) -> KVCache:
    """The cache with one layer's keys and values (in `to_layout`'s layouts, [b, kv_heads, .., t]) written at slots
    index .. index+t-1."""
    layer, index, z = (jnp.asarray(i, jnp.int32) for i in (layer, index, 0))  # one index dtype, also under x64
    k_start = (layer, z, z, z, index) if key_slot_axis(layout) == -1 else (layer, z, z, index, z)
    return KVCache(jax.lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), k_start),
                   jax.lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), (layer, z, z, index, z)))

  def read(self, layer: jax.Array, slots: int, layout: str) -> tuple[jax.Array, jax.Array]:
    """One layer's keys and values over the first `slots` slots (static), in attention's layouts."""
    k = jax.lax.dynamic_index_in_dim(self.k, layer, 0, keepdims=False)
    v = jax.lax.dynamic_index_in_dim(self.v, layer, 0, keepdims=False)
    k = k[..., :slots] if key_slot_axis(layout) == -1 else k[:, :, :slots]
    return k, v[:, :, :slots]
