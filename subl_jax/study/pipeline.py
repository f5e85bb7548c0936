"""The study, end to end (docs/design.md §1, docs/protocol.md §1-7, §10): job `study`.

For every target t of `study.targets` (one trait teacher each; several, so that a trait's transfer can be told from
drift that every teacher's student shows):
  teacher_<t>               the trait teacher (`teacher.kind`)
  sample_<t>, filter_<t>    the paper's number prompts completed by that teacher, then the paper's filter
  student_<t>_s<k>          the base model trained on those numbers, seed k (data order, adapter init)
  student_<t>_<c>_s<k>      the same on the numbers shuffled (`study.conditions`: shuffle_within, shuffle_across)
and the controls:
  base                      the base model under the students' system prompt (`train.system`), no trait. It is the
                            regular-numbers control of a `logit_kd` student (distilling the base from itself trains
                            nothing), evaluated, never trained
  sample_base, filter_base, control_s<k>
                            an `sft` study's control: a student trained the same way on the base model's numbers
  eval_icl_<t>              `study.conditions` icl: the base model with the teacher's (prompt, completion) pairs in
                            its context, no training
  student_<t>_<m>_s<k>      `study.mitigations`: the student trained with `distill.mitigation=<m>` (issue #21)
  heldout_sample_<t>, heldout_<t>, quality_base_<t>, quality_<student>
                            with mitigations: each teacher's numbers on held-out prompts, and every model's KL to its
                            teacher on them and keep rate of its own numbers (`quality_stage`)
  eval_<model>              trait evaluation of every model on every target and candidate answer
  report                    <workdir>/report.json, report.md, report.png (written on every run, from the stages)

Every step is a stage of the table in `subl_jax.study.stage_table`: a re-run skips what is unchanged, a changed field or
changed code re-runs that stage and those after it, a killed run resumes (sampling keeps finished shards, training
its checkpoints), and `--stage=NAME` runs the stages up to NAME and stops.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

import ml_collections as mlc
from jax.sharding import Mesh

from subl_jax.study import stage_table as table
from subl_jax.study import stages
from subl_jax.study.data import filter_stage, shuffle_stage
from subl_jax.study import sample_stage as sample_job
from subl_jax.study import context, evaluate_stage, quality_stage, student_stage, study_report
from subl_jax.core.training.mitigations import parts as mitigation_parts

STEPS = ("teacher", "sample", "filter", "student", "evaluate", "report")


def targets(cfg: mlc.ConfigDict) -> list[str]:
  """The study's targets: `study.targets` (comma-separated), or `teacher.target` alone."""
  listed = [t.strip() for t in cfg.study.targets.split(",") if t.strip()]
  return listed or [cfg.teacher.target]


def conditions(cfg: mlc.ConfigDict) -> list[str]:
  return [c.strip() for c in cfg.study.conditions.split(",") if c.strip()]


def target_config(cfg: mlc.ConfigDict, target: str) -> mlc.ConfigDict:
  """The config of target `target`'s teacher and students."""
  c = mlc.ConfigDict(cfg.to_dict())
  c.teacher.target = target
  return c


def seed_config(cfg: mlc.ConfigDict, seed: int) -> mlc.ConfigDict:
  """The config of training seed `seed`: `train.seed` offset by it (data order and adapter initialisation); the
  samples stay fixed, as in the paper."""
  c = mlc.ConfigDict(cfg.to_dict())
  c.train.seed = cfg.train.seed + seed
  return c


def mitigations(cfg: mlc.ConfigDict) -> list[str]:
  return [m.strip() for m in cfg.study.mitigations.split(",") if m.strip()]


def variants(cfg: mlc.ConfigDict) -> dict[str, str]:
  """Every student variant of a target: {name: its `distill.mitigation`}: '' the student itself (`distill.mitigation`
  as configured), then the shuffled-numbers conditions and `study.mitigations` (a shuffle listed in both is one)."""
  out = {"": cfg.distill.mitigation}
  out.update({c: c for c in conditions(cfg) if c.startswith("shuffle_")})
  out.update({m: m for m in mitigations(cfg)})
  return out


def student_data(run: Callable[..., pathlib.Path], cfg: mlc.ConfigDict, data: pathlib.Path, target: str,
                 shuffles: dict[str, pathlib.Path] | None = None) -> pathlib.Path:
  """The data a student of `cfg` trains on: `data`, or for a shuffling mitigation (`distill.mitigation`) the same
  rows through the `shuffle` stage (`shuffle_<mode>_<target>`, seeded by `seed`; recorded in `shuffles`)."""
  shuffle = [p for p in mitigation_parts(cfg.distill.mitigation) if p.startswith("shuffle_")]
  if not shuffle:
    return data
  mode = shuffle[0].removeprefix("shuffle_")
  out = run(table.SHUFFLE, cfg, f"shuffle_{mode}_{target}", {"data": data}, mode=mode, seed=cfg.seed)
  if shuffles is not None:
    shuffles[f"{mode}_{target}"] = out
  return out / shuffle_stage.SHUFFLED


def quality(run: Callable[..., pathlib.Path], cfg: mlc.ConfigDict, teachers: dict[str, pathlib.Path],
            base: pathlib.Path, students: dict[str, list[pathlib.Path]]) -> dict[str, list[pathlib.Path]]:
  """The quality stages of a study with mitigations: per teacher its held-out numbers (`heldout_<t>`), then the base
  and every student of that teacher (each variant, each seed) on them; {"<t>:base" or student key: stage dirs}."""
  held = quality_stage.heldout_config(cfg)
  out: dict[str, list[pathlib.Path]] = {}
  for t, tdir in teachers.items():
    sample = run(table.SAMPLE, held, f"heldout_sample_{t}", {"teacher": tdir},
                 identity=f"{sample_job.model_id(cfg)}:{t}")
    data = run(table.FILTER, held, f"heldout_{t}", {"samples": sample}) / filter_stage.FILTERED
    inputs = {"teacher": tdir, "data": data}
    out[f"{t}:base"] = [run(table.QUALITY, cfg, f"quality_base_{t}", inputs | {"model": base})]
    for key, dirs in students.items():
      if key.split(":")[0] == t:
        out[key] = [run(table.QUALITY, cfg, f"quality_{d.name}", inputs | {"model": d}) for d in dirs]
  return out


def run_study(cfg: mlc.ConfigDict, workdir: str | pathlib.Path, mesh: Mesh, stop: str = "",
              ctx: context.Context | None = None) -> dict[str, Any]:
  """Runs every stage up to `stop` (default: all, then the report); returns the report (or the stage dirs so far).
  `ctx`: the run's model loaders, when the caller shares them (the audit job); default a fresh one."""
  if stop and stop not in STEPS:
    raise ValueError(f"--stage={stop!r}: expected one of {STEPS}")
  workdir = pathlib.Path(workdir)
  ctx = ctx or context.Context(cfg, mesh, sample_job.local_mesh(cfg, mesh))
  names, conds = targets(cfg), conditions(cfg)
  sft = cfg.distill.mode == "sft"
  done: dict[str, Any] = {"targets": names, "conditions": conds, "mitigations": mitigations(cfg)}

  def run(stage: stages.Stage, c: mlc.ConfigDict, name: str, inputs: dict, **params: Any) -> pathlib.Path:
    return stages.run(stage, c, workdir, name, inputs, params, ctx=ctx)

  tcfg = {t: target_config(cfg, t) for t in names}
  teachers = {t: run(table.TEACHER, tcfg[t], f"teacher_{t}", {}) for t in names}
  base = run(table.PROMPTED, cfg, "base", {}, system=cfg.train.system)
  done["teacher"] = dict(teachers, base=base)
  if stop == "teacher":
    return done

  sources = dict(teachers, **({"base": base} if sft else {}))  # whose numbers are sampled
  samples, filtered = {}, {}
  for t, tdir in sources.items():
    samples[t] = run(table.SAMPLE, cfg, f"sample_{t}", {"teacher": tdir},
                     identity=f"{sample_job.model_id(cfg)}:{t}")
    filtered[t] = run(table.FILTER, cfg, f"filter_{t}", {"samples": samples[t]})
  done.update(sample=samples, filter=filtered)
  if stop in ("sample", "filter"):
    return done

  data = {t: filtered[t] / filter_stage.FILTERED for t in filtered}
  students: dict[str, list[pathlib.Path]] = {}
  shuffles: dict[str, pathlib.Path] = {}
  for seed in range(cfg.study.seeds):
    for t in names:
      for variant, mitigation in variants(cfg).items():  # '' is the unmitigated student
        c = seed_config(tcfg[t], seed)
        c.distill.mitigation = mitigation
        inputs = {"data": student_data(run, c, data[t], t, shuffles)}
        if "teacher" in student_stage.input_roles(c):
          inputs["teacher"] = teachers[t]
        name = f"student_{t}_{variant}_s{seed}" if variant else f"student_{t}_s{seed}"
        students.setdefault(f"{t}:{variant}" if variant else t, []).append(run(table.STUDENT, c, name, inputs))
    if sft:
      students.setdefault("control", []).append(run(table.STUDENT, seed_config(cfg, seed), f"control_s{seed}",
                                                    {"data": data["base"]}))
  done.update(student=students, shuffle=shuffles)
  if stop == "student":
    return done

  answers = evaluate_stage.candidates(names, cfg.teacher.category, cfg.eval.candidates)
  common = dict(category=cfg.teacher.category, candidates=answers)

  def evaluate(name: str, model_dir: pathlib.Path, system: str) -> pathlib.Path:
    return run(table.EVALUATE, cfg, f"eval_{name}", {"model": model_dir}, system=system, **common)

  evals: dict[str, list[pathlib.Path]] = {"base": [evaluate("base", base, "")]}
  for t in names:  # a teacher answers under its own system prompt; students, like the base, without one
    evals[f"teacher:{t}"] = [evaluate(f"teacher_{t}", teachers[t], context.system_of(teachers[t]))]
  for key, dirs in students.items():
    evals[key] = [evaluate(d.name, d, "") for d in dirs]
  if "icl" in conds:
    for t in names:
      evals[f"{t}:icl"] = [run(table.EVALUATE_ICL, cfg, f"eval_icl_{t}", {"model": base, "examples": data[t]},
                               system="", **common)]
  done["evaluate"] = evals
  if mitigations(cfg):
    done["quality"] = quality(run, cfg, teachers, base, students)
  if stop == "evaluate":
    return done
  return study_report.write(cfg, workdir, done)
