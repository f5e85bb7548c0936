"""The study report's `monitor.png` (issue #20): the live monitor's signals (`audit/monitor.py`) over training, one
line per condition (the plain students, each shuffle or mitigation), each the mean over targets and seeds of the
student's signal on its own teacher's trait."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from subl_jax.core.training import export, metrics_log

PANELS = (("monitor_logp_{t}", "Δ probe log P(own trait) since step 0", True),
          ("monitor_cos_{t}", "cos(update, ∇ log P(own trait))", False),
          ("monitor_act_cos", "cos(student's, teacher's activation shift)", False))


def curves(students: dict[str, list[pathlib.Path]], targets: list[str]) -> dict[str, dict[str, Any]]:
  """{condition: {signal panel: (steps, mean values)}} over the students that logged monitor rows."""
  out: dict[str, dict[str, Any]] = {}
  for key, dirs in students.items():
    t, _, cond = key.partition(":")
    if t not in targets:
      continue
    for d in dirs:
      rows = [r for r in metrics_log.read(d / export.TRAIN_DIR) if any(k.startswith("monitor_") for k in r)]
      for field, _, relative in PANELS:
        name = field.format(t=t)
        pts = [(r["step"], r[name]) for r in rows if name in r]
        if not pts:
          continue
        steps, vals = map(np.asarray, zip(*pts))
        if relative:
          vals = vals - vals[0]
        out.setdefault(cond or "plain", {}).setdefault(field, []).append((steps, vals))
  return {c: {f: _mean(series) for f, series in panels.items()} for c, panels in out.items()}


def _mean(series: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[int], list[float]]:
  steps = sorted(set.intersection(*(set(s.tolist()) for s, _ in series)))
  vals = [np.mean([v[list(s).index(k)] for s, v in series]) for k in steps]
  return steps, [float(v) for v in vals]


def plot(data: dict[str, dict[str, Any]], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4), dpi=110)
  for ax, (field, title, _) in zip(axes, PANELS):
    for cond, panels in data.items():
      if field in panels:
        ax.plot(*panels[field], marker="o", ms=3, label=cond)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
