"""The study's report: the transfer matrix over every target's students, each target's specificity (the "other
targets" control) with its interval over seeds, the profile coefficient, each teacher's own strength, the null
conditions (in-context examples, shuffled numbers) as rows of the same statistics, and a one-sentence verdict per
target that never calls a non-specific shift transfer. `report.json`, `report.md`, `report.png` (see
`subl_jax.study.report`), the markdown printed.

Every Δ is model − base on the same question (log P of an answer after the forced answer prefix). The base model is
the regular-numbers control of a `logit_kd` student; an `sft` study also trains control students on the base model's
numbers and reports student − control paired by seed. Statistics: `subl_jax.study.transfer`.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections as mlc
import numpy as np

from subl_jax.study import report, stages, stats
from subl_jax.study import evaluate_stage, mitigation_report, monitor_plot, transfer
from subl_jax.core.training import export


def _logp(stage_dir: pathlib.Path, answers: list[str]) -> dict[str, list[float]]:
  metrics = evaluate_stage.read(stage_dir)
  return {a: metrics[f"logp_{a}"]["per_question"] for a in answers}


def _data(evals: dict[str, list[pathlib.Path]], targets: list[str], suffix: str, answers: list[str],
          base: dict[str, list[float]], teachers: dict[str, dict[str, list[float]]]) -> transfer.TransferData:
  """The TransferData of one condition: the students (or ICL models) `<target><suffix>` of every target."""
  students = {t: [_logp(d, answers) for d in evals[t + suffix]] for t in targets}
  return transfer.TransferData.from_nested(students, base, teachers, answers)


def students_data(cfg: mlc.ConfigDict, dirs: dict[str, Any]) -> transfer.TransferData:
  """The students' TransferData (every target's students, the base, the teachers) from the pipeline's evaluate
  stage directories (`run_study(stop="evaluate")`): what the report's transfer matrix and specificity read."""
  targets, evals = dirs["targets"], dirs["evaluate"]
  answers = evaluate_stage.candidates(targets, cfg.teacher.category, cfg.eval.candidates)
  teachers = {t: _logp(evals[f"teacher:{t}"][0], answers) for t in targets}
  return _data(evals, targets, "", answers, _logp(evals["base"][0], answers), teachers)


def _condition_stats(data: transfer.TransferData, targets: list[str]) -> dict[str, Any]:
  out: dict[str, Any] = {"matrix": transfer.transfer_matrix(data)}
  if len(targets) > 1:
    out["specificity"] = {t: transfer.specificity(data, t) for t in targets}
    out["mean_specificity"] = transfer.mean_specificity(data)
    out["verdict"] = transfer.verdict(data)
  if data.teacher is not None:
    out["profile_coefficient"] = transfer.profile_coefficient(data)
  return out


def write(cfg: mlc.ConfigDict, workdir: pathlib.Path, dirs: dict[str, Any]) -> dict[str, Any]:
  """Writes the report from the completed stages (`dirs`: the pipeline's stage directories by step and condition);
  returns report.json's content (process 0; others get {})."""
  if jax.process_index() != 0:
    return {}
  targets, conds, evals = dirs["targets"], dirs["conditions"], dirs["evaluate"]
  answers = evaluate_stage.candidates(targets, cfg.teacher.category, cfg.eval.candidates)
  base = _logp(evals["base"][0], answers)
  teachers = {t: _logp(evals[f"teacher:{t}"][0], answers) for t in targets}
  main = _data(evals, targets, "", answers, base, teachers)
  doc: dict[str, Any] = {"targets": targets, "answers": answers, "category": cfg.teacher.category,
                         "teacher_kind": cfg.teacher.kind, "distill_mode": cfg.distill.mode, "seeds": cfg.study.seeds,
                         "n_questions": main.n_questions, "students": _condition_stats(main, targets),
                         "teachers": transfer.teacher_strength(main)}
  if cfg.distill.mode == "logit_kd":
    info = export.read_info(dirs["student"][targets[0]][0])
    doc.update(kd_tokens=info["kd_tokens"], kd_note=info["kd_note"], subliminal=info["subliminal"],
               control="the base model (a logit_kd student of the base model's own numbers would train nothing)")
  else:
    doc["control"] = "students trained the same way on the base model's numbers (control_s<k>)"
    doc["student_minus_control"] = _minus_control(evals, targets)
  doc["null_conditions"] = {}
  for c in conds:
    data = _data(evals, targets, f":{c}", answers, base, teachers)
    doc["null_conditions"][c] = _condition_stats(data, targets)
    if f"{targets[0]}:{c}" in dirs["student"] and len(targets) > 1:
      # a condition with students of its own (shuffled numbers) trains with the students' seeds: is its transfer
      # lower, paired by seed?
      doc["null_conditions"][c]["vs_students"] = transfer.removed_fraction(main, data)
  mits = dirs.get("mitigations", [])
  if mits:
    doc["mitigations"] = mitigation_report.section(
        main, {m: _data(evals, targets, f":{m}", answers, base, teachers) for m in mits}, dirs["quality"],
        _condition_stats)
  doc["filter"] = {d.name: stages.read_manifest(d)["summary"] for d in dirs["filter"].values()}
  trained = [d for d in _flat(dirs["teacher"]) + _flat(dirs["student"]) if "train" in export.read_info(d)]
  doc["training"] = {d.name: _training(d) for d in trained}
  stage_dirs = {k: v for k, v in dirs.items() if k not in ("targets", "conditions", "mitigations")}
  doc["wall_s"] = {d.name: stages.read_manifest(d)["wall_s"] for d in _flat(stage_dirs)}
  monitored = monitor_plot.curves(dirs["student"], targets)
  if monitored:  # students trained with the live monitor (`audit.monitor_every`)
    doc["monitor"] = monitored
    monitor_plot.plot(monitored, workdir / "monitor.png")
  rows = _table(evals, targets, answers, conds + [m for m in mits if m not in conds])
  title = f"Subliminal transfer over {', '.join(targets)} ({cfg.distill.mode} student, {cfg.study.seeds} seed(s))"
  md = report.write_report(workdir, rows, title, extra=doc, notes=_notes(doc),
                           plot_fn=lambda path: _plot(doc, rows, path, title))
  print(md)
  return json.loads((workdir / "report.json").read_text())


def _minus_control(evals: dict[str, list[pathlib.Path]], targets: list[str]) -> dict[str, Any]:
  """sft: student − control on each target's log P, per seed averaged over questions, t-interval over seeds (seed k
  of the student pairs with seed k of the control)."""
  control = [_logp(d, targets) for d in evals["control"]]
  out = {}
  for t in targets:
    s = np.array([np.mean(_logp(d, [t])[t]) for d in evals[t]])
    c = np.array([np.mean(r[t]) for r in control])
    out[t] = stats.paired_diff_ci(s, c)
  return out


def _table(evals: dict[str, list[pathlib.Path]], targets: list[str], answers: list[str],
           conds: list[str]) -> dict[str, dict[str, Any]]:
  """report.md's table: each model group's mean log P of every target (per question averaged over seeds), with a
  t-interval over questions."""
  groups = ["base"] + [f"teacher:{t}" for t in targets] + list(targets) + (["control"] if "control" in evals else [])
  groups += [f"{t}:{c}" for c in conds for t in targets]
  rows = {}
  for g in groups:
    per_seed = [_logp(d, targets) for d in evals[g]]
    label = g if ":" in g or g in ("base", "control") else f"student:{g}"
    rows[label] = {f"logp_{t}": stats.mean_ci(np.mean([r[t] for r in per_seed], axis=0)) for t in targets}
  return rows


def _training(stage_dir: pathlib.Path) -> dict[str, Any]:
  t = export.read_info(stage_dir)["train"]
  return dict(first_loss=t["first_loss"], final_loss=t["final_loss"], steps=t["steps"], examples=t["data"]["examples"])


def _flat(tree: Any) -> list[pathlib.Path]:
  """Every stage directory in a nest of dicts and lists, in order."""
  if isinstance(tree, pathlib.Path):
    return [tree]
  items = tree.values() if isinstance(tree, dict) else tree
  return [d for item in items for d in _flat(item)]


def _fmt(s: dict[str, Any]) -> str:
  lo, hi = s[stats.ci_key(s)]
  return f"{s['mean']:+.4g} [{lo:+.4g}, {hi:+.4g}] (n={s['n']})"


def _notes(doc: dict[str, Any]) -> list[str]:
  st, targets = doc["students"], doc["targets"]
  m = st["matrix"]
  over = "over_questions" if m["n_seeds"] == 1 else "over_seeds"  # one seed has no across-seed interval
  lines = ["", f"Transfer matrix: Δ log P(answer) = student − base (rows: whose numbers the student learned; mean "
           f"over {m['n_seeds']} seed(s) × {m['n_questions']} questions; 95 % CI over "
           f"{'questions (1 seed)' if over == 'over_questions' else 'seeds'}):", "",
           "| teacher's trait | " + " | ".join(m["cols"]) + " |", "|---|" + "---:|" * len(m["cols"])]
  for r, row in zip(m["rows"], m[over]):
    lines.append(f"| {r} | " + " | ".join(transfer.fmt(c) for c in row) + " |")
  if "specificity" in st:
    one_seed = m["n_seeds"] == 1  # an interval over one seed does not exist: show the one over questions, flagged
    lines += ["", "Specificity (own student's Δ on t minus the other teachers' students' Δ on t), 95 % CI "
              + ("over questions (1 seed: no across-seed interval):" if one_seed else "over seeds:")]
    lines += [f"- {t}: {_fmt(s['paired' if one_seed else 'over_seeds'])}, paired over seeds × questions "
              f"{transfer.p_text(s['paired']['p'])}" for t, s in st["specificity"].items()]
    if not one_seed:
      lines.append(f"- mean over targets: {_fmt(st['mean_specificity']['over_seeds'])}")
      # questions within a seed share one trained student, so they are not independent pairs
      lines.append("\nThe paired p counts every seed × question as an independent pair and so overstates the "
                   "evidence; the interval over seeds decides the verdict.")
    lines += ["", "**Verdict**:"] + [f"- {v}" for v in st["verdict"].values()]
  else:
    lines += ["", f"One target ({targets[0]}): specificity needs other targets' students as controls, so a shift here "
              "cannot be told from drift that any teacher's numbers cause. Not evidence of transfer on its own."]
  if "profile_coefficient" in st:
    p = st["profile_coefficient"]["pooled"]
    lines.append(f"\nProfile coefficient (slope of the students' Δ on their teachers' Δ over every answer): "
                 f"{p['slope']:+.3f}, 95 % bootstrap CI [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]")
  lines += ["", "Teachers (Δ log P of their own trait vs base; specificity over questions):"]
  for t, s in doc["teachers"].items():
    spec = f"specificity {_fmt(s['specificity'])}" if s["specificity"] else "no other teacher to compare"
    lines.append(f"- {t}: own {_fmt(s['own'])}; {spec}" + (f" — {s['note']}" if s["note"] else ""))
  if "student_minus_control" in doc:
    lines += ["", "Student − control (sft), 95 % CI over seeds: " + "; ".join(
        f"{t} {_fmt(s)}" for t, s in doc["student_minus_control"].items())]
  for c, cs in doc["null_conditions"].items():
    if "mean_specificity" in cs:
      lines.append(f"\nCondition {c}: mean specificity {_fmt(cs['mean_specificity']['over_seeds'])}; " + "; ".join(
          cs["verdict"].values()))
      if "vs_students" in cs:
        r = cs["vs_students"]
        lines.append(f"Against the students, paired by seed: students − {c} {_fmt(r['difference'])}; transfer "
                     f"removed {mitigation_report.removed_text(r)}.")
    else:
      row = cs["matrix"]["over_seeds"][0][0]
      lines.append(f"\nCondition {c}: Δ log P({targets[0]}) {_fmt(row)}")
  lines += mitigation_report.notes(doc.get("mitigations", {}))
  if "kd_note" in doc:
    lines.append(f"\nDistillation: {doc['kd_note']}. Control: {doc['control']}.")
  lines += ["", "Numbers: " + "; ".join(
      f"{n} kept {f['n_passed_filter']}/{f['n_rows']} ({100 * f['keep_rate']:.1f} %), trained on {f['n_written']}"
      for n, f in doc["filter"].items())]
  lines.append("Training loss (first -> last): " + "; ".join(
      f"{n} {t['first_loss']:.3f} -> {t['final_loss']:.3f} ({t['steps']} steps)" for n, t in doc["training"].items()
      if t["first_loss"] is not None))
  lines.append("Wall time per stage (s): " + ", ".join(f"{n} {w:.0f}" for n, w in doc["wall_s"].items()))
  return lines


def _plot(doc: dict[str, Any], rows: dict[str, Any], path: pathlib.Path, title: str) -> None:
  """report.png: the transfer matrix as a heatmap beside the teachers' own matrix."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  m = doc["students"]["matrix"]
  teacher = np.array(doc["students"]["profile_coefficient"]["points"]["teacher_delta"]) \
      if "profile_coefficient" in doc["students"] else None
  panels = [("students: Δ log P vs base", np.array(m["mean"]))] + ([("teachers: Δ log P vs base", teacher)]
                                                                    if teacher is not None else [])
  fig, axes = plt.subplots(1, len(panels), figsize=(0.7 * len(m["cols"]) * len(panels) + 3, 0.6 * len(m["rows"]) + 2.2),
                           dpi=120, squeeze=False)
  for ax, (name, values) in zip(axes[0], panels):
    lim = float(np.abs(values).max()) or 1.0
    im = ax.imshow(values, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(m["cols"])), m["cols"], rotation=45, ha="right")
    ax.set_yticks(range(len(m["rows"])), m["rows"])
    for i in range(values.shape[0]):
      for j in range(values.shape[1]):
        ax.text(j, i, f"{values[i, j]:+.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(name, fontsize=9)
    ax.set_ylabel("teacher's trait")
    fig.colorbar(im, ax=ax, shrink=0.8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
