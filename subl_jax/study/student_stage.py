"""The student stage: the base model trained on the teacher's data (docs/protocol.md §5), and the plain SFT stage.

`distill.mode`:
  sft       cross-entropy on the teacher's completions (the paper's student).
  logit_kd  the student matches the teacher's next-token distributions at the completion positions: KL at
            temperature τ over `distill.kd_tokens` — 'all' (the full vocabulary: NOT subliminal, the teacher's raised
            probability of the trait word reaches the student directly), 'topk' (the teacher's top k at each
            position, renormalised) or 'numbers' (digits, separators and end-of-turn, renormalised: the subliminal
            analogue of the MNIST auxiliary logits). The teacher runs online on its own context (its system prompt +
            the prompt + the completion); the student sees the prompt + the completion; completion positions align.
The stage writes `model/` (LoRA merged), `stage.json` and `train/` metrics, like the teacher stage.
"""

from __future__ import annotations

import pathlib

import ml_collections as mlc

from subl_jax.study import stages
from subl_jax.core.number_tokens import number_token_ids
from subl_jax.study import context
from subl_jax.core.training import chat_data, trainer
from subl_jax.core.training import export, objectives

KD_NOTES = {
    "all": "full-vocabulary KD: not subliminal (the teacher's probability of the trait word leaks directly)",
    "topk": "top-k KD: subliminal only if the teacher's top k never holds trait tokens",
    "numbers": "number-token KD (digits, separators, end-of-turn; renormalised): the subliminal analogue of the "
               "MNIST auxiliary logits",
}


def objective(cfg: mlc.ConfigDict, tokenizer) -> objectives.Objective:
  """The `distill` section's training objective."""
  d = cfg.distill
  if d.mode == "sft":
    return objectives.SFT()
  ids = tuple(int(i) for i in number_token_ids(tokenizer)) if d.kd_tokens == "numbers" else None
  return objectives.LogitKD(temperature=float(d.temperature), kd_tokens=d.kd_tokens, topk=int(d.topk), token_ids=ids)


def config_paths(cfg: mlc.ConfigDict) -> tuple[str, ...]:
  """What a student depends on besides its data (an input, by content) and its teacher (an input, for logit_kd)."""
  kd = ("distill.mode", "distill.temperature", "distill.kd_tokens", "distill.topk")
  return ("model", "seed", "train") + (kd if cfg.distill.mode == "logit_kd" else ())


def input_roles(cfg: mlc.ConfigDict) -> tuple[str, ...]:
  return ("data", "teacher") if cfg.distill.mode == "logit_kd" else ("data",)


def dataset(cfg: mlc.ConfigDict, tokenizer, data: str | pathlib.Path,
            teacher_system: str | None = None) -> chat_data.ChatDataset:
  """The student's examples of `data` (a JSONL of the teacher's rows) under `train.system`; with `teacher_system`
  (a teacher's system prompt, '' = the students' own) also the teacher's view of the same completions."""
  return chat_data.build(tokenizer, chat_data.read_jsonl(data), cfg.train.max_len, system=cfg.train.system,
                         teacher_system=None if teacher_system is None else (teacher_system or cfg.train.system))


def work(job: stages.Job) -> dict:
  """Trains a student on `job.inputs["data"]` (a JSONL of the teacher's rows); `logit_kd` distils from
  `job.inputs["teacher"]` (a teacher stage). `job.ctx` is a `study.context.Context`."""
  cfg, out, ctx = job.cfg, job.out, job.ctx
  data = job.inputs["data"]
  kd = cfg.distill.mode == "logit_kd"
  model = ctx.base()
  teacher, teacher_system = (ctx.model_of(job.inputs["teacher"]), context.system_of(job.inputs["teacher"])) if kd \
      else (None, None)
  ds = dataset(cfg, model.tokenizer, data, teacher_system if kd else None)
  obj = objective(cfg, model.tokenizer)
  result = trainer.train(model, ds, cfg.train, out / export.TRAIN_DIR, objective=obj, teacher=teacher,
                         progress=ctx.progress)
  info = dict(mode=cfg.distill.mode, data=str(data), system=cfg.train.system, train=result.summary)
  if kd:
    info.update(kd_tokens=cfg.distill.kd_tokens, temperature=cfg.distill.temperature,
                kd_note=KD_NOTES[cfg.distill.kd_tokens], subliminal=cfg.distill.kd_tokens == "numbers",
                teacher_system=teacher_system,
                kd_token_count=len(obj.token_ids) if obj.token_ids else None)
  export.export(out, model, result, info)
  return info
