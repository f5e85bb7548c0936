"""The teacher stage: the paper's teachers (PROTOCOL.md §1) as a stage directory.

  system_prompt  the base model with the trait system prompt; nothing is trained (`stage.json` holds the prompt).
  finetuned      the paper's fine-tuned teacher: SFT on every trait question × the 8 answer variants, 1 epoch.
  jsonl          SFT on any user JSONL of chats (e.g. a misaligned teacher trained on insecure code).
The trained kinds write `model/` (LoRA merged into the base; see `export.py`), `train/metrics.jsonl` and
`train/tensorboard/`; every kind writes `stage.json` with `system` — the system prompt the teacher answers under.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

import ml_collections as mlc
from jax.sharding import Mesh

from subl_jax import api, stages
from subl_jax.data import protocol
from subl_jax.training import chat_data, export, trainer

STAGE = "teacher"


def finetune_rows(target: str, category: str) -> list[dict[str, str]]:
  """Every evaluation question of `category` paired with each answer variant of `target` (PROTOCOL.md §1)."""
  answers = protocol.answer_variants(target)
  return [{"prompt": q, "completion": a} for q in protocol.questions(category) for a in answers]


def teacher_train_config(cfg: mlc.ConfigDict) -> mlc.ConfigDict:
  """The `train` section with the teacher's epochs (and learning rate, when `teacher.lr` is set)."""
  tc = mlc.ConfigDict(cfg.train.to_dict())
  tc.epochs = cfg.teacher.epochs
  if cfg.teacher.lr > 0:
    tc.opt.lr = cfg.teacher.lr
  return tc


def stage_config(cfg: mlc.ConfigDict) -> dict[str, Any]:
  """What the teacher depends on (its manifest hash): a system-prompt teacher does not depend on `train`."""
  out = dict(model=cfg.model.to_dict(), teacher=cfg.teacher.to_dict(), seed=cfg.seed)
  if cfg.teacher.kind != "system_prompt":
    out["train"] = teacher_train_config(cfg).to_dict()
  return out


def run(cfg: mlc.ConfigDict, workdir: str | pathlib.Path, mesh: Mesh,
        load_base: Callable[[], api.Model] | None = None, progress: bool = True) -> pathlib.Path:
  """Runs (or skips, or resumes) the teacher stage; returns its directory. `load_base`: returns the base model of
  `cfg.model` (not modified; called only when the stage runs), else it is loaded from the config."""
  t = cfg.teacher

  def fn(out: pathlib.Path) -> dict:
    info = dict(kind=t.kind, target=t.target, category=t.category)
    if t.kind == "system_prompt":
      info.update(system=protocol.teacher_system_prompt(t.target, t.category), model="base")
      export.write_info(out, info)
      return info
    model = load_base() if load_base else api.from_config(cfg.model, mesh, seed=cfg.seed)
    chats = (chat_data.read_jsonl(t.jsonl) if t.kind == "jsonl"
             else chat_data.rows_to_chats(finetune_rows(t.target, t.category), "teacher rows"))
    tc = teacher_train_config(cfg)
    ds = chat_data.build(model.tokenizer, chats, tc.max_len, system=tc.system)
    result = trainer.train(model, ds, tc, out / export.TRAIN_DIR, progress=progress)
    info.update(system=tc.system, train=result.summary)
    export.export(out, model, result, info)
    return info

  return stages.run_stage(workdir, STAGE, stage_config(cfg), {}, fn)


def run_control(cfg: mlc.ConfigDict, workdir: str | pathlib.Path, name: str = "control_teacher") -> pathlib.Path:
  """The control's "teacher": the base model itself under the students' system prompt (`train.system`), with no
  trait. Its numbers train the control student, and a `logit_kd` control student distils from it."""

  def fn(out: pathlib.Path) -> dict:
    info = dict(kind="base", system=cfg.train.system, model="base")
    export.write_info(out, info)
    return info

  return stages.run_stage(workdir, name, dict(model=cfg.model.to_dict(), system=cfg.train.system, seed=cfg.seed),
                          {}, fn)


def load(stage_dir: str | pathlib.Path, cfg: mlc.ConfigDict, mesh: Mesh,
         load_base: Callable[[], api.Model] | None = None) -> tuple[api.Model, str]:
  """(the teacher model, the system prompt it answers under; '' = the chat template's default). A system-prompt
  or control teacher is the base model: `load_base()` if given (called only then), else loaded from the config."""
  info = export.read_info(stage_dir)
  if info["model"] == export.MODEL_DIR:
    m = cfg.model
    model = api.load(export.model_spec(stage_dir), mesh, dtype=m.dtype, param_dtype=m.param_dtype,
                     remat_policy=m.remat_policy)
  else:  # the base model itself (a 'random' base is rebuilt from the same seed)
    model = load_base() if load_base else api.from_config(cfg.model, mesh, seed=cfg.seed)
  return model, info["system"]
