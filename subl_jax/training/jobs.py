"""The training jobs of `subl_jax.main`: `train` (SFT on a JSONL), `teacher` and `student` (stages in `workdir`)."""

from __future__ import annotations

import pathlib

import ml_collections as mlc
from jax.sharding import Mesh

from subl_jax import stages
from subl_jax.training import student_stage, teacher_stage


def _result(stage_dir: pathlib.Path) -> dict:
  manifest = stages.read_manifest(stage_dir)
  return dict(stage=str(stage_dir), fingerprint=manifest["fingerprint"], summary=manifest["summary"])


def run_train(cfg: mlc.ConfigDict, workdir: pathlib.Path, mesh: Mesh) -> dict:
  """SFT (full or LoRA) of `model` on `train.data` into `<workdir>/sft/model`."""
  return _result(student_stage.run_sft(cfg, workdir, mesh))


def run_teacher(cfg: mlc.ConfigDict, workdir: pathlib.Path, mesh: Mesh) -> dict:
  """The `teacher` section's teacher into `<workdir>/teacher`."""
  return _result(teacher_stage.run(cfg, workdir, mesh))


def run_student(cfg: mlc.ConfigDict, workdir: pathlib.Path, mesh: Mesh) -> dict:
  """A student on `distill.data` into `<workdir>/student`; `logit_kd` runs the teacher stage first (or reuses it)."""
  teacher_dir = teacher_stage.run(cfg, workdir, mesh) if cfg.distill.mode == "logit_kd" else None
  return _result(student_stage.run(cfg, workdir, mesh, teacher_dir=teacher_dir))
