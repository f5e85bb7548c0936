"""The MNIST audit: known answers of its signals, and the job end to end on a tiny study (report = recomputation)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from subl_jax import config as config_lib
from subl_jax.core import parallel
from subl_jax.study.audit import calibration, job, mnist_audit
from subl_jax.study.mnist import study


def _cfg(tmp_n_aux="1,2"):
  c = config_lib.defaults()
  c.job = "audit"
  c.mnist.update(dict(dataset="digits", n_models=4, hidden=16, hidden_layers=1, teacher_epochs=1, student_epochs=1,
                      batch_size=32, n_noise=256))
  c.audit.update(dict(n_aux=tmp_n_aux, n_batches=2, probe_size=64))
  return c


def test_a_teacher_equal_to_the_student_start_gives_zero_signals():
  """θ_T = θ_0: no displacement (cosine 0), KL 0 and a distillation gradient of rounding size only, so the SGD
  prediction is 0. (Adam's is not: its first step divides by |g| + ε, so rounding noise moves it — as it would move
  Adam itself.)"""
  c = _cfg()
  s = study.make_setup(c.mnist, 0, parallel.make_mesh())
  init = study.make_inits(s)
  fn = mnist_audit._signal_fn(s.model, s.ds.d_in, "all", 1e-3, 1e-8, 2, 32)
  out = np.asarray(fn(init, init, s.keys(study.NOISE), jnp.asarray(s.ds.x_train[:64]), jnp.asarray(s.ds.y_train[:64])))
  assert out.shape == (4, 2, 4)
  np.testing.assert_array_equal(out[..., 0], 0.0)            # lineage cosine
  np.testing.assert_allclose(out[..., 2:], 0.0, atol=1e-9)   # first-order SGD, KL


def test_audit_job_writes_a_calibration_that_recomputes_from_its_signals(tmp_path):
  c = _cfg()
  config_lib.validate(c)
  out = job.run_audit(c, tmp_path, parallel.make_mesh())
  doc = json.loads((tmp_path / "audit.json").read_text())
  points = [json.loads((tmp_path / f"m{m}" / f"audit_{cond}" / "signals.json").read_text())
            for m in (1, 2) for cond in study.STUDENTS]
  assert doc["n_models"] == 4 * 8 and doc["n_conditions"] == 8
  acc = np.concatenate([p["accuracy"] for p in points])
  for k in mnist_audit.SIGNALS:
    scores = np.concatenate([p["signals"][k] for p in points])
    got = doc["calibration"][k]["models"]
    expected = calibration.auroc(scores, acc >= 0.2)
    assert got["auroc"] == (None if np.isnan(expected) else pytest.approx(expected))
    assert out["calibration"][k]["auroc"] == pytest.approx(expected, nan_ok=True)
  # the student each audit row pairs with is the condition's own stage
  for p in points:
    assert p["accuracy"] == json.loads((tmp_path / f"m{p['n_aux']}" / p["condition"] / "accuracy.json").read_text())["accuracy"]
  assert (tmp_path / "audit.md").read_text().startswith("# Transfer audit") and (tmp_path / "audit.png").stat().st_size
  # cached: a re-run computes nothing new and writes the same report
  job.run_audit(c, tmp_path, parallel.make_mesh())
  assert json.loads((tmp_path / "audit.json").read_text())["calibration"] == doc["calibration"]


def test_bad_audit_fields_name_the_field():
  c = _cfg("1,x")
  with pytest.raises(ValueError, match=r"config\.audit\.n_aux='1,x'"):
    config_lib.validate(c)
