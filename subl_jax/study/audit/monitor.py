"""Live monitoring of a student's training (issue #20): the audit's signals every `audit.monitor_every` steps, as rows
of the student's `train/metrics.jsonl` (and TensorBoard) with `monitor_*` keys; the study report plots them per
condition (`monitor_plot`).

At step s (0 = the student's start), with θ_s the trained parameters (the adapters for LoRA) and θ_r the previous
monitor point's:
  monitor_logp_<a>       the trait probe log P(a | question, forced prefix) over the first `audit.probe_questions`
                         evaluation questions (`llm_audit.trait_probe`), for every evaluated answer a: the student's
                         trait, read as it forms
  monitor_cos_<a>        cos(θ_s − θ_r, ∇ log P_a(θ_s)): does the recent update point where a rises (Kitkana & Arora)
  monitor_cos_teacher, monitor_recovered
                         the student's displacement (merged LoRA delta, or θ_s − θ_0) against the teacher's θ_T − θ_0:
                         cosine and recovered fraction (only for a teacher with weights of its own)
  monitor_act_cos        cos(v_S, v_T) of the mean residual-stream shifts after layer `audit.monitor_layer`
                         (`core.training.activations`) over the loss positions of the dataset's first
                         `activations.SHIFT_EXAMPLES` rows: v_T the teacher's (its view) minus the base's, v_S the student's
                         minus the base's (Blank et al.'s steering-vector account)
The signals read the trainable state only, so monitoring never changes what is trained (tested).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from subl_jax.core import api
from subl_jax.core.lora import merge
from subl_jax.core.training import activations
from subl_jax.study.audit import llm_audit, signals

def layer_of(cfg: Any, n_layers: int) -> int:
  """`audit.monitor_layer`, with 0 meaning the middle layer."""
  return cfg.audit.monitor_layer or max(n_layers // 2, 1)


@dataclasses.dataclass
class LiveSignals:
  """Callable on the trainable state -> {signal: float}; stateful (the previous point's parameters)."""
  setup: llm_audit.Setup
  probe: llm_audit.Probe
  layer: int
  displacement: Any = None     # θ_T − θ_0 of a teacher with its own weights, else None
  v_teacher: Any = None        # the teacher's activation shift [d_model]
  batches: tuple = ()          # (student micro-batch, teacher-view micro-batch) of the activation rows
  previous: Any = None

  def __call__(self, trainable: Any) -> dict[str, float]:
    s, out = self.setup, {}
    logp, grads = llm_audit.trait_probe(s, self.probe, trainable)
    for i, a in enumerate(self.probe.answers):
      out[f"monitor_logp_{a}"] = float(logp[i])
      if self.previous is not None:
        update = signals.tree_sub(trainable, self.previous)
        out[f"monitor_cos_{a}"] = float(signals.cosine(update, jax.tree.map(lambda g: g[i], grads)))
    lora, cfg, mesh = s.spec.lora, s.model.config, s.model.mesh
    student = self.batches[0]
    base_h = activations.mean_hidden(cfg, self.layer, mesh, s.model.params, student)
    if lora is not None:
      v_s = activations.mean_hidden(cfg, self.layer, mesh, s.model.params, student, trainable, lora) - base_h
    else:
      v_s = activations.mean_hidden(cfg, self.layer, mesh, trainable, student) - base_h
    out["monitor_act_cos"] = float(signals.cosine(v_s, self.v_teacher))
    out["monitor_act_norm"] = float(jnp.linalg.norm(v_s))
    if self.displacement is not None:
      delta = _student_delta(s.model.params, trainable, lora)
      out["monitor_cos_teacher"] = float(signals.cosine(delta, self.displacement))
      out["monitor_recovered"] = float(signals.recovered_fraction(delta, self.displacement))
    self.previous = jax.tree.map(jnp.copy, trainable)
    return out


@jax.jit
def _sub(a: Any, b: Any) -> Any:
  return signals.tree_sub(a, b)


def _student_delta(base: Any, trainable: Any, lora: Any) -> Any:
  if lora is None:
    return _sub(trainable, base)
  return jax.jit(lambda p, a: signals.tree_sub(merge(p, a, lora), p))(base, trainable)


def live_signals(cfg: Any, model: api.Model, teacher: api.Model, teacher_system: str, data: Any,
                 questions: Sequence[str], answers: Sequence[str], category: str) -> LiveSignals:
  """The monitor of the student `cfg` trains on `data` (the student stage's own dataset and start) against
  `teacher` (a system-prompt teacher is the base model under `teacher_system`)."""
  s = llm_audit.setup(cfg, model, teacher, teacher_system, data)
  p = llm_audit.probe(model.tokenizer, questions, answers, category, model.mesh.shape["data"] * model.mesh.shape["fsdp"])
  pad = model.tokenizer.pad_id if model.tokenizer.pad_id is not None else 0
  batches = activations.shift_batches(s.view, model.mesh, pad)  # s.view: the dataset with the teacher's view
  layer = layer_of(cfg, model.config.n_layers)
  live = LiveSignals(s, p, layer, batches=batches, v_teacher=activations.teacher_shift(model, teacher, batches, layer))
  if teacher.params is not model.params:  # a teacher with weights of its own
    live.displacement = _sub(teacher.params, model.params)
  return live
