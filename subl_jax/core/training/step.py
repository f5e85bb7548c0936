"""The train step: SFT or logit distillation, full or LoRA, with gradient accumulation inside one jit.

The state `{"step", "trainable", "opt"}` holds only what is trained: every parameter for full fine-tuning, the
adapters for LoRA (the frozen base is a separate, undonated argument). Each micro-batch's loss is a masked
(Σ loss, Σ tokens) pair; the step sums both, and the gradients of Σ loss, over the `lax.scan` of micro-batches and
over all devices, and divides once — the mean over every loss token of the step, however it is split.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from subl_jax.core import parallel, xla_cpu
from subl_jax.core.models import transformer
from subl_jax.core.models.config import ModelConfig
from subl_jax.core.training import losses, optim
from subl_jax.core.lora import LoraConfig, adapter_logical_names, adapter_shapes, scaled

BATCH_LOGICAL = (None, "batch", "length")  # [accum, micro, T or N]: micro-batches split over (data, fsdp)


@dataclasses.dataclass(frozen=True)
class DistillSpec:
  """Logit distillation: KL(teacher || student) at `temperature` over `kd_tokens` ('all' | 'topk' | 'numbers')."""
  temperature: float = 1.0
  kd_tokens: str = "all"
  topk: int = 0
  token_ids: tuple[int, ...] | None = None  # the restricted set for 'numbers'


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What the step computes; hashable, so one compiled step serves a run."""
  model_cfg: ModelConfig
  lora: LoraConfig | None = None
  distill: DistillSpec | None = None
  teacher_cfg: ModelConfig | None = None  # defaults to model_cfg
  shared_prefix: int = 0          # leading input tokens every row shares, run once (see `buckets.shared_prefix`)
  teacher_shared_prefix: int = 0  # the same for the teacher's view


def _trainable_shapes(spec: StepSpec) -> Any:
  if spec.lora is None:
    return transformer.abstract_params(spec.model_cfg)[0]
  return adapter_shapes(spec.model_cfg, spec.lora)


def trainable_shardings(spec: StepSpec, mesh: Mesh) -> Any:
  if spec.lora is None:
    return transformer.param_shardings(spec.model_cfg, mesh)
  return parallel.tree_shardings(adapter_logical_names(spec.model_cfg, spec.lora),
                                 adapter_shapes(spec.model_cfg, spec.lora), mesh)


def state_shardings(spec: StepSpec, tx: optax.GradientTransformation, mesh: Mesh) -> dict:
  """Shardings of the train state, derived from `eval_shape`: optimizer moments follow their parameters."""
  params_sh = trainable_shardings(spec, mesh)
  shapes = _trainable_shapes(spec)
  opt_shapes = jax.eval_shape(tx.init, shapes)
  rep = parallel.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, opt_shapes, params_sh, transform_non_params=lambda _: rep)
  return {"step": rep, "trainable": params_sh, "opt": opt_sh}


def abstract_state(spec: StepSpec, tx: optax.GradientTransformation, shardings: dict) -> Any:
  """The state's shapes, dtypes and shardings (the target a checkpoint is restored into)."""
  shapes = jax.eval_shape(lambda t: {"step": jnp.zeros((), jnp.int32), "trainable": t, "opt": tx.init(t)},
                          _trainable_shapes(spec))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_state(trainable: Any, tx: optax.GradientTransformation, shardings: dict) -> dict:
  """A fresh state around `trainable` (which it takes over), placed in `shardings`."""
  fn = jax.jit(lambda t: {"step": jnp.zeros((), jnp.int32), "trainable": t, "opt": tx.init(t)},
               out_shardings=shardings, donate_argnums=0)
  return fn(trainable)


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> jax.sharding.NamedSharding:
  return parallel.named_sharding(mesh, BATCH_LOGICAL[:len(shape)], shape)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places a host batch on the mesh, micro-batch rows split over (data, fsdp). Every process holds the global
  batch (it is cheap to build), and each device takes its slice."""
  out = {}
  for k, v in batch.items():
    sh = batch_sharding(mesh, v.shape)
    out[k] = jax.make_array_from_callback(v.shape, sh, lambda idx, v=v: v[idx])
  return out


def micro_loss(spec: StepSpec, mesh: Mesh | None) -> Callable:
  """(trainable, frozen, teacher_params, micro-batch) -> (Σ loss, Σ tokens) of one micro-batch."""
  module = transformer.Transformer(spec.model_cfg, mesh=mesh)
  teacher_module = transformer.Transformer(spec.teacher_cfg or spec.model_cfg, mesh=mesh)

  def fn(trainable, frozen, teacher_params, mb):
    if spec.lora is None:
      params, adapters = trainable, None
    else:
      params, adapters = frozen, scaled(trainable, spec.lora)
    sft = spec.distill is None  # SFT's cross-entropy reads vocabulary-major logits (a faster head on XLA:CPU)
    logits, _ = module.apply({"params": params}, mb["tokens"], mb["positions"], mb["kv_mask"],
                             logit_idx_bn=mb["logit_idx"], adapters=adapters, shared_prefix=spec.shared_prefix,
                             vocab_first=sft)
    if sft:
      loss_bn = losses.token_nll(logits, mb["targets"], vocab_axis=0)
    else:
      d = spec.distill
      teacher_logits, _ = teacher_module.apply(
          {"params": teacher_params}, mb["teacher_tokens"], mb["teacher_positions"], mb["teacher_kv_mask"],
          logit_idx_bn=mb["teacher_logit_idx"], shared_prefix=spec.teacher_shared_prefix)
      ids = None if d.token_ids is None else jnp.asarray(np.asarray(d.token_ids, np.int32))
      loss_bn = losses.kd_token_loss(logits, teacher_logits, d.temperature, d.kd_tokens, d.topk, ids)
    return losses.masked_sum(loss_bn, mb["weights"])

  return fn


def grads_and_loss(spec: StepSpec, mesh: Mesh | None, trainable, frozen, teacher_params,
                   batch: dict) -> tuple[Any, jax.Array, jax.Array]:
  """(Σ/Σ gradient, Σ/Σ loss, Σ tokens) over the micro-batches of `batch` ([accum, micro, ...] arrays)."""
  grad_fn = jax.value_and_grad(micro_loss(spec, mesh), has_aux=True)

  def one(mb):
    (s, c), g = grad_fn(trainable, frozen, teacher_params, mb)
    return g, s, c

  accum = next(iter(batch.values())).shape[0]
  if accum == 1:
    g, s, c = one(jax.tree.map(lambda x: x[0], batch))
  else:
    def body(carry, mb):
      g, s, c = one(mb)
      return jax.tree.map(jnp.add, carry, (g, s, c)), None
    zeros = (jax.tree.map(jnp.zeros_like, trainable), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (g, s, c), _ = jax.lax.scan(body, zeros, batch)
  denom = jnp.maximum(c, 1.0)
  return jax.tree.map(lambda x: x / denom, g), s / denom, c


def make_train_step(spec: StepSpec, tx: optax.GradientTransformation, mesh: Mesh) -> Callable:
  """The jitted step `(state, frozen, teacher_params, batch) -> (state, metrics)`; the state is donated.

  Its matmuls have batch × length rows (thousands), so on CPU it is compiled without YNNPACK (see `xla_cpu`)."""
  sh = state_shardings(spec, tx, mesh)
  rep = parallel.replicated(mesh)

  def step(state, frozen, teacher_params, batch):
    grads, loss, count = grads_and_loss(spec, mesh, state["trainable"], frozen, teacher_params, batch)
    grads = jax.lax.with_sharding_constraint(grads, sh["trainable"])
    updates, opt = tx.update(grads, state["opt"], state["trainable"])
    trainable = optax.apply_updates(state["trainable"], updates)
    metrics = {"loss": loss, "loss_tokens": count, "grad_norm": optax.tree.norm(grads)}
    return {"step": state["step"] + 1, "trainable": trainable, "opt": opt}, metrics

  return xla_cpu.jit_many_rows(step, out_shardings=(sh, {"loss": rep, "loss_tokens": rep, "grad_norm": rep}),
                               donate_argnums=0)


@functools.lru_cache(maxsize=8)
def _cached(spec: StepSpec, opt_items: tuple, total_steps: int, mesh: Mesh):
  tx = optim.make_optimizer(dict(opt_items), total_steps)
  return tx, state_shardings(spec, tx, mesh), make_train_step(spec, tx, mesh)


def train_step_for(spec: StepSpec, opt_cfg: Any, total_steps: int,
                   mesh: Mesh) -> tuple[optax.GradientTransformation, dict, Callable]:
  """(optimizer, state shardings, jitted step) for a run, cached: runs with the same spec, optimizer, length and
  mesh in one process (a student and its control, a resumed run) share one compiled step."""
  opt = opt_cfg.to_dict() if hasattr(opt_cfg, "to_dict") else dict(opt_cfg)
  return _cached(spec, tuple(sorted(opt.items())), int(total_steps), mesh)
