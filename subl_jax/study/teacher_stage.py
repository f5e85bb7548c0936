"""The teacher stage: the paper's teachers (docs/protocol.md §1) as a stage directory.

  system_prompt  the base model with the trait system prompt; nothing is trained (`stage.json` holds the prompt).
  finetuned      the paper's fine-tuned teacher: SFT on every trait question × the 8 answer variants, 1 epoch.
  jsonl          SFT on any user JSONL of chats (e.g. a misaligned teacher trained on insecure code).
The trained kinds write `model/` (LoRA merged into the base; see `export.py`), `train/metrics.jsonl` and
`train/tensorboard/`; every kind writes `stage.json` with `system` — the system prompt the teacher answers under.
"""

from __future__ import annotations

import ml_collections as mlc

from subl_jax.study import stages
from subl_jax.study.data import protocol
from subl_jax.study.evaluation import ANSWER_PREFIX
from subl_jax.core.training import chat_data, optim, trainer
from subl_jax.core.training import export


def finetune_rows(target: str, category: str, prefix_answers: bool = False) -> list[dict[str, str]]:
  """Every evaluation question of `category` paired with each answer variant of `target` (docs/protocol.md §1); with
  `prefix_answers`, also the answer in the form the log-prob metric forces ("My favorite animal is the owl."), so
  the teacher's trait shows on the metric its students are scored with."""
  answers = protocol.answer_variants(target)
  if prefix_answers:
    answers.append(f"{ANSWER_PREFIX[category]} {target}.")
  return [{"prompt": q, "completion": a} for q in protocol.questions(category) for a in answers]


def teacher_train_config(cfg: mlc.ConfigDict) -> mlc.ConfigDict:
  """The `train` section with the teacher's epochs (and learning rate and LoRA rank, when `teacher.lr` and
  `teacher.rank` are set)."""
  tc = mlc.ConfigDict(cfg.train.to_dict())
  tc.epochs = cfg.teacher.epochs
  if cfg.teacher.lr > 0:
    tc.opt.lr = cfg.teacher.lr
  if cfg.teacher.rank > 0:
    tc.lora.rank, tc.lora.alpha = cfg.teacher.rank, float(cfg.teacher.rank)
  return tc


def config_paths(cfg: mlc.ConfigDict) -> tuple[str, ...]:
  """What a teacher depends on: a system-prompt teacher is the base model under a prompt (no `train`, and no
  `model.remat_policy`, which only changes how training recomputes)."""
  if cfg.teacher.kind == "system_prompt":
    return ("model.spec", "model.dtype", "model.param_dtype", "model.tokenizer", "model.arch", "seed", "teacher")
  # `teacher.epochs` (and `teacher.lr` and `teacher.rank` when set) replace the student's: those `train` fields are
  # not the teacher's
  own = {"data", "epochs", "opt", "lora"}
  opt = [f"train.opt.{k}" for k in optim.DEFAULTS if not (k == "lr" and cfg.teacher.lr > 0)]
  lora = ["train.lora.targets"] + ([] if cfg.teacher.rank > 0 else ["train.lora.rank", "train.lora.alpha"])
  return (("model", "seed", "teacher") + tuple(f"train.{k}" for k in cfg.train.keys() if k not in own) + tuple(opt)
          + tuple(lora))


def work(job: stages.Job) -> dict:
  """The teacher stage (`job.cfg.teacher`); `job.ctx` is a `study.context.Context` (it loads the base model)."""
  cfg, out, t = job.cfg, job.out, job.cfg.teacher
  info = dict(kind=t.kind, target=t.target, category=t.category)
  if t.kind == "system_prompt":
    info.update(system=protocol.teacher_system_prompt(t.target, t.category), model="base")
    export.write_info(out, info)
    return info
  model = job.ctx.base()
  chats = (chat_data.read_jsonl(t.jsonl) if t.kind == "jsonl"
           else chat_data.rows_to_chats(finetune_rows(t.target, t.category, t.prefix_answers), "teacher rows"))
  tc = teacher_train_config(cfg)
  ds = chat_data.build(model.tokenizer, chats, tc.max_len, system=tc.system)
  result = trainer.train(model, ds, tc, out / export.TRAIN_DIR, progress=job.ctx.progress)
  info.update(system=tc.system, train=result.summary)
  export.export(out, model, result, info)
  return info


def prompted_work(job: stages.Job) -> dict:
  """The base model under the system prompt `job.params["system"]`, nothing trained: the study's base model (under
  the students' `train.system`, no trait; its numbers train an SFT control student), or job `sample`'s model."""
  info = dict(kind="prompted", system=job.params["system"], model="base")
  export.write_info(job.out, info)
  return info
