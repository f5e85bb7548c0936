"""The study, end to end (DESIGN.md §1, PROTOCOL.md §1-6): job `study`.

  teacher            the trait teacher (`teacher.kind`); `control_teacher`: the base model without the trait
  sample_<c>         the paper's number prompts completed by teacher c (teacher, control); `filter_<c>` after it
  student_s<i>       the base model trained on the teacher's filtered numbers (seed i); `control_s<i>` on the control's
  eval_<model>       trait evaluation of base, teacher (under its system prompt), every student and control student
  report             <workdir>/report.json, report.md, report.png (written on every run, from the stages)

Every step is a stage under the workdir (`subl_jax.stages`): a re-run skips what is unchanged, a changed field
re-runs that stage and those after it, a killed run resumes (sampling keeps finished shards, training its
checkpoints), and `--stage=NAME` runs the stages up to NAME and stops.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

import ml_collections as mlc
from jax.sharding import Mesh

from subl_jax import api
from subl_jax.data import filter_stage
from subl_jax.sampling import job as sample_job
from subl_jax.study import evaluate_stage, study_report
from subl_jax.training import export, student_stage, teacher_stage

STAGES = ("teacher", "sample", "filter", "student", "evaluate", "report")
CONDITIONS = {"student": "teacher", "control": "control"}  # student condition -> whose numbers it learns from


class Models:
  """Loads models when a stage needs them: the base once, trained stages from their directories."""

  def __init__(self, cfg: mlc.ConfigDict, mesh: Mesh):
    self.cfg, self.mesh, self._base = cfg, mesh, None

  def base(self) -> api.Model:
    if self._base is None:
      self._base = api.from_config(self.cfg.model, self.mesh, seed=self.cfg.seed)
    return self._base

  def of_stage(self, stage_dir: pathlib.Path) -> Callable[[], api.Model]:
    """A loader of a teacher or student stage's model (the base model for a system-prompt or control teacher)."""
    return lambda: teacher_stage.load(stage_dir, self.cfg, self.mesh, load_base=self.base)[0]


def seed_config(cfg: mlc.ConfigDict, seed: int) -> mlc.ConfigDict:
  """The config of training seed `seed`: `train.seed` offset by it (data order and adapter initialisation)."""
  c = mlc.ConfigDict(cfg.to_dict())
  c.train.seed = cfg.train.seed + seed
  return c


def run_study(cfg: mlc.ConfigDict, workdir: str | pathlib.Path, mesh: Mesh, stop: str = "") -> dict[str, Any]:
  """Runs every stage up to `stop` (default: all, then the report); returns the report (or the stage dirs so far)."""
  if stop and stop not in STAGES:
    raise ValueError(f"--stage={stop!r}: expected one of {STAGES}")
  workdir = pathlib.Path(workdir)
  models = Models(cfg, mesh)
  done: dict[str, Any] = {}

  teachers = {"teacher": teacher_stage.run(cfg, workdir, mesh, load_base=models.base),
              "control": teacher_stage.run_control(cfg, workdir)}
  done["teacher"] = teachers
  systems = {cond: export.read_info(tdir)["system"] for cond, tdir in teachers.items()}  # what each answers under
  if stop == "teacher":
    return done

  sample_mesh = sample_job.local_mesh(cfg, mesh)
  sample_models = Models(cfg, sample_mesh) if sample_mesh is not mesh else models
  samples, filtered = {}, {}
  for cond, tdir in teachers.items():
    samples[cond], filtered[cond] = sample_job.sample_and_filter(
        cfg, workdir, sample_mesh, sample_models.of_stage(tdir), f"{sample_job.model_id(cfg)}:{cond}",
        systems[cond], {"teacher": tdir}, names=(f"sample_{cond}", f"filter_{cond}"))
  done.update(sample=samples, filter=filtered)
  if stop in ("sample", "filter"):
    return done

  students: dict[str, list[pathlib.Path]] = {c: [] for c in CONDITIONS}
  for seed in range(cfg.study.seeds):
    sc = seed_config(cfg, seed)
    for cond, source in CONDITIONS.items():
      students[cond].append(student_stage.run(
          sc, workdir, mesh, data=filtered[source] / filter_stage.FILTERED, teacher_dir=teachers[source],
          name=f"{cond}_s{seed}", load_base=models.base))
  done["student"] = students
  if stop == "student":
    return done

  base_config = dict(model=cfg.model.to_dict(), seed=cfg.seed)
  evals = {
      "base": [evaluate_stage.run(cfg, workdir, "eval_base", models.base, "", {}, base_config)],
      "teacher": [evaluate_stage.run(cfg, workdir, "eval_teacher", models.of_stage(teachers["teacher"]),
                                     systems["teacher"], {"model": teachers["teacher"]}, base_config)],
  }
  for cond, dirs in students.items():  # students answer without the teacher's system prompt, like the base
    evals[cond] = [evaluate_stage.run(cfg, workdir, f"eval_{d.name}", models.of_stage(d), "", {"model": d},
                                      base_config) for d in dirs]
  done["evaluate"] = evals
  if stop == "evaluate":
    return done
  return study_report.write(cfg, workdir, done)
