"""Job `mnist_aux`: the auxiliary-logit study's stages in order (`run_stages`), then its report.

The stages' work lives in `study` (and `mitigate`); this module only orders them, so it can import the stage table
without the table's every stage entering the MNIST stages' code fingerprint."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from subl_jax.study import report, stage_table, stages, stats
from subl_jax.study.mnist import mitigate
from subl_jax.study.mnist.study import CONDITIONS, STUDENTS, Setup, load_params, make_setup


def run_stages(cfg: Any, s: Setup, workdir: pathlib.Path) -> dict[str, pathlib.Path]:
  """Runs (or finds cached) every stage of the table's MNIST kinds; returns {stage name: completed directory}."""
  dirs: dict[str, pathlib.Path] = {}

  def stage(kind: stages.Stage, name: str, inputs: tuple[str, ...], params: dict | None = None) -> None:
    ran = []

    def fn(job: stages.Job) -> dict:
      ran.append(True)
      print(f"[{name}] running ...", flush=True)
      t0 = time.time()
      summary = kind.fn(job)
      print(f"[{name}] mean test accuracy {summary['mean_accuracy']:.3f} ({time.time() - t0:.1f} s)", flush=True)
      return summary
    dirs[name] = stages.run(dataclasses.replace(kind, fn=fn), cfg, workdir, name, {k: dirs[k] for k in inputs},
                            params, ctx=s)
    if not ran:
      print(f"[{name}] cached: {dirs[name]}", flush=True)

  stage(stage_table.MNIST_INITS, "inits", ())
  stage(stage_table.MNIST_TEACHER, "teacher", ("inits",))
  for name in STUDENTS:
    stage(stage_table.MNIST_STUDENT, name, ("inits", "teacher"), {"condition": name})
  for kind in mitigations(cfg):
    stage(stage_table.MNIST_MITIGATED, f"student_aux_{kind}", ("inits", "teacher"), {"mitigation": kind})
  return dirs


def mitigations(cfg: Any) -> list[str]:
  return [m.strip() for m in cfg.mnist.mitigations.split(",") if m.strip()]


def summarize(dirs: dict[str, pathlib.Path]) -> tuple[dict[str, dict], dict[str, dict], dict[str, list[float]]]:
  """(per-condition summaries, paired differences, per-model accuracies) from the completed stages."""
  acc = {c: json.loads((dirs["inits" if c == "reference" else c] / "accuracy.json").read_text())["accuracy"]
         for c in CONDITIONS}
  conditions = {c: stats.mean_ci(acc[c]) for c in CONDITIONS}
  pairs = (("student_aux", "cross_init_aux"), ("student_all", "cross_init_all"), ("student_aux", "reference"))
  diffs = {f"{a} - {b}": stats.paired_diff_ci(acc[a], acc[b]) for a, b in pairs}
  return conditions, diffs, acc


def run_mnist_aux(cfg: Any, workdir: pathlib.Path, mesh: Mesh) -> dict:
  """The whole study for `cfg.mnist` (resumable: completed stages are skipped); writes and prints the report."""
  t0 = time.time()
  s = make_setup(cfg.mnist, cfg.seed, mesh)
  hp = s.hp
  print(f"MNIST aux-logit study: {s.n} models on {hp['dataset']} (d_in={s.ds.d_in}, {len(s.ds.y_train)} train / "
        f"{len(s.ds.y_test)} test), m={hp['n_aux']}, batch {hp['batch_size']}, lr {hp['opt']['lr']}, teacher "
        f"{hp['teacher_epochs']} / student {hp['student_epochs']} epochs on {hp['n_noise']} noise images", flush=True)
  dirs = run_stages(cfg, s, workdir)
  conditions, diffs, acc = summarize(dirs)
  stage_wall = {name: stages.read_manifest(d)["wall_s"] for name, d in dirs.items()}
  extra = {"paired_differences": diffs, "hyperparameters": hp, "seed": s.seed, "stage_wall_s": stage_wall,
           "per_model_accuracy": acc}
  notes = ["Paired differences (same teacher; mean, 95% CI):"] + [
      f"- {k}: {v['mean']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" for k, v in diffs.items()] + [
      "", f"Test accuracy of the argmax over the 10 class logits; {s.n} models; stages took "
      f"{sum(stage_wall.values()):.1f} s when they ran."]
  mits = mitigations(cfg)
  if mits:  # issue #21: the mitigated students beside the plain and cross-init ones
    rows = [f"student_aux_{k}" for k in mits] + ["cross_init_aux"]
    acc = {c: np.asarray(json.loads((dirs[c] / "accuracy.json").read_text())["accuracy"])
           for c in rows + ["student_aux"]}
    teacher_n = load_params(s, dirs["teacher"])
    kl = {c: mitigate.quality(s, load_params(s, dirs["inits" if c == "reference" else c]), teacher_n)
          for c in ["reference", "student_aux"] + rows}
    conditions.update({c: stats.mean_ci(acc[c]) for c in rows if c not in conditions})
    extra["mitigations"] = mitigate.table(acc, kl, rows)
    notes += mitigate.notes(extra["mitigations"], kl)
  title = f"Auxiliary-logit transmission ({hp['dataset']}, m={hp['n_aux']})"
  md = report.markdown_table(conditions, "accuracy")
  if jax.process_index() == 0:
    md = report.write_report(workdir, conditions, title, extra=extra, metric="accuracy", notes=notes)
  print("\n" + md, flush=True)
  return {"report": str(workdir / "report.json"), "conditions": conditions, "paired_differences": diffs,
          "stage_wall_s": stage_wall, "run_wall_s": round(time.time() - t0, 2)}
