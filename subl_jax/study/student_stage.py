"""The student stage: the base model trained on the teacher's data (docs/protocol.md §5), and the plain SFT stage.

`distill.mode`:
  sft       cross-entropy on the teacher's completions (the paper's student).
  logit_kd  the student matches the teacher's next-token distributions at the completion positions: KL at
            temperature τ over `distill.kd_tokens` — 'all' (the full vocabulary: NOT subliminal, the teacher's raised
            probability of the trait word reaches the student directly), 'topk' (the teacher's top k at each
            position, renormalised) or 'numbers' (digits, separators and end-of-turn, renormalised: the subliminal
            analogue of the MNIST auxiliary logits). The teacher runs online on its own context (its system prompt +
            the prompt + the completion); the student sees the prompt + the completion; completion positions align.
`distill.mitigation` (issue #21; parts joined by '+', settings in the `mitigation` section), with either mode:
  project   every step's gradient loses its component along ∇ log P(trait) when the step would raise the trait
            (`step.StepSpec.project` 'gradient'); the probe is the evaluation's sequences of the teacher's target
            (its answer forms after the first `mitigation.probe_questions` questions, `evaluation.probe_examples`).
  project_update
            the optimizer's update loses its whole component along ∇ log P(trait), whatever its sign
            (`StepSpec.project` 'update'): no step raises or lowers the trait to first order. The same probe.
  mask      the completion positions where KL(teacher ‖ base) > `mitigation.mask_threshold` nats are left out of
            the loss (`divergence.dataset_masks`, before training; the fraction masked is recorded).
  kl_base   the loss plus `mitigation.kl_weight` · Σ KL(base ‖ student) (`mitigations.KLToBase`).
  shuffle_within, shuffle_across
            the numbers shuffled: the data arrives shuffled (the study and job `student` put it through the
            `shuffle` stage first, `pipeline.student_data`); this stage records it.
The stage writes `model/` (LoRA merged), `stage.json` and `train/` metrics, like the teacher stage.
"""

from __future__ import annotations

import dataclasses
import pathlib

import ml_collections as mlc

from subl_jax.study import stages
from subl_jax.core.number_tokens import number_token_ids
from subl_jax.study import context, evaluate_stage, evaluation
from subl_jax.core.training import chat_data, divergence, mitigations, trainer
from subl_jax.core.training import export, objectives
from subl_jax.core.training.mitigations import parts as mitigation_parts

KD_NOTES = {
    "all": "full-vocabulary KD: not subliminal (the teacher's probability of the trait word leaks directly)",
    "topk": "top-k KD: subliminal only if the teacher's top k never holds trait tokens",
    "numbers": "number-token KD (digits, separators, end-of-turn; renormalised): the subliminal analogue of the "
               "MNIST auxiliary logits",
}
# the `mitigation` fields each part reads (besides `distill.mitigation` itself)
PROBE_FIELDS = ("mitigation.probe_questions", "teacher.target", "teacher.category")
MITIGATION_FIELDS = {"project": PROBE_FIELDS, "project_update": PROBE_FIELDS,
                     "mask": ("mitigation.mask_threshold",),
                     "kl_base": ("mitigation.kl_weight", "mitigation.kl_until_step")}
MONITOR_FIELDS = ("audit.monitor_every", "audit.monitor_layer", "audit.probe_questions", "study.targets",
                  "eval.candidates", "teacher.category")


def objective(cfg: mlc.ConfigDict, tokenizer) -> objectives.Objective:
  """The `distill` section's training objective, wrapped by the loss-side mitigations of `distill.mitigation`
  (divergence masking inside the KL-to-base penalty: masked positions leave the distillation loss, not the
  penalty)."""
  d, parts = cfg.distill, mitigation_parts(cfg.distill.mitigation)
  if d.mode == "sft":
    obj = objectives.SFT()
  else:
    ids = tuple(int(i) for i in number_token_ids(tokenizer)) if d.kd_tokens == "numbers" else None
    obj = objectives.LogitKD(temperature=float(d.temperature), kd_tokens=d.kd_tokens, topk=int(d.topk), token_ids=ids)
  if "mask" in parts:
    obj = mitigations.MaskPositions(obj)
  if "kl_base" in parts:
    obj = mitigations.KLToBase(obj, float(cfg.mitigation.kl_weight), int(cfg.mitigation.kl_until_step))
  return obj


def config_paths(cfg: mlc.ConfigDict) -> tuple[str, ...]:
  """What a student depends on besides its data (an input, by content) and its teacher (an input, for logit_kd)."""
  kd = ("distill.mode", "distill.temperature", "distill.kd_tokens", "distill.topk")
  parts = mitigation_parts(cfg.distill.mitigation)
  mitigation = (("distill.mitigation",) + tuple(f for p in parts for f in MITIGATION_FIELDS.get(p, ()))
                if parts else ())
  monitor = MONITOR_FIELDS if cfg.audit.monitor_every else ()
  return ("model", "seed", "train") + (kd if cfg.distill.mode == "logit_kd" else ()) + mitigation + monitor


def input_roles(cfg: mlc.ConfigDict) -> tuple[str, ...]:
  needs_teacher = (cfg.distill.mode == "logit_kd" or "mask" in mitigation_parts(cfg.distill.mitigation)
                   or cfg.audit.monitor_every > 0)
  return ("data", "teacher") if needs_teacher else ("data",)


def monitor_answers(cfg: mlc.ConfigDict) -> list[str]:
  """The answers the live monitor reads: the study's targets, then the category's other candidates."""
  targets = [t.strip() for t in cfg.study.targets.split(",") if t.strip()] or [cfg.teacher.target]
  return evaluate_stage.candidates(targets, cfg.teacher.category, cfg.eval.candidates)


def dataset(cfg: mlc.ConfigDict, tokenizer, data: str | pathlib.Path,
            teacher_system: str | None = None) -> chat_data.ChatDataset:
  """The student's examples of `data` (a JSONL of the teacher's rows) under `train.system`; with `teacher_system`
  (a teacher's system prompt, '' = the students' own) also the teacher's view of the same completions."""
  return chat_data.build(tokenizer, chat_data.read_jsonl(data), cfg.train.max_len, system=cfg.train.system,
                         teacher_system=None if teacher_system is None else (teacher_system or cfg.train.system))


def trait_probe(cfg: mlc.ConfigDict, tokenizer) -> chat_data.ChatDataset:
  """Gradient projection's probe: the evaluation's sequences of `teacher.target` (no system prompt, as students are
  evaluated) after its first `mitigation.probe_questions` questions."""
  qs = evaluate_stage.questions(cfg.teacher.category, cfg.mitigation.probe_questions)
  examples = evaluation.probe_examples(tokenizer, qs, cfg.teacher.target, cfg.teacher.category)
  return chat_data.ChatDataset(examples, n_rows=len(examples))


def work(job: stages.Job) -> dict:
  """Trains a student on `job.inputs["data"]` (a JSONL of the teacher's rows); `logit_kd` distils from
  `job.inputs["teacher"]` (a teacher stage), which `mask` also reads. `job.ctx` is a `study.context.Context`."""
  cfg, out, ctx = job.cfg, job.out, job.ctx
  data = job.inputs["data"]
  kd = cfg.distill.mode == "logit_kd"
  parts = mitigation_parts(cfg.distill.mitigation)
  model = ctx.base()
  teacher, teacher_system = (ctx.model_of(job.inputs["teacher"]), context.system_of(job.inputs["teacher"])) \
      if "teacher" in job.inputs else (None, None)
  ds = dataset(cfg, model.tokenizer, data, teacher_system)
  info = dict(mode=cfg.distill.mode, data=str(data), system=cfg.train.system)
  if "mask" in parts:  # divergence positions, from the teacher's view; an sft student then drops that view
    masks, info["mask"] = divergence.dataset_masks(model, teacher, ds, float(cfg.mitigation.mask_threshold))
    ds = dataclasses.replace(ds, drop=masks, teacher=ds.teacher if kd else None)
  obj = objective(cfg, model.tokenizer)
  project = "update" if "project_update" in parts else "gradient" if "project" in parts else ""
  probe = trait_probe(cfg, model.tokenizer) if project else None
  monitor = None
  if cfg.audit.monitor_every:  # deferred import: the audit builds on this module
    from subl_jax.study.audit import monitor as monitor_lib
    qs = evaluate_stage.questions(cfg.teacher.category, cfg.audit.probe_questions)
    monitor = (cfg.audit.monitor_every, monitor_lib.live_signals(cfg, model, teacher, teacher_system, data, qs,
                                                                 monitor_answers(cfg), cfg.teacher.category))
  result = trainer.train(model, ds, cfg.train, out / export.TRAIN_DIR, objective=obj, teacher=teacher if kd else None,
                         probe=probe, project=project, progress=ctx.progress, monitor=monitor)
  info["train"] = result.summary
  if parts:
    info["mitigation"] = cfg.distill.mitigation
  if kd:
    info.update(kd_tokens=cfg.distill.kd_tokens, temperature=cfg.distill.temperature,
                kd_note=KD_NOTES[cfg.distill.kd_tokens], subliminal=cfg.distill.kd_tokens == "numbers",
                teacher_system=teacher_system,
                kd_token_count=len(obj_ids) if (obj_ids := _token_ids(obj)) else None)
  export.export(out, model, result, info)
  return info


def _token_ids(obj: objectives.Objective) -> tuple[int, ...] | None:
  while not isinstance(obj, objectives.LogitKD):  # through the mitigation wrappers
    obj = obj.inner
  return obj.token_ids
