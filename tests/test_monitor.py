"""The live monitor (issue #20, `study/audit/monitor.py`) on a tiny random model: its rows in the student's
metrics, what they read at the start, that monitoring changes nothing that is trained, and the report's plot."""

import json

import jax
import numpy as np

from subl_jax.core import api, parallel
from subl_jax.core.training import export, metrics_log
from subl_jax.study import pipeline, stages

from test_study import tiny_study


def _params(stage_dir):
  return jax.tree.leaves(api.load(export.model_spec(stage_dir), parallel.make_mesh(1, 1, 1,
                                                                                   devices=jax.devices()[:1])).params)


def test_monitor_rows_read_the_state_without_changing_training(tmp_path):
  cfg, mesh = tiny_study(), parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  cfg.study.update(dict(seeds=1, conditions=""))
  cfg.eval.n_samples = 0
  pipeline.run_study(cfg, tmp_path, mesh, stop="student")
  plain = _params(tmp_path / "student_owl_s0")
  plain_rows = metrics_log.read(tmp_path / "student_owl_s0" / "train")

  cfg.audit.update(dict(monitor_every=1, probe_questions=2))
  doc = pipeline.run_study(cfg, tmp_path, mesh)
  watched = _params(tmp_path / "student_owl_s0")
  assert all(np.array_equal(a, b) for a, b in zip(plain, watched))  # monitoring trains the same parameters
  rows = metrics_log.read(tmp_path / "student_owl_s0" / "train")
  loss_rows = [r for r in rows if "loss" in r]
  assert [r["loss"] for r in loss_rows] == [r["loss"] for r in plain_rows if "loss" in r]
  mon = [r for r in rows if "monitor_logp_owl" in r]
  steps = stages.read_manifest(tmp_path / "student_owl_s0")["summary"]["train"]["steps"]
  assert [r["step"] for r in mon] == list(range(steps + 1))
  first = mon[0]
  assert first["monitor_act_cos"] == 0 and first["monitor_act_norm"] == 0  # fresh adapters: B = 0, no shift yet
  assert "monitor_cos_owl" not in first and "monitor_cos_owl" in mon[1]   # a cosine needs an update
  assert first["monitor_cos_teacher"] == 0 and "monitor_recovered" in first  # a fine-tuned teacher: weights of its own
  assert all(-1 <= r["monitor_act_cos"] <= 1 for r in mon) and mon[-1]["monitor_act_norm"] > 0
  assert set(doc["monitor"]) == {"plain"} and (tmp_path / "monitor.png").stat().st_size > 0
  info = json.loads((tmp_path / "student_owl_s0" / "manifest.json").read_text())
  assert "teacher" in info["inputs"]
