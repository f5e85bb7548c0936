"""`audit.json` and `audit.md` of the LLM audit: the predicted transfer matrix and specificity beside the realised
ones (`study.transfer`), their calibration, the data-only signal per teacher, and the audit's cost.

Predicted (one teacher's `signals.json` each): P[t][a] = the mean over the audited batches b of the predicted
Δ log P(a) of one step on b, with a t-interval over batches; predicted specificity spec_b(t) = P_b[t][t] −
mean_{s≠t} P_b[s][t], batches paired by their index (independent draws from different datasets, so any pairing is
valid), t-interval over the common number of batches. Realised: the study's M[t][a] (student − base, mean over seeds
and questions) and spec(t); a cell "transfers" when its interval — over seeds, or over questions with one seed (as
the study's report) — lies above 0. Calibration over the S·A cells: Spearman ρ of predicted vs realised with a
bootstrap CI over cells, and AUROC for "transfers" when both classes occur; and ρ of the centred cells (each answer's
mean over teachers removed on both sides, one teacher's row left out as determined by the others), which asks
whether the signal predicts which teacher moves an answer rather than the drift every teacher's numbers cause. The
cells share students and questions, so they are not independent: the bootstrap interval is optimistic. Per-target
comparisons (specificity, the data-only signal) have S points: no correlation is computed below `MIN_POINTS`.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import numpy as np

from subl_jax.study import report, stats, transfer
from subl_jax.study.audit import calibration
from subl_jax.study.audit.llm_audit import SIGNALS

MIN_POINTS = 3  # below this a rank correlation over targets says nothing (with 2 points it is ±1 by construction)
DATA_ONLY = ("mean_kl", "frac_kl")
ACTIVATION = ("act_norm", "act_distinct")  # per teacher: |v_T|, 1 − mean cos(v_T, v_S) over the other teachers
NEEDS = {"act_norm": "teacher + base activations on the data (trait-agnostic)",
         "act_distinct": "teacher + base activations on the data, other teachers' (trait-agnostic)",
         "first_order_adam": "trait probe + student init + teacher (pre-training)",
         "first_order_sgd": "trait probe + student init + teacher (pre-training)",
         "mean_kl": "data + teacher and base outputs only (trait-agnostic)",
         "frac_kl": "data + teacher and base outputs only (trait-agnostic)"}


def predicted(points: dict[str, dict[str, Any]], targets: list[str], answers: list[str]) -> dict[str, Any]:
  """Per signal: the matrix P[t][a] (mean_ci over batches) and each target's predicted specificity."""
  out = {}
  for k in SIGNALS:
    per = {t: np.asarray(points[t]["per_batch"][k], np.float64) for t in targets}  # [batches, A]
    cells = [[stats.mean_ci(per[t][:, j]) for j in range(len(answers))] for t in targets]
    doc: dict[str, Any] = {"rows": targets, "cols": answers, "mean": [[c["mean"] for c in row] for row in cells],
                           "cells": cells}
    if len(targets) > 1:
      n = min(len(v) for v in per.values())
      doc["specificity"] = {}
      for i, t in enumerate(targets):
        a = answers.index(t)
        others = np.mean([per[s][:n, a] for s in targets if s != t], axis=0)
        doc["specificity"][t] = stats.mean_ci(per[t][:n, a] - others)
    out[k] = doc
  return out


def realised(data: transfer.TransferData) -> dict[str, Any]:
  """The study's realised matrix, the cells that transfer significantly, and each target's specificity."""
  m = transfer.transfer_matrix(data)
  over = "over_seeds" if data.n_seeds > 1 else "over_questions"  # one seed has no across-seed interval
  transfers = [[c["n"] > 1 and c[stats.ci_key(c)][0] > 0 for c in row] for row in m[over]]
  doc = {"mean": m["mean"], "cells": m[over], "interval": over, "transfers": transfers,
         "n_seeds": data.n_seeds, "n_questions": data.n_questions}
  if len(data.traits) > 1:
    spec = {}
    for t in data.traits:
      sp = transfer.specificity(data, t)
      s = sp["over_seeds"] if data.n_seeds > 1 else sp["paired"]  # as the study's report, with one seed: questions
      spec[t] = {k: s[k] for k in ("mean", stats.ci_key(s), "n")} | {
          "significant": s["n"] > 1 and s[stats.ci_key(s)][0] > 0}
    doc["specificity"] = spec
  return doc


def _per_target(scores: Sequence[float], real: Sequence[float], labels: Sequence[bool]) -> dict[str, Any]:
  if len(scores) < MIN_POINTS:
    return {"n": len(scores), "spearman": None, "note": f"{len(scores)} targets: too few to calibrate "
            f"(a rank correlation needs at least {MIN_POINTS})"}
  return calibration.calibrate(scores, real, labels)


def build(points: dict[str, dict[str, Any]], targets: list[str], answers: list[str],
          data: transfer.TransferData | None, train_s: dict[str, list[float]] | None, audit_s: dict[str, float],
          missing: str | None = None, step_s: dict[str, float] | None = None) -> dict[str, Any]:
  """points: `signals.json` per target; data: the students' TransferData (None: not run here, `missing` says which
  stage); train_s: the students' training wall times per target; audit_s: each audit stage's wall time."""
  doc: dict[str, Any] = {"study": "llm", "targets": targets, "answers": answers,
                         "n_batches": {t: points[t]["n_batches"] for t in targets},
                         "n_probe_questions": points[targets[0]]["n_questions"], "lr": points[targets[0]]["lr"],
                         "optimizer": points[targets[0]]["optimizer"], "predicted": predicted(points, targets, answers),
                         "probe_logp_base": {t: points[t]["probe_logp"] for t in targets},
                         "data_only": {t: points[t]["data_only"] for t in targets},
                         "kd_loss_start": {t: stats.mean_ci(points[t]["per_batch"]["loss"]) for t in targets},
                         "activation": activation(points, targets),
                         "realised": None, "calibration": None, "cells": None}
  if data is None:
    doc["missing"] = (f"no realised transfer to calibrate against: stage {missing!r} of this config's study is not "
                      "complete in this workdir (run job 'study' with the same config and workdir, then the audit)")
  else:
    if list(data.traits) != targets or list(data.answers) != answers:
      raise ValueError(f"the study's evaluations cover {data.traits} x {data.answers}, the audit {targets} x {answers}")
    r = doc["realised"] = realised(data)
    cells = [{"teacher": t, "answer": a, "realised": r["mean"][i][j], "transfers": r["transfers"][i][j],
              **{k: doc["predicted"][k]["mean"][i][j] for k in SIGNALS}}
             for i, t in enumerate(targets) for j, a in enumerate(answers)]
    doc["cells"] = cells
    real, labels = [c["realised"] for c in cells], [c["transfers"] for c in cells]
    cal: dict[str, Any] = {}
    for k in SIGNALS:
      cal[k] = {"cells": calibration.calibrate([c[k] for c in cells], real, labels)}
      if len(targets) > 1:  # every answer's mean over teachers removed on both sides: the teacher-specific part
        cal[k]["cells_centred"] = calibration.spearman_ci(_centred([c[k] for c in cells], len(targets)),
                                                          _centred(real, len(targets)))
      if "specificity" in r:
        pred = [doc["predicted"][k]["specificity"][t] for t in targets]
        pred_s, real_s = [x["mean"] for x in pred], [r["specificity"][t]["mean"] for t in targets]
        ci = [x[stats.ci_key(x)] for x in pred]
        cal[k]["specificity"] = {"sign_agrees": int(sum(np.sign(p) == np.sign(q) for p, q in zip(pred_s, real_s))),
                                 "pred_excludes_0": int(sum(lo > 0 or hi < 0 for lo, hi in ci)), "n": len(targets),
                                 **_per_target(pred_s, real_s, [r["specificity"][t]["significant"] for t in targets])}
    if "specificity" in r:
      real_s = [r["specificity"][t]["mean"] for t in targets]
      sig = [r["specificity"][t]["significant"] for t in targets]
      for k in DATA_ONLY:
        cal[k] = {"specificity": _per_target([points[t]["data_only"][k] for t in targets], real_s, sig)}
      for k in ACTIVATION:
        cal[k] = {"specificity": _per_target([doc["activation"][t][k] for t in targets], real_s, sig)}
    doc["calibration"] = cal
  doc["cost"] = _cost(points, targets, train_s, audit_s, step_s)
  doc["verdicts"] = verdicts(doc)
  return doc


def activation(points: dict[str, dict[str, Any]], targets: list[str]) -> dict[str, dict[str, float]]:
  """Per teacher: the norm of its activation shift v_T and how distinct it is, 1 − mean_{s≠t} cos(v_t, v_s) (None
  with one teacher), and the cosines themselves."""
  v = {t: np.asarray(points[t]["activation_shift"]["vector"], np.float64) for t in targets}
  cos = lambda a, b: float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
  out = {}
  for t in targets:
    others = {s: cos(v[t], v[s]) for s in targets if s != t}
    out[t] = {"act_norm": float(np.linalg.norm(v[t])), "cos": others,
              "act_distinct": 1 - float(np.mean(list(others.values()))) if others else None,
              "layer": points[t]["activation_shift"]["layer"]}
  return out


def _centred(values: Sequence[float], n_rows: int) -> np.ndarray:
  """Row-major cells [rows × cols] minus each column's mean over rows, without the last row: it is minus the sum of
  the others (with 2 teachers the rows are ±), so keeping it would count the same value twice in the bootstrap."""
  v = np.asarray(values, np.float64).reshape(n_rows, -1)
  return (v - v.mean(axis=0))[:-1].ravel()


def _cost(points: dict[str, Any], targets: list[str], train_s: dict[str, list[float]] | None,
          audit_s: dict[str, float], step_s: dict[str, float] | None = None) -> dict[str, Any]:
  """The audit's wall time against the students': as a fraction of one student's training, and in training steps
  (the audit's cost is fixed — `audit.n_batches` gradients, the probe, `audit.data_rows` rows — while a run's grows
  with its steps: `steps_for_5pct` is the shortest run, at this step time, the audit costs at most 5 % of)."""
  out: dict[str, Any] = {"audit_stage_s": audit_s, "signal_s": {t: points[t]["cost_s"] for t in targets}}
  if train_s:
    out["student_train_s"] = train_s
    out["fraction"] = {t: audit_s[t] / float(np.mean(train_s[t])) for t in targets}
    out["total_fraction"] = sum(audit_s.values()) / sum(float(np.mean(v)) for v in train_s.values())
  if step_s:
    out["step_s"] = step_s
    out["audit_steps"] = {t: audit_s[t] / step_s[t] for t in targets}
    out["steps_for_5pct"] = {t: int(np.ceil(20 * out["audit_steps"][t])) for t in targets}
  return out


def _num(x: Any, fmt: str = "+.2f") -> str:
  return "n/a" if x is None or not np.isfinite(x) else format(x, fmt)


def _ci(x: Any) -> str:
  return "n/a" if x is None else f"[{x[0]:+.2f}, {x[1]:+.2f}]"


def _cell(s: dict[str, Any], fmt: str = "+.3g") -> str:
  lo, hi = s[stats.ci_key(s)]
  return f"{s['mean']:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def verdicts(doc: dict[str, Any]) -> dict[str, str]:
  """One sentence per signal, saying when it fails or the study has too few conditions to tell."""
  cal = doc["calibration"]
  if cal is None:
    return {k: f"{k}: not calibrated ({doc['missing']})." for k in SIGNALS}
  out = {}
  for k in SIGNALS:
    c = cal[k]["cells"]
    rho, ci = c["spearman"], c["spearman_ci"]
    if rho is None or not np.isfinite(rho):
      text = f"{k}: cannot be calibrated over the cells (one side is constant)"
    elif ci and ci[0] > 0:
      text = f"{k}: ranks the {c['n']} (teacher, answer) cells by realised Δ log P (ρ {rho:+.2f}, CI {_ci(ci)} above 0)"
    elif ci and ci[1] < 0:
      text = f"{k}: ranks the cells the wrong way round (ρ {rho:+.2f}, CI {_ci(ci)} below 0)"
    else:
      text = (f"{k}: does not rank the {c['n']} cells by realised Δ log P (ρ {_num(rho)}, CI {_ci(ci)} "
              "includes 0 or is undefined)")
    if c["auroc"] is None or not np.isfinite(c["auroc"]):
      text += (f"; AUROC undefined: {c['n_transfer']} of {c['n']} cells transfer significantly (one class only)")
    else:
      a_ci = c["auroc_ci"]
      side = "above" if a_ci and a_ci[0] > 0.5 else "below" if a_ci and a_ci[1] < 0.5 else "including"
      text += f"; AUROC for 'transfers' {c['auroc']:.2f} (CI {_ci(a_ci)}, {side} 0.5)"
    cc = cal[k].get("cells_centred")
    if cc is not None:
      ok = cc["spearman_ci"] is not None and cc["spearman_ci"][0] > 0
      text += (f"; with each answer's mean over teachers removed (the teacher-specific part, {cc['n']} free "
               f"values) ρ {_num(cc['spearman'])} {_ci(cc['spearman_ci'])}"
               + ("" if ok else ": the cells' ranking does not show it predicts which teacher moves an answer"))
    sp = cal[k].get("specificity")
    if sp is not None:
      text += (f"; predicted specificity has the realised sign for {sp['sign_agrees']} of {sp['n']} targets, its "
               f"interval over batches excluding 0 for {sp['pred_excludes_0']}")
      text += (f" ({sp['note']})" if "note" in sp
               else f", ρ over targets {_num(sp['spearman'])} {_ci(sp['spearman_ci'])}")
    out[k] = text + "."
  for k in DATA_ONLY + ACTIVATION:
    if k in cal:
      sp = cal[k]["specificity"]
      out[k] = (f"{k}: " + (sp["note"] if "note" in sp else
                            f"ρ with realised specificity over {sp['n']} teachers {_num(sp['spearman'])} "
                            f"{_ci(sp['spearman_ci'])}") + ".")
  return out


def markdown(doc: dict[str, Any]) -> str:
  targets, answers = doc["targets"], doc["answers"]
  nb = ", ".join(f"{t} {n}" for t, n in doc["n_batches"].items())
  lines = [f"# Transfer audit: LLM study over {', '.join(targets)} ({len(targets)} teachers × {len(answers)} answers)",
           "", f"Predicted Δ log P(answer) of one step of the seed-0 student at lr {doc['lr']:g} (optimizer "
           f"{doc['optimizer']}; the peak rate: a warm-up starts lower, and both predictions scale linearly with it), mean "
           f"over the first batches of its epoch ({nb}), 95 % t-interval over batches; trait probe over the first "
           f"{doc['n_probe_questions']} evaluation questions. A prediction is of one step and the realised Δ of the "
           "whole training, so they are compared by rank and sign, not size."]
  for k in SIGNALS:
    p = doc["predicted"][k]
    lines += ["", f"**{k}** (predicted, per step):", "", "| teacher's trait | " + " | ".join(answers) + " |",
              "|---|" + "---:|" * len(answers)]
    lines += [f"| {t} | " + " | ".join(_cell(c) for c in row) + " |" for t, row in zip(targets, p["cells"])]
  r = doc["realised"]
  if r is not None:
    lines += ["", f"**Realised** Δ log P = student − base (mean over {r['n_seeds']} seed(s) × {r['n_questions']} "
              f"questions, 95 % CI {r['interval'].replace('_', ' ')}; * = transfers, CI above 0):", "",
              "| teacher's trait | " + " | ".join(answers) + " |", "|---|" + "---:|" * len(answers)]
    lines += [f"| {t} | " + " | ".join(_cell(c) + (" *" if y else "") for c, y in zip(row, ys)) + " |"
              for t, row, ys in zip(targets, r["cells"], r["transfers"])]
  if len(targets) > 1:
    lines += ["", "Specificity P[t][t] − mean_{s≠t} P[s][t]:", "",
              "| target | " + " | ".join(f"predicted {k}" for k in SIGNALS) + " | realised |", "|---|---:|---:|---:|"]
    for t in targets:
      real = _cell(r["specificity"][t]) if r is not None and "specificity" in r else "n/a"
      lines.append(f"| {t} | " + " | ".join(_cell(doc["predicted"][k]["specificity"][t]) for k in SIGNALS)
                   + f" | {real} |")
  lines += ["", "Data-only signal (whole dataset, every completion position; teacher on its view, base on the "
            "student's):", "", "| teacher | mean KL(teacher ‖ base) | frac KL > "
            f"{doc['data_only'][targets[0]]['kl_threshold']:g} nats | frac token ≠ base argmax | positions | "
            "distillation loss at init (per batch) |", "|---|---:|---:|---:|---:|---:|"]
  for t in targets:
    d = doc["data_only"][t]
    lines.append(f"| {t} | {d['mean_kl']:.4g} | {d['frac_kl']:.3f} | {d['frac_argmax']:.3f} | {d['n_positions']} | "
                 f"{_cell(doc['kd_loss_start'][t], '.4g')} |")
  act = doc["activation"]
  lines += ["", f"Activation shift (the teacher's mean residual stream after layer {act[targets[0]]['layer']} on its "
            "view minus the base's, over the first rows' completion positions): " + "; ".join(
                f"{t} |v| {a['act_norm']:.3g}" + (f", distinct {a['act_distinct']:.3f}" if a["act_distinct"] is not None
                                                    else "") for t, a in act.items())]
  if doc["calibration"] is not None:
    lines += ["", "Calibration over the (teacher, answer) cells (Spearman ρ and AUROC with 95 % bootstrap CIs over "
              "cells; the cells share students, so the intervals are optimistic):", "",
              "| signal | needs | ρ (cells) | ρ (cells, answer means removed) | AUROC 'transfers' | n cells (transfer) |",
              "|---|---|---|---|---|---|"]
    for k in SIGNALS:
      c = doc["calibration"][k]["cells"]
      cc = doc["calibration"][k].get("cells_centred")
      centred = f"{_num(cc['spearman'])} {_ci(cc['spearman_ci'])}" if cc else "n/a"
      lines.append(f"| {k} | {NEEDS[k]} | {_num(c['spearman'])} {_ci(c['spearman_ci'])} | {centred} | "
                   f"{_num(c['auroc'])} {_ci(c['auroc_ci'])} | {c['n']} ({c['n_transfer']}) |")
  else:
    lines += ["", f"Calibration: none — {doc['missing']}."]
  lines += ["", "**Verdicts**:"] + [f"- {v}" for v in doc["verdicts"].values()]
  cost = doc["cost"]
  lines += ["", "Cost: audit stage wall time " + ", ".join(f"{t} {s:.0f} s" for t, s in cost["audit_stage_s"].items())]
  if "fraction" in cost:
    lines[-1] += (" — " + ", ".join(f"{t} {100 * f:.0f} %" for t, f in cost["fraction"].items())
                  + f" of a student's training wall time (all teachers: {100 * cost['total_fraction']:.0f} %; "
                  "model loading and compilation included on both sides).")
  else:
    lines[-1] += " (no trained students to compare with)."
  if "audit_steps" in cost:
    lines.append("In training steps (a student's median step): " + ", ".join(
        f"{t} {n:.1f} steps" for t, n in cost["audit_steps"].items()) + "; the audit is at most 5 % of a run of "
        + ", ".join(f"{t} ≥ {n} steps" for t, n in cost["steps_for_5pct"].items())
        + " (the paper's recipe: 30,000 rows × 3 epochs / 66 = 1,364 steps).")
  return "\n".join(lines) + "\n"


def write(workdir: pathlib.Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
  """`build(*args, **kwargs)` into `<workdir>/audit.json` and `audit.md`; returns the JSON's content."""
  doc = calibration.finite(build(*args, **kwargs))
  report.write_text_atomic(workdir / "audit.json", json.dumps(doc, indent=1, allow_nan=False) + "\n")
  report.write_text_atomic(workdir / "audit.md", markdown(doc))
  return doc
