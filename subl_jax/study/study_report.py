"""The study's report: conditions side by side (base, teacher, student, control) with 95 % CIs, the paired
student-minus-control differences, other answers (is a shift trait-specific?), keep rates, training losses and wall
times; `report.json`, `report.md`, `report.png` (see `subl_jax.report`), the table printed.

Intervals: each condition's metric is the mean over questions (per-question values averaged over training seeds)
with a t-interval over questions; with several seeds the students' and controls' means are also summarised over
seeds (`across_seeds`), and student - control is paired by question and, with seeds, by seed.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections as mlc
import numpy as np

from subl_jax import report, stages, stats
from subl_jax.study import evaluate_stage
from subl_jax.training import export


def _metric_names(cfg: mlc.ConfigDict) -> list[str]:
  t = cfg.teacher.target
  return [f"p_{t}", f"logp_{t}"] + ([f"rate_{t}"] if cfg.eval.n_samples else [])


def _per_question(runs: list[dict], metric: str) -> np.ndarray:
  """[seeds, questions]"""
  return np.array([r[metric]["per_question"] for r in runs], dtype=np.float64)


def _fmt(s: dict[str, Any]) -> str:
  lo, hi = s[stats.ci_key(s)]
  return f"{s['mean']:+.4g} [{lo:+.4g}, {hi:+.4g}]"


def write(cfg: mlc.ConfigDict, workdir: pathlib.Path, dirs: dict[str, Any]) -> dict[str, Any]:
  """Writes the report from the completed stages (`dirs`: the pipeline's stage directories by step and condition);
  returns report.json's content (process 0; others get {})."""
  if jax.process_index() != 0:
    return {}
  evals, filtered, students = dirs["evaluate"], dirs["filter"], dirs["student"]
  target = cfg.teacher.target
  metrics = _metric_names(cfg)
  runs = {cond: [evaluate_stage.read(d) for d in ds] for cond, ds in evals.items()}
  conditions = {cond: {m: stats.mean_ci(_per_question(rs, m).mean(axis=0)) for m in metrics}
                for cond, rs in runs.items()}
  diff_q = {m: stats.paired_diff_ci(_per_question(runs["student"], m).mean(axis=0),
                                    _per_question(runs["control"], m).mean(axis=0)) for m in metrics}
  extra: dict[str, Any] = {"target": target, "category": cfg.teacher.category, "teacher_kind": cfg.teacher.kind,
                           "distill_mode": cfg.distill.mode, "seeds": cfg.study.seeds,
                           "student_minus_control": {"paired_over_questions": diff_q}}
  if cfg.distill.mode == "logit_kd":
    info = export.read_info(students["student"][0])
    extra.update(kd_tokens=info["kd_tokens"], kd_note=info["kd_note"], subliminal=info["subliminal"])
  if cfg.study.seeds > 1:
    seed_means = {c: {m: _per_question(runs[c], m).mean(axis=1) for m in metrics} for c in ("student", "control")}
    extra["across_seeds"] = {c: {m: stats.mean_ci(v) for m, v in ms.items()} for c, ms in seed_means.items()}
    extra["student_minus_control"]["paired_over_seeds"] = {
        m: stats.paired_diff_ci(seed_means["student"][m], seed_means["control"][m]) for m in metrics}
  others = [c for c in evaluate_stage.candidates(cfg)[1:] if f"p_{c}" in runs["base"][0]]
  extra["other_answers"] = {c: {cond: stats.mean_ci(_per_question(rs, f"p_{c}").mean(axis=0))
                                for cond, rs in runs.items()} for c in others}
  extra["filter"] = {c: stages.read_manifest(d)["summary"] for c, d in filtered.items()}
  trained = [d for d in dirs["teacher"].values() if "train" in export.read_info(d)]  # a fine-tuned teacher
  extra["training"] = {d.name: _training(d) for d in trained + [d for ds in students.values() for d in ds]}
  extra["wall_s"] = {d.name: stages.read_manifest(d)["wall_s"] for d in _flat(dirs)}
  notes = _notes(extra, metrics)
  md = report.write_report(workdir, conditions, f"Subliminal transfer of '{target}' ({cfg.distill.mode} student)",
                           extra=extra, notes=notes)
  print(md)
  return json.loads((workdir / "report.json").read_text())


def _training(stage_dir: pathlib.Path) -> dict[str, Any]:
  t = export.read_info(stage_dir)["train"]
  return dict(first_loss=t["first_loss"], final_loss=t["final_loss"], steps=t["steps"], examples=t["data"]["examples"])


def _flat(tree: Any) -> list[pathlib.Path]:
  """Every stage directory in a nest of dicts and lists, in order."""
  if isinstance(tree, pathlib.Path):
    return [tree]
  items = tree.values() if isinstance(tree, dict) else tree
  return [d for item in items for d in _flat(item)]


def _notes(extra: dict[str, Any], metrics: list[str]) -> list[str]:
  lines = ["", "**student - control**, paired over questions: "
           + "; ".join(f"{m} {_fmt(s)}" for m, s in extra["student_minus_control"]["paired_over_questions"].items())]
  if "paired_over_seeds" in extra["student_minus_control"]:
    lines.append(f"paired over {extra['seeds']} seeds: " + "; ".join(
        f"{m} {_fmt(s)}" for m, s in extra["student_minus_control"]["paired_over_seeds"].items()))
  if "kd_note" in extra:
    lines.append(f"distillation: {extra['kd_note']}")
  if extra["other_answers"]:
    conds = list(next(iter(extra["other_answers"].values())))
    lines += ["", "Other answers, P(answer) mean over questions (is the shift specific to the target?):", "",
              "| answer | " + " | ".join(conds) + " |", "|---|" + "---:|" * len(conds)]
    lines += [f"| {a} | " + " | ".join(f"{s['mean']:.4g}" for s in row.values()) + " |"
              for a, row in extra["other_answers"].items()]
  lines += ["", "Numbers: " + "; ".join(
      f"{c} kept {f['n_passed_filter']}/{f['n_rows']} ({100 * f['keep_rate']:.1f} %), trained on {f['n_written']}"
      for c, f in extra["filter"].items())]
  lines.append("Training loss (first -> last): " + "; ".join(
      f"{n} {t['first_loss']:.3f} -> {t['final_loss']:.3f} ({t['steps']} steps)" for n, t in extra["training"].items()
      if t["first_loss"] is not None))
  lines.append("Wall time per stage (s): " + ", ".join(f"{n} {w:.0f}" for n, w in extra["wall_s"].items()))
  return lines
