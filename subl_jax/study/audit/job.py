"""Job `audit`: the transfer audit of a distillation, with its calibration against realised transfer.

`audit.study='mnist'`: for each m in `audit.n_aux` the MNIST auxiliary-logit study runs in `<workdir>/m<m>/` (its
stages are cached like any study's), then one `audit_<condition>` stage per student condition computes every
signal for every model (`mnist_audit`), and `audit.json` / `audit.md` / `audit.png` calibrate each signal against the
students' accuracies.

`audit.study='llm'`: the config's LLM study runs (or is found cached) up to its filtered numbers — the teachers and
the candidate datasets, what the audit needs — then one `audit_<t>` stage per teacher computes its signals before
any student trains (`llm_audit`). If the study's students are complete in the same workdir (job 'study' with the
same config ran there; nothing is trained to find out), their evaluations are read (and run if missing) and
`audit.json` / `audit.md` calibrate the predictions against the realised transfer matrix (`llm_report`); otherwise
the report says which stage is missing and gives the predictions alone.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
from jax.sharding import Mesh

from subl_jax.study import context, evaluate_stage, evaluation, pipeline, sample_stage, stage_table, stages
from subl_jax.study import study_report
from subl_jax.core.training import export, metrics_log
from subl_jax.study.audit import llm_report, mnist_report
from subl_jax.study.data import filter_stage
from subl_jax.study.mnist import job as mnist_job, study as mnist_study

def run_mnist(cfg: Any, workdir: pathlib.Path, mesh: Mesh) -> dict[str, Any]:
  points = []
  for m in (int(v) for v in cfg.audit.n_aux.split(",") if v.strip()):  # validated by config.validate
    c = cfg.copy_and_resolve_references()
    c.mnist.n_aux = m
    sub = workdir / f"m{m}"
    s = mnist_study.make_setup(c.mnist, c.seed, mesh)
    print(f"audit: MNIST study with m={m} in {sub}", flush=True)
    dirs = mnist_job.run_stages(c, s, sub)
    for condition in mnist_study.STUDENTS:
      d = stages.run(stage_table.MNIST_AUDIT, c, sub, f"audit_{condition}",
                     {"inits": dirs["inits"], "teacher": dirs["teacher"], "student": dirs[condition]},
                     {"condition": condition}, ctx=s)
      points.append(json.loads((d / "signals.json").read_text()))
  doc = mnist_report.write(workdir, points, cfg.audit.transfer_threshold)
  print((workdir / "audit.md").read_text(), flush=True)
  return {"calibration": {k: {"auroc": v["models"]["auroc"], "spearman": v["models"]["spearman"]}
                          for k, v in doc["calibration"].items()}, "cost_fraction": doc["cost_fraction"]}


def run_llm(cfg: Any, workdir: pathlib.Path, mesh: Mesh) -> dict[str, Any]:
  workdir = pathlib.Path(workdir)
  ctx = context.Context(cfg, mesh, sample_stage.local_mesh(cfg, mesh))
  dirs = pipeline.run_study(cfg, workdir, mesh, stop="filter", ctx=ctx)
  targets, category = dirs["targets"], cfg.teacher.category
  answers = evaluate_stage.candidates(targets, category, cfg.eval.candidates)
  qs = evaluate_stage.questions(category, cfg.eval.n_questions)  # the probe: the evaluation's first questions
  qs = (evaluation.with_number_prefixes(qs) if cfg.eval.numbers_prefix else qs)[:cfg.audit.probe_questions]
  points, audit_s = {}, {}
  for t in targets:
    c = pipeline.seed_config(pipeline.target_config(cfg, t), 0)  # the config student_<t>_s0 trains under
    d = stages.run(stage_table.LLM_AUDIT, c, workdir, f"audit_{t}",
                   {"data": dirs["filter"][t] / filter_stage.FILTERED, "teacher": dirs["teacher"][t]},
                   dict(target=t, category=category, questions=qs, answers=answers), ctx=ctx)
    points[t] = json.loads((d / "signals.json").read_text())
    audit_s[t] = stages.read_manifest(d)["wall_s"]
  data = train_s = missing = step_s = None
  try:
    with stages.only_cached():  # are the study's students here? (asks the study's own stages; trains nothing)
      pipeline.run_study(cfg, workdir, mesh, stop="student", ctx=ctx)
  except stages.NotCached as e:
    missing = e.name
  else:
    done = pipeline.run_study(cfg, workdir, mesh, stop="evaluate", ctx=ctx)
    data = study_report.students_data(cfg, done)
    train_s = {t: [stages.read_manifest(d)["wall_s"] for d in done["student"][t]] for t in targets}
    step_s = {t: _median_step_s(done["student"][t]) for t in targets}
  doc = llm_report.write(workdir, points, targets, answers, data, train_s, audit_s, missing, step_s)
  print((workdir / "audit.md").read_text(), flush=True)
  cal = doc["calibration"] or {}
  return {"calibration": {k: {"spearman": v["cells"]["spearman"], "auroc": v["cells"]["auroc"]}
                          for k, v in cal.items() if "cells" in v},
          "missing": doc.get("missing"), "cost_fraction": doc["cost"].get("total_fraction")}


def _median_step_s(student_dirs: list[pathlib.Path]) -> float:
  """A student's training time per step: the median over its logged intervals (each `interval_s` over the steps
  since the previous row; the first row, which includes compilation, has none)."""
  per = []
  for d in student_dirs:
    rows = [r for r in metrics_log.read(d / export.TRAIN_DIR) if "loss" in r]
    per += [r["interval_s"] / (r["step"] - prev["step"]) for prev, r in zip(rows, rows[1:]) if "interval_s" in r]
  return float(np.median(per)) if per else float("nan")


def run_audit(cfg: Any, workdir: pathlib.Path, mesh: Mesh) -> dict[str, Any]:
  return {"mnist": run_mnist, "llm": run_llm}[cfg.audit.study](cfg, workdir, mesh)
