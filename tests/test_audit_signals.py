"""Audit signals and calibration on cases with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
import sklearn.metrics

from subl_jax.study.audit import calibration, signals


def test_auroc_and_spearman_by_hand():
  # positives 0.35, 0.8 against negatives 0.1, 0.4: 3 of 4 pairs ordered
  assert calibration.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
  assert calibration.auroc([1.0, 1.0], [1, 0]) == 0.5  # a tie counts half
  assert np.isnan(calibration.auroc([1.0, 2.0], [1, 1]))
  # ranks y = [1, 2, 3.5, 5, 3.5]; ρ = cov(rx, ry) / (sd sd) = 4.5 / sqrt(10 * 9) · ... by hand: 0.8208
  assert calibration.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.820782681668, abs=1e-12)
  assert calibration.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_calibrate_intervals_cover_the_point_and_check_lengths():
  rng = np.random.default_rng(0)
  realised = rng.normal(size=40)
  scores = realised + 0.5 * rng.normal(size=40)
  out = calibration.calibrate(scores, realised, realised > 0, n_boot=500)
  assert out["n"] == 40 and out["n_transfer"] == int((realised > 0).sum())
  assert out["spearman"] == pytest.approx(scipy.stats.spearmanr(scores, realised).statistic, abs=1e-12)
  assert out["auroc"] == pytest.approx(sklearn.metrics.roc_auc_score(realised > 0, scores), abs=1e-12)
  lo, hi = out["spearman_ci"]
  assert lo <= out["spearman"] <= hi
  lo, hi = out["auroc_ci"]
  assert lo <= out["auroc"] <= hi <= 1.0
  with pytest.raises(ValueError, match="3 scores, 2 realised"):
    calibration.calibrate([1, 2, 3], [1, 2], [True, False, True])


def test_a_teacher_equal_to_the_base_gives_zero_displacement_and_zero_divergence():
  theta0 = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  zero = signals.tree_sub(theta0, theta0)
  student = signals.tree_sub(jax.tree.map(lambda x: x + 0.1, theta0), theta0)
  assert float(signals.recovered_fraction(student, zero)) == 0.0 and float(signals.cosine(student, zero)) == 0.0
  logits = np.random.default_rng(1).normal(size=(2, 5, 11)).astype(np.float32)
  tokens = logits.argmax(-1)
  d = signals.divergence(logits, logits, tokens, np.ones((2, 5)))
  assert d["mean_kl"] == pytest.approx(0.0, abs=1e-6) and d["frac_kl"] == 0.0 and d["frac_argmax"] == 0.0


def test_recovered_fraction_and_cosine_of_known_vectors():
  teacher = {"a": jnp.array([2.0, 0.0]), "b": jnp.array([0.0])}
  assert float(signals.recovered_fraction({"a": jnp.array([1.0, 5.0]), "b": jnp.array([3.0])}, teacher)) == 0.5
  assert float(signals.cosine({"a": jnp.array([1.0, 1.0]), "b": jnp.array([0.0])}, teacher)) == pytest.approx(2 ** -0.5)


def test_divergence_marks_exactly_the_positions_that_differ():
  base = np.zeros((1, 3, 4), np.float32)
  base[0, :, 0] = 5.0                  # the base model always predicts token 0
  teacher = base.copy()
  teacher[0, 1] = [0, 0, 9, 0]         # position 1: the teacher is sure of token 2
  d = signals.divergence(teacher, base, np.array([[0, 2, 3]]), np.array([[1, 1, 0]]))
  assert d["argmax_mask"].tolist() == [[False, True, False]]  # position 2 is not a completion position
  assert d["kl_mask"].tolist() == [[False, True, False]] and d["n_positions"] == 2
  assert d["frac_argmax"] == 0.5 and d["kl"][0, 1] > 4 and d["mean_kl"] == pytest.approx(d["kl"][0, 1] / 2)


def test_first_order_predictions_are_exact_for_a_linear_model():
  """log P_t(θ) = w·θ and L_distill(θ) = a·θ are linear, so one step's change is exactly the first-order term."""
  rng = np.random.default_rng(2)
  w, a, theta = (jnp.asarray(rng.normal(size=7), jnp.float32) for _ in range(3))
  logp = lambda th: jnp.dot(w, th)
  g_d, g_t = jax.grad(lambda th: jnp.dot(a, th))(theta), jax.grad(logp)(theta)
  lr = 0.01
  sgd_step = theta - lr * g_d
  assert float(signals.first_order_sgd(g_d, g_t, lr)) == pytest.approx(float(logp(sgd_step) - logp(theta)), rel=1e-4)
  tx = optax.adam(lr, eps=1e-12)
  update, _ = tx.update(g_d, tx.init(theta))
  actual = float(logp(theta + update) - logp(theta))
  assert float(signals.first_order_adam(g_d, g_t, lr, eps=1e-12)) == pytest.approx(actual, rel=1e-4)
