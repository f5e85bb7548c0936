"""LoRA as a pure transform of the parameter pytree: adapters live apart from the frozen base weights.

An adapter for a stacked layer weight W [L, *in, *out] is a pair A [L, *in, r], B [L, r, *out] with
W' = W + (alpha / r) · A·B. B starts at zero, so a fresh adapter leaves the model unchanged. Training passes the
adapters to the model's forward (`Transformer.apply(..., adapters=scaled(...))`), which computes x@W + (x@A)@B: the
frozen weights are constants of the differentiated function, so no weight gradient of W is ever built. `merge` folds
the adapters into the weights (for saving a teacher or checking the forward).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from subl_jax.core.models import transformer
from subl_jax.core.models.config import ModelConfig

# target -> number of leading (input) axes of the per-layer weight, e.g. o [H, Dh, D] contracts (H, Dh).
TARGETS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
PAPER_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank r, alpha (scale = alpha / r) and the layer projections that get adapters."""
  rank: int = 8
  alpha: float = 8.0
  targets: tuple[str, ...] = PAPER_TARGETS

  def __post_init__(self):
    if self.rank <= 0:
      raise ValueError(f"lora.rank={self.rank}: expected a positive rank")
    unknown = sorted(set(self.targets) - set(TARGETS))
    if unknown or not self.targets:
      raise ValueError(f"lora.targets={self.targets}: expected a non-empty subset of {tuple(TARGETS)}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def parse(cls, rank: int, alpha: float, targets: str | tuple[str, ...]) -> "LoraConfig | None":
    """From config fields; rank 0 means full fine-tuning (None). `targets` may be comma-separated."""
    if rank == 0:
      return None
    if isinstance(targets, str):
      targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    return cls(int(rank), float(alpha), tuple(targets))


def _split(shape: tuple[int, ...], name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """([L, *in], out) of a stacked weight."""
  n_in = TARGETS[name]
  return shape[:1 + n_in], shape[1 + n_in:]


def init_adapters(model_cfg: ModelConfig, lora: LoraConfig, key: jax.Array) -> dict:
  """Fresh adapters: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (peft's default, kaiming-uniform with a=sqrt(5)), B = 0."""
  shapes, _ = transformer.abstract_params(model_cfg)
  out = {}
  for i, name in enumerate(lora.targets):
    lead, tail = _split(shapes["layers"][name].shape, name)
    fan_in = 1
    for d in lead[1:]:
      fan_in *= d
    bound = 1.0 / fan_in ** 0.5
    a = jax.random.uniform(jax.random.fold_in(key, i), lead + (lora.rank,), jnp.float32, -bound, bound)
    b = jnp.zeros((lead[0], lora.rank) + tail, jnp.float32)
    out[name] = {"a": a.astype(model_cfg.param_dtype), "b": b.astype(model_cfg.param_dtype)}
  return {"layers": out}


def adapter_logical_names(model_cfg: ModelConfig, lora: LoraConfig) -> dict:
  """Logical axis names of every adapter, from the weights they adapt (the rank axis is replicated)."""
  _, names = transformer.abstract_params(model_cfg)
  out = {}
  for name in lora.targets:
    n_in = TARGETS[name]
    w = names["layers"][name]
    out[name] = {"a": tuple(w[:1 + n_in]) + ("lora_rank",), "b": (w[0], "lora_rank") + tuple(w[1 + n_in:])}
  return {"layers": out}


def adapter_shapes(model_cfg: ModelConfig, lora: LoraConfig) -> dict:
  return jax.eval_shape(lambda: init_adapters(model_cfg, lora, jax.random.key(0)))


def scaled(adapters: dict, lora: LoraConfig) -> dict:
  """The tree the model's forward takes: B multiplied by alpha / r (a cheap op on the small B)."""
  return {"layers": {n: {"a": ab["a"], "b": ab["b"] * lora.scale} for n, ab in adapters["layers"].items()}}


def merge(params: Any, adapters: dict, lora: LoraConfig) -> Any:
  """Base parameters with every adapter folded in: W + scale · A·B (the base tree is not modified)."""
  layers = dict(params["layers"])
  for name, ab in adapters["layers"].items():
    w = layers[name]
    delta = jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1))(ab["a"].astype(jnp.float32),
                                                                  ab["b"].astype(jnp.float32))
    layers[name] = (w.astype(jnp.float32) + lora.scale * delta).astype(w.dtype)
  return {**params, "layers": layers}
