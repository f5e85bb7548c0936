"""`audit.json`, `audit.md` and `audit.png` of the MNIST audit: each signal against realised transfer."""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import numpy as np

from subl_jax.study import report, stats
from subl_jax.study.audit import calibration
from subl_jax.study.audit.mnist_audit import PRE_TRAINING, SIGNALS

# What each signal needs, shown beside its calibration.
NEEDS = {"lineage_cos": "teacher weights + student init", "first_order_adam": "labelled trait probe + weights",
         "first_order_sgd": "labelled trait probe + weights", "kl_start": "data + outputs only (trait-agnostic)",
         "recovered": "a trained student (after the fact)"}


def build(points: Sequence[dict[str, Any]], threshold: float) -> dict[str, Any]:
  """points: one `signals.json` per (m, condition). Calibration over every model of every condition, and over the
  conditions' means; transfer = a student's test accuracy ≥ `threshold`."""
  acc = np.concatenate([p["accuracy"] for p in points])
  labels = acc >= threshold
  cond_acc = np.array([np.mean(p["accuracy"]) for p in points])
  out: dict[str, Any] = {"threshold": threshold, "n_models": int(len(acc)), "n_conditions": len(points),
                         "conditions": [], "calibration": {}}
  for p in points:
    row = {"n_aux": p["n_aux"], "condition": p["condition"], "accuracy": stats.mean_ci(p["accuracy"]),
           "cost_s": p["cost_s"], "student_train_s": p["student_train_s"],
           "cost_fraction": p["cost_s"] / p["student_train_s"] if p["student_train_s"] else None,
           "signals": {k: stats.mean_ci(v) for k, v in p["signals"].items()}}
    out["conditions"].append(row)
  for k in SIGNALS:
    scores = np.concatenate([p["signals"][k] for p in points])
    cond_scores = np.array([np.mean(p["signals"][k]) for p in points])
    same = np.concatenate([[not p["condition"].startswith("cross")] * len(p["accuracy"]) for p in points])
    # The subliminal case: students of the auxiliary logits only (the class logits, i.e. the trait, never distilled).
    # 'all' students are taught the trait directly, so they make a pooled AUROC easy; this one is the test.
    aux = np.concatenate([[p["condition"].endswith("_aux")] * len(p["accuracy"]) for p in points])
    out["calibration"][k] = {
        "needs": NEEDS[k], "pre_training": k in PRE_TRAINING,
        "models": calibration.calibrate(scores, acc, labels),
        "conditions": {"spearman": calibration.spearman(cond_scores, cond_acc), "n": len(points)},
        # Within each init (same / cross) alone: does the signal rank the students of one init by their transfer?
        "aux_only": calibration.calibrate(scores[aux], acc[aux], labels[aux]),
        "within_same_init": calibration.calibrate(scores[same], acc[same], labels[same]),
        "within_cross_init": calibration.calibrate(scores[~same], acc[~same], labels[~same])}
  cost = [r["cost_fraction"] for r in out["conditions"] if r["cost_fraction"] is not None]
  out["cost_fraction"] = {"max": max(cost), "mean": float(np.mean(cost))} if cost else None
  return out


def _ci(x: Any) -> str:
  return "n/a" if x is None else f"[{x[0]:+.2f}, {x[1]:+.2f}]"


def _num(x: float) -> str:
  return "n/a" if x is None or not np.isfinite(x) else f"{x:+.2f}"


def _verdict(k: str, c: dict[str, Any]) -> str:
  """Judged on the auxiliary-logit students alone: the subliminal case (see `build`)."""
  m = c["aux_only"]
  lo = m["auroc_ci"][0] if m["auroc_ci"] else None
  if lo is not None and lo > 0.5:
    text = f"{k}: separates the aux students that transfer from those that do not (AUROC {m['auroc']:.2f}, CI above 0.5)"
  elif m["auroc_ci"] and m["auroc_ci"][1] < 0.5:
    text = f"{k}: ranks the aux students the wrong way round (AUROC {m['auroc']:.2f}, CI below 0.5)"
  else:
    text = f"{k}: does not separate the aux students (AUROC {_num(m['auroc'])}, CI {_ci(m['auroc_ci'])} includes 0.5)"
  w = c["within_same_init"]
  if np.isfinite(w["spearman"]):
    text += f"; within same-init students, ρ with accuracy {w['spearman']:+.2f} {_ci(w['spearman_ci'])}"
  return text + "."


def markdown(doc: dict[str, Any]) -> str:
  lines = [f"# Transfer audit: MNIST auxiliary-logit students ({doc['n_models']} students over "
           f"{doc['n_conditions']} conditions)", "",
           f"Realised transfer: a student's test accuracy (chance 0.10); 'transfers' = accuracy ≥ {doc['threshold']}.",
           "", "| m | condition | accuracy [95 % CI] | " + " | ".join(SIGNALS) + " | audit cost / training |",
           "|---|---|---|" + "---:|" * (len(SIGNALS) + 1)]
  for r in doc["conditions"]:
    a = r["accuracy"]
    frac = "n/a" if r["cost_fraction"] is None else f"{100 * r['cost_fraction']:.1f} %"
    lines.append(f"| {r['n_aux']} | {r['condition']} | {a['mean']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] | "
                 + " | ".join(f"{r['signals'][k]['mean']:+.3g}" for k in SIGNALS) + f" | {frac} |")
  lines += ["", "Calibration (per student: Spearman ρ with accuracy and AUROC for 'transfers', 95 % bootstrap CIs; "
            "per condition: ρ of the means):", "",
            "| signal | needs | ρ (students) | AUROC (students) | AUROC (aux students only) | ρ (conditions) |",
            "|---|---|---|---|---|---|"]
  for k, c in doc["calibration"].items():
    m, x = c["models"], c["aux_only"]
    lines.append(f"| {k} | {c['needs']} | {_num(m['spearman'])} {_ci(m['spearman_ci'])} | {_num(m['auroc'])} "
                 f"{_ci(m['auroc_ci'])} | {_num(x['auroc'])} {_ci(x['auroc_ci'])} | "
                 f"{_num(c['conditions']['spearman'])} (n={c['conditions']['n']}) |")
  lines += ["", "'all' students are taught the class logits (the trait) directly, which makes the pooled AUROC easy; the "
            "verdicts are judged on the auxiliary-logit students alone (same init vs cross init: the subliminal case).",
            "", "**Verdicts**:"] + [f"- {_verdict(k, c)}" for k, c in doc["calibration"].items()]
  if doc["cost_fraction"]:
    lines += ["", f"Cost: the pre-training signals of a condition took at most "
              f"{100 * doc['cost_fraction']['max']:.1f} % (mean {100 * doc['cost_fraction']['mean']:.1f} %) of its "
              f"student's training time, compilation included."]
  return "\n".join(lines) + "\n"


def _plot(points: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(SIGNALS), figsize=(4 * len(SIGNALS), 3.5))
  for ax, k in zip(axes, SIGNALS):
    for p in points:
      ax.scatter(p["signals"][k], p["accuracy"], s=6, label=f"m={p['n_aux']} {p['condition']}")
    ax.set_xlabel(k)
    ax.set_ylabel("student test accuracy")
  axes[0].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write(workdir: pathlib.Path, points: Sequence[dict[str, Any]], threshold: float) -> dict[str, Any]:
  doc = build(points, threshold)
  report.write_text_atomic(workdir / "audit.json", json.dumps(calibration.finite(doc), indent=1, allow_nan=False) + "\n")
  report.write_text_atomic(workdir / "audit.md", markdown(doc))
  _plot(points, workdir / "audit.png")
  return doc
