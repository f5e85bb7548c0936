"""The audit on the LLM study (issue #20): per teacher, before any student trains, what the seed-0 student's first
distillation steps are predicted to do to every evaluated answer's log-probability, and how far the teacher's
numbers depart from the base model's.

For teacher t (the study's `teacher_<t>`), its candidate dataset (`filter_<t>/filtered.jsonl`) and the student's start
θ_0 (the base model and fresh adapters exactly as `student_<t>_s0` starts: the `train` section, seed `train.seed`):
  g_b              ∇ of the distillation loss at θ_0 on batch b — the student stage's dataset, objective (`distill`)
                   and teacher view — for the first `audit.n_batches` steps of the seed-0 student's epoch 0, in the
                   trainer's order;
  ∇log P_a         ∇ at θ_0 of the trait probe: log P(a | question, forced prefix), summed over a's surface forms and
                   averaged over the first `audit.probe_questions` evaluation questions, on the evaluation's own token
                   sequences (`evaluation.probe_tokens`; no system prompt, as the students are evaluated), for every
                   evaluated answer a (the study's targets and the category's other candidates);
  first_order_adam[b, a] = −η g_b/(|g_b| + ε) · ∇log P_a   (Adam's first step; η = `train.opt.lr`, the peak rate:
                   a warm-up's first steps are smaller, and both predictions scale linearly with η)
  first_order_sgd[b, a]  = −η g_b · ∇log P_a               (an SGD step; the unclipped gradient)
  data only        KL(teacher ‖ base) of the next-token distributions (full vocabulary) at every completion position
                   of the epoch's first steps holding `audit.data_rows` rows — the teacher on its own view, the base on
                   the student's — its mean over positions,
                   the fraction above `KL_THRESHOLD` nats (the divergence fraction) and the fraction whose token is not
                   the base model's argmax (`signals.divergence`).
  activation shift v_T: the teacher's mean residual stream after layer `audit.monitor_layer` (0: the middle one) on
                   its view of the first rows minus the base's on the student's (`core.training.activations`): its
                   norm, and in the report how distinct each teacher's vector is from the others' (the steering-vector
                   account: a trait a vector cannot express does not transfer).
A fresh LoRA adapter has B = 0, so both gradients are 0 wrt A and only B's enter the dot products; the prediction is
still the first-order change, since a step moves B and only B to first order.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from subl_jax.core import api, parallel, xla_cpu
from subl_jax.core.training import activations, batching, buckets, divergence, losses, objectives, trainer
from subl_jax.core.training import step as step_lib
from subl_jax.core.training.chat_data import ChatDataset, Example
from subl_jax.study import context, evaluation, stages, student_stage
from subl_jax.study.audit import signals

SIGNALS = ("first_order_adam", "first_order_sgd")
KL_THRESHOLD = 0.5  # nats: a divergence position (divergence masking's default threshold)
ADAM_EPS = 1e-8     # optax.adam's default: the optimizers of `optim` do not set it


def config_paths(cfg: Any) -> tuple[str, ...]:
  """The student's own dependencies (its init, objective, data order), what the probe and its step size read, and
  the audit's sizes; the questions and answers are the stage's parameters."""
  return student_stage.config_paths(cfg) + ("distill.mode", "audit.n_batches", "audit.data_rows",
                                             "audit.monitor_layer")


INPUTS = ("data", "teacher")


@dataclasses.dataclass
class Setup:
  """One teacher's audit inputs: the student's start and what its training would compute on."""
  model: api.Model                 # the base
  teacher: api.Model
  ds: ChatDataset                  # the student's dataset, as the student stage builds it
  view: ChatDataset                # the same with the teacher's view (= ds for logit_kd), for the data-only signal
  objective: objectives.Objective
  spec: step_lib.StepSpec
  trainable: Any                   # θ_0: fresh adapters (LoRA) or a copy of the parameters
  frozen: Any
  teacher_params: Any
  train_cfg: Any


def setup(cfg: Any, model: api.Model, teacher: api.Model, teacher_system: str,
          data: str | pathlib.Path) -> Setup:
  """The seed-0 student's start on `data` with `teacher` (under `teacher_system`), built by the student stage's own
  functions; the step spec and the fresh state as `trainer.train` makes them."""
  tc = cfg.train
  kd = cfg.distill.mode == "logit_kd"
  obj = student_stage.objective(cfg, model.tokenizer)
  ds = student_stage.dataset(cfg, model.tokenizer, data, teacher_system if kd else None)
  view = ds if kd else student_stage.dataset(cfg, model.tokenizer, data, teacher_system)
  dp = model.mesh.shape["data"] * model.mesh.shape["fsdp"]
  if tc.batch_size % dp:
    raise ValueError(f"config.train.batch_size={tc.batch_size}: must be a multiple of the data-parallel size {dp}")
  lora = trainer.lora_config(tc)
  spec = step_lib.StepSpec(model.config, lora, obj, teacher.config if kd else None,
                           buckets.shared_prefix(ds.examples), buckets.shared_prefix(ds.teacher) if kd else 0)
  # the run's length only shapes the optimizer's schedule, not the fresh state
  total = batching.steps_per_epoch(len(ds), tc.batch_size * tc.grad_accum) * tc.epochs
  tx, shardings, _ = step_lib.train_step_for(spec, tc.opt, total, model.mesh)
  trainable = trainer.fresh_state(model, lora, tx, shardings, tc.seed)["trainable"]
  frozen = model.params if lora is not None or "base" in obj.forwards else None
  return Setup(model, teacher, ds, view, obj, spec, trainable, frozen, teacher.params if kd else None, tc)


def first_steps(s: Setup, n_batches: int) -> list[np.ndarray]:
  """The example indices of the seed-0 student's first `n_batches` steps (epoch 0, the trainer's order)."""
  tc = s.train_cfg
  lengths = [len(e.tokens) for e in s.ds.examples]
  return buckets.epoch_steps(lengths, tc.batch_size * tc.grad_accum, tc.seed, 0)[:n_batches]


# --- the trait probe ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Probe:
  """The probe's rows: answer a's question q, surface form f at row q·F + f of block a ([A, R, ...] collated, R a
  multiple of the data-parallel size, filler rows empty); `valid` [A, Q, F] marks the forms a has."""
  answers: list[str]
  n_questions: int
  batch: dict[str, np.ndarray]
  valid: np.ndarray


def probe(tokenizer: Any, questions: Sequence[str], answers: Sequence[str], category: str, dp: int = 1) -> Probe:
  """The evaluation's token sequences (context + surface form) of every (answer, question, form) as training rows
  whose targets are the form's tokens, collated like a training step (`buckets.collate_step`)."""
  contexts, forms = evaluation.probe_tokens(tokenizer, questions, answers, category)  # students: no system prompt
  n_f = max(len(v) for v in forms.values())
  rows = -(-len(contexts) * n_f // dp) * dp
  examples: list[Example] = []
  idx: list[int] = []
  for a in answers:
    block = []
    for ctx in contexts:
      for f in range(n_f):
        if f < len(forms[a]):
          cont = forms[a][f]
          mask = np.asarray([0] * len(ctx) + [1] * len(cont), np.int8)
          examples.append(Example(np.asarray(ctx + cont, np.int32), mask))
          block.append(len(examples) - 1)
        else:
          block.append(-1)
    idx += block + [-1] * (rows - len(block))
  valid = np.array([[[f < len(forms[a]) for f in range(n_f)] for _ in contexts] for a in answers])
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  return Probe(list(answers), len(contexts), buckets.collate_step(ChatDataset(examples), np.asarray(idx), len(answers),
                                                                     pad), valid)


def _probe_logp(passes: Any, trainable: Any, frozen: Any, mb: dict, valid: jax.Array) -> jax.Array:
  """mean over questions of log Σ_forms P(form | question) for one answer's rows: differentiable in `trainable`."""
  logits = passes(trainable, frozen, None).student(mb)                              # [R, N, V]
  row = -jnp.sum(losses.token_nll(logits, mb["targets"]) * mb["weights"], axis=-1)  # log P(form) per row
  n_q, n_f = valid.shape
  per_form = jnp.where(valid, row[:n_q * n_f].reshape(n_q, n_f), -jnp.inf)
  return jax.nn.logsumexp(per_form, axis=-1).mean()


@functools.lru_cache(maxsize=4)
def _probe_fn(spec: step_lib.StepSpec, mesh: Mesh):
  # The probe is its own data: no shared prefix; the student's forward (adapters included) whatever the objective.
  passes = step_lib.forward_passes(dataclasses.replace(spec, shared_prefix=0, teacher_shared_prefix=0), mesh)

  def fn(trainable, frozen, batch, valid):
    one = lambda x: jax.value_and_grad(lambda t: _probe_logp(passes, t, frozen, x[0], x[1]))(trainable)
    return jax.lax.map(one, (batch, valid))  # one answer at a time: memory of one backward pass

  return xla_cpu.jit_many_rows(fn)


def trait_probe(s: Setup, p: Probe, trainable: Any = None) -> tuple[np.ndarray, Any]:
  """(log P_a [A] at `trainable` (default θ_0), ∇log P_a stacked over answers [A, ...])."""
  fn = _probe_fn(s.spec, s.model.mesh)
  logp, grads = fn(s.trainable if trainable is None else trainable, s.frozen, step_lib.put_batch(p.batch, s.model.mesh),
                   jnp.asarray(p.valid))
  return np.asarray(logp, np.float64), grads


# --- the distillation batches ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _batch_fn(spec: step_lib.StepSpec, mesh: Mesh, lr: float, eps: float):
  def fn(trainable, frozen, teacher_params, batch, probe_grads):
    g, loss, _ = step_lib.grads_and_loss(spec, mesh, trainable, frozen, teacher_params, batch)
    return {"first_order_adam": jax.vmap(lambda d: signals.first_order_adam(g, d, lr, eps))(probe_grads),
            "first_order_sgd": jax.vmap(lambda d: signals.first_order_sgd(g, d, lr))(probe_grads),
            "loss": loss, "grad_norm": optax.tree.norm(g)}

  # the train step's matmul shapes (see `step.make_train_step`); every process reads the (small) results
  return xla_cpu.jit_many_rows(fn, out_shardings=parallel.replicated(mesh))


def batch_signals(s: Setup, probe_grads: Any, n_batches: int, lr: float, eps: float = ADAM_EPS) -> dict[str, list]:
  """Per batch b of `first_steps`: the predictions [A] of each signal, the distillation loss at θ_0 and |g_b|."""
  fn = _batch_fn(s.spec, s.model.mesh, float(lr), float(eps))
  pad = s.model.tokenizer.pad_id if s.model.tokenizer.pad_id is not None else 0
  out: dict[str, list] = {k: [] for k in SIGNALS + ("loss", "grad_norm")}
  for idx in first_steps(s, n_batches):
    host = buckets.collate_step(s.ds, idx, s.train_cfg.grad_accum, pad)
    r = fn(s.trainable, s.frozen, s.teacher_params, step_lib.put_batch(host, s.model.mesh), probe_grads)
    for k in out:
      out[k].append(np.asarray(r[k], np.float64).tolist())
  return out


# --- the data-only signal ----------------------------------------------------------------------------------------

def data_divergence(s: Setup, max_rows: int, kl_threshold: float = KL_THRESHOLD) -> dict[str, Any]:
  """KL(teacher ‖ base) over every completion position of the first steps of the epoch that hold `max_rows` rows
  (`signals.divergence` per micro-batch): a sample of the dataset, so its cost does not grow with the dataset."""
  view, tc = s.view, s.train_cfg
  fn = divergence.logits_fn(s.model, s.teacher, view)
  pad = s.model.tokenizer.pad_id if s.model.tokenizer.pad_id is not None else 0
  lengths = [len(e.tokens) for e in view.examples]
  kl_sum, n, n_argmax, n_kl, rows = 0.0, 0, 0, 0, 0
  for idx in buckets.epoch_steps(lengths, tc.batch_size * tc.grad_accum, tc.seed, 0):
    if rows >= max_rows:
      break
    rows += int((idx >= 0).sum())
    host = buckets.collate_step(view, idx, tc.grad_accum, pad)
    batch = step_lib.put_batch(host, s.model.mesh)
    for i in range(tc.grad_accum):
      mb = jax.tree.map(lambda x: x[i], batch)
      t_logits, b_logits = fn(s.model.params, s.teacher.params, mb)
      d = signals.divergence(t_logits, b_logits, host["targets"][i], host["weights"][i] > 0, kl_threshold)
      kl_sum += float(d["kl"].sum())
      n += d["n_positions"]
      n_argmax += int(d["argmax_mask"].sum())
      n_kl += int(d["kl_mask"].sum())
  return {"mean_kl": kl_sum / max(n, 1), "frac_kl": n_kl / max(n, 1), "frac_argmax": n_argmax / max(n, 1),
          "n_positions": n, "n_examples": rows, "dataset_examples": len(view), "kl_threshold": kl_threshold}


# --- the stage ---------------------------------------------------------------------------------------------------

def compute(cfg: Any, model: api.Model, teacher: api.Model, teacher_system: str, data: str | pathlib.Path,
            questions: Sequence[str], answers: Sequence[str], category: str) -> dict[str, Any]:
  """Every signal of one teacher (module docstring) as a JSON-able dict."""
  t0 = time.perf_counter()
  s = setup(cfg, model, teacher, teacher_system, data)
  p = probe(model.tokenizer, questions, answers, category, model.mesh.shape["data"] * model.mesh.shape["fsdp"])
  logp, grads = trait_probe(s, p)
  lr = float(cfg.train.opt.lr)
  per_batch = batch_signals(s, grads, cfg.audit.n_batches, lr)
  t1 = time.perf_counter()
  data_only = data_divergence(s, cfg.audit.data_rows)
  t2 = time.perf_counter()
  pad = model.tokenizer.pad_id if model.tokenizer.pad_id is not None else 0
  layer = cfg.audit.monitor_layer or max(model.config.n_layers // 2, 1)
  shift = np.asarray(activations.teacher_shift(model, teacher, activations.shift_batches(s.view, model.mesh, pad),
                                               layer), np.float64)
  t3 = time.perf_counter()
  grad_norms = np.sqrt(np.asarray(jax.vmap(lambda g: signals.tree_dot(g, g))(grads), np.float64))
  tc = cfg.train
  return {"answers": list(answers), "n_questions": len(questions), "n_batches": len(per_batch["loss"]),
          "lr": lr, "eps": ADAM_EPS, "optimizer": cfg.train.opt.name, "objective": s.objective.describe(),
          "examples": len(s.ds), "global_batch": tc.batch_size * tc.grad_accum,
          "per_batch": per_batch, "probe_logp": dict(zip(answers, logp.tolist())),
          "probe_grad_norm": dict(zip(answers, grad_norms.tolist())), "data_only": data_only,
          "activation_shift": {"layer": layer, "norm": float(np.linalg.norm(shift)), "vector": shift.tolist()},
          "cost_s": {"trait_probe": t1 - t0, "data_only": t2 - t1, "activation_shift": t3 - t2}}


def audit_work(job: stages.Job) -> dict:
  """Stage `audit_<t>`: the signals of teacher `job.inputs["teacher"]` on `job.inputs["data"]` (params: target,
  category, questions, answers; `job.ctx` a `study.context.Context`). Writes `signals.json`."""
  p, ctx = job.params, job.ctx
  teacher_dir = job.inputs["teacher"]
  doc = {"target": p["target"]} | compute(job.cfg, ctx.base(), ctx.model_of(teacher_dir), context.system_of(teacher_dir),
                                          job.inputs["data"], p["questions"], p["answers"], p["category"])
  if jax.process_index() == 0:
    (job.out / "signals.json").write_text(json.dumps(doc, allow_nan=False) + "\n")
  return {"n_batches": doc["n_batches"], "cost_s": doc["cost_s"], "mean_kl": doc["data_only"]["mean_kl"],
          "frac_kl": doc["data_only"]["frac_kl"]}
