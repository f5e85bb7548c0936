"""The train step: any objective (`objectives.py`), full or LoRA, with gradient accumulation inside one jit.

The state `{"step", "trainable", "opt"}` holds only what is trained: every parameter for full fine-tuning, the
adapters for LoRA (the frozen base is a separate, undonated argument). Each micro-batch's loss is a masked
(Σ loss, Σ tokens) pair; the step sums both, and the gradients of Σ loss, over the `lax.scan` of micro-batches and
over all devices, and divides once — the mean over every loss token of the step, however it is split.

With `StepSpec.project` (projection off the trait, issue #21) the step also takes a probe batch (collated examples
whose completions are the trait's answers) and d = ∇ log P(probe completions) at the current parameters:
  'gradient'  the accumulated gradient, before the optimizer sees it, loses its component along d whenever the
              descent step would raise the trait (`mitigations.project_off`). Adam's per-coordinate rescaling then
              need not keep the update orthogonal to d (plain SGD does), and a step that lowers the trait keeps it.
  'update'    the optimizer's update loses its component along d whatever its sign
              (`mitigations.project_update_off`): every step is orthogonal to d, the trait held to first order.
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
from subl_jax.core.models.config import ModelConfig, Perf
from subl_jax.core.training import mitigations, objectives, optim
from subl_jax.core.lora import LoraConfig, adapter_logical_names, adapter_shapes, scaled

BATCH_LOGICAL = (None, "batch", "length")  # [accum, micro, T or N]: micro-batches split over (data, fsdp)
PROJECT = ("", "gradient", "update")  # StepSpec.project: none, or what is projected off the trait direction


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What the step computes; hashable, so one compiled step serves a run."""
  model_cfg: ModelConfig
  lora: LoraConfig | None = None
  objective: objectives.Objective = objectives.SFT()
  teacher_cfg: ModelConfig | None = None  # defaults to model_cfg
  shared_prefix: int = 0          # leading input tokens every row shares, run once (see `buckets.shared_prefix`)
  teacher_shared_prefix: int = 0  # the same for the teacher's view
  project: str = ""               # '' or projection off the probe's log-likelihood gradient: 'gradient', 'update'

  def __post_init__(self):
    if self.project not in PROJECT:
      raise ValueError(f"StepSpec.project={self.project!r}: expected one of {PROJECT}")


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


def forward_passes(spec: StepSpec, mesh: Mesh | None, perf: Perf | None = None) -> Callable:
  """(trainable, frozen, teacher_params, step=0) -> the model passes an objective asks for (`objectives.Forward`).
  `frozen` is the base model: the parameters LoRA adapts, or for full fine-tuning the initial parameters, needed
  then only by a `base` pass (else None)."""
  perf = transformer.default_perf() if perf is None else perf  # the model's layouts (`Perf`)
  model = lambda cfg, vocab_major: transformer.Transformer(cfg, mesh, perf.replace(vocab_major_head=vocab_major))
  student_modules = {vf: model(spec.model_cfg, vf and perf.vocab_major_head) for vf in (False, True)}
  teacher_module = model(spec.teacher_cfg or spec.model_cfg, False)

  def fn(trainable, frozen, teacher_params, step=0):
    if spec.lora is None:
      params, adapters = trainable, None
    else:
      params, adapters = frozen, scaled(trainable, spec.lora)

    def student(mb, vocab_first=False):
      module = student_modules[vocab_first]
      inputs = transformer.train_inputs(mb["tokens"], mb["positions"], mb["kv_mask"], spec.shared_prefix)
      logits = module.apply({"params": params}, inputs, logit_idx_bn=mb["logit_idx"], adapters=adapters).logits
      # [V, b, n] as asked: from the vocabulary-major head where `perf` picks it, else transposed
      return jnp.moveaxis(logits, -1, 0) if vocab_first and not module.perf.vocab_major_head else logits

    def teacher(mb):
      inputs = transformer.train_inputs(mb["teacher_tokens"], mb["teacher_positions"], mb["teacher_kv_mask"],
                                        spec.teacher_shared_prefix)
      return teacher_module.apply({"params": teacher_params}, inputs, logit_idx_bn=mb["teacher_logit_idx"]).logits

    def base(mb):
      if frozen is None:
        raise ValueError("a 'base' pass with full fine-tuning needs the initial parameters as `frozen`")
      inputs = transformer.train_inputs(mb["tokens"], mb["positions"], mb["kv_mask"], spec.shared_prefix)
      logits = student_modules[False].apply({"params": frozen}, inputs, logit_idx_bn=mb["logit_idx"]).logits
      return jax.lax.stop_gradient(logits)  # full fine-tuning: `frozen` is not differentiated, but say it

    return objectives.Forward(student, teacher, perf.vocab_major_head, base, step)

  return fn


def micro_loss(spec: StepSpec, mesh: Mesh | None, perf: Perf | None = None) -> Callable:
  """(trainable, frozen, teacher_params, micro-batch, step=0) -> (Σ loss, Σ tokens) of one micro-batch: the
  objective's, with the model passes it asks for (`forward_passes`)."""
  passes = forward_passes(spec, mesh, perf)

  def fn(trainable, frozen, teacher_params, mb, step=0):
    return spec.objective.micro_loss(passes(trainable, frozen, teacher_params, step), mb)

  return fn


def grads_and_loss(spec: StepSpec, mesh: Mesh | None, trainable, frozen, teacher_params, batch: dict,
                   step: jax.Array | int = 0) -> tuple[Any, jax.Array, jax.Array]:
  """(Σ/Σ gradient, Σ/Σ loss, Σ tokens) over the micro-batches of `batch` ([accum, micro, ...] arrays) at train
  step `step` (for an objective's schedule)."""
  grad_fn = jax.value_and_grad(micro_loss(spec, mesh), has_aux=True)

  def one(mb):
    (s, c), g = grad_fn(trainable, frozen, teacher_params, mb, step)
    return g, s, c

  accum = next(iter(batch.values())).shape[0]
  if accum == 1:
    g, s, c = one(jax.tree.map(lambda x: x[0], batch))
  else:
    def body(carry, mb):
      g, s, c = one(mb)
      return jax.tree.map(jnp.add, carry, (g, s, c)), None
    first = jax.eval_shape(one, jax.tree.map(lambda x: x[0], batch))  # the sums' dtypes: float32, or wider
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), first)
    (g, s, c), _ = jax.lax.scan(body, zeros, batch)
  denom = jnp.maximum(c, 1.0)
  return jax.tree.map(lambda x: x / denom, g), s / denom, c


def probe_direction(spec: StepSpec, mesh: Mesh | None, trainable, frozen, probe: dict) -> Any:
  """∇ log P(probe completions) (the mean over their tokens) at `trainable`: the direction that raises the trait."""
  # the probe is its own data: no shared prefix assumed, the student's cross-entropy whatever the objective
  nll_spec = dataclasses.replace(spec, objective=objectives.SFT(), shared_prefix=0, project="")
  return jax.tree.map(jnp.negative, grads_and_loss(nll_spec, mesh, trainable, frozen, None, probe)[0])


def make_train_step(spec: StepSpec, tx: optax.GradientTransformation, mesh: Mesh) -> Callable:
  """The jitted step `(state, frozen, teacher_params, batch, probe=None) -> (state, metrics)`; the state is donated.
  `probe` (a collated batch, [accum, micro, ...]) is for `spec.project`, which adds the metric `projected` (1 when
  the step was projected); `grad_norm` is the objective's gradient's, before any projection.

  Its matmuls have batch × length rows (thousands), so on CPU it is compiled without YNNPACK (see `xla_cpu`)."""
  sh = state_shardings(spec, tx, mesh)
  rep = parallel.replicated(mesh)

  def step(state, frozen, teacher_params, batch, probe=None):
    grads, loss, count = grads_and_loss(spec, mesh, state["trainable"], frozen, teacher_params, batch, state["step"])
    metrics = {"loss": loss, "loss_tokens": count, "grad_norm": optax.tree.norm(grads)}
    if spec.project:
      if probe is None:
        raise ValueError(f"StepSpec.project={spec.project!r}: the step needs a probe batch (the trait's examples)")
      direction = probe_direction(spec, mesh, state["trainable"], frozen, probe)
    if spec.project == "gradient":
      grads, projected = mitigations.project_off(grads, direction)
    grads = jax.lax.with_sharding_constraint(grads, sh["trainable"])
    updates, opt = tx.update(grads, state["opt"], state["trainable"])
    if spec.project == "update":
      updates, projected = mitigations.project_update_off(updates, direction)
    if spec.project:
      metrics["projected"] = projected.astype(jnp.float32)
    trainable = optax.apply_updates(state["trainable"], updates)
    return {"step": state["step"] + 1, "trainable": trainable, "opt": opt}, metrics

  metric_sh = {k: rep for k in ("loss", "loss_tokens", "grad_norm") + (("projected",) if spec.project else ())}
  return xla_cpu.jit_many_rows(step, out_shardings=(sh, metric_sh), donate_argnums=0)


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
