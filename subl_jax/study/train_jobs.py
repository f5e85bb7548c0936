"""The stage jobs of `subl_jax.main`: `train` (SFT on a JSONL), `teacher`, `student` and `sample` (stages in `workdir`).

They live here, not in the stage modules, because they need the stage table: a stage module that imported it would
hash every stage's code into its own fingerprint."""

from __future__ import annotations

import pathlib

import jax
import ml_collections as mlc
from jax.sharding import Mesh

from subl_jax.study import stage_table, stages
from subl_jax.study import context
from subl_jax.study import sample_stage as sample_job


def _result(stage_dir: pathlib.Path) -> dict:
  manifest = stages.read_manifest(stage_dir)
  return dict(stage=str(stage_dir), fingerprint=manifest["fingerprint"], summary=manifest["summary"])


def _data(path: str, field: str) -> pathlib.Path:
  p = pathlib.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"config.{field}={path!r}: no such JSONL file")
  return p


def run_train(cfg: mlc.ConfigDict, workdir: pathlib.Path, mesh: Mesh) -> dict:
  """SFT (full or LoRA) of `model` on `train.data` into `<workdir>/sft/model`."""
  sft = mlc.ConfigDict(cfg.to_dict())
  sft.distill.mode = "sft"
  return _result(stages.run(stage_table.STUDENT, sft, workdir, "sft", {"data": _data(cfg.train.data, "train.data")},
                            ctx=context.Context(sft, mesh)))


def run_teacher(cfg: mlc.ConfigDict, workdir: pathlib.Path, mesh: Mesh) -> dict:
  """The `teacher` section's teacher into `<workdir>/teacher`."""
  return _result(stages.run(stage_table.TEACHER, cfg, workdir, "teacher", {}, ctx=context.Context(cfg, mesh)))


def run_student(cfg: mlc.ConfigDict, workdir: pathlib.Path, mesh: Mesh) -> dict:
  """A student on `distill.data` into `<workdir>/student`; a student that reads its teacher (`logit_kd`, masking,
  monitoring) runs the teacher stage first (or reuses it), a shuffling mitigation the `shuffle` stage."""
  from subl_jax.study import pipeline, student_stage  # deferred: the pipeline imports the stage table, like this
  ctx = context.Context(cfg, mesh)
  run = lambda stage, c, name, inputs, **params: stages.run(stage, c, workdir, name, inputs, params, ctx=ctx)
  inputs = {"data": pipeline.student_data(run, cfg, _data(cfg.distill.data, "distill.data"), "data")}
  if "teacher" in student_stage.input_roles(cfg):
    inputs["teacher"] = stages.run(stage_table.TEACHER, cfg, workdir, "teacher", {}, ctx=ctx)
  return _result(stages.run(stage_table.STUDENT, cfg, workdir, "student", inputs, ctx=ctx))


def run_sample(cfg: mlc.ConfigDict, workdir: pathlib.Path, mesh: Mesh) -> dict:
  """Job `sample`: the base model's completions of the paper's prompts under `sample`'s system prompt (the paper's
  teacher prompt for `sample.target`), then the filter; returns both summaries."""
  ctx = context.Context(cfg, mesh, sample_job.local_mesh(cfg, mesh))
  teacher = stages.run(stage_table.PROMPTED, cfg, workdir, "prompted", {},
                       params={"system": sample_job.system_prompt(cfg.sample)})
  sample_dir = stages.run(stage_table.SAMPLE, cfg, workdir, "sample", {"teacher": teacher},
                          params={"identity": sample_job.model_id(cfg)}, ctx=ctx)
  filter_dir = stages.run(stage_table.FILTER, cfg, workdir, "filter", {"samples": sample_dir})
  return sample_job.summary(sample_dir, filter_dir) if jax.process_index() == 0 else {}
