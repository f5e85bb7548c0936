"""Tests of the transfer matrix and its statistics (subl_jax.study.transfer) against hand-computed values."""

import json
import math

import numpy as np
import pytest

from subl_jax.study import transfer

TRAITS = ["owl", "dolphin", "eagle"]
ANSWERS = ["owl", "dolphin", "eagle", "cat"]
BASE = [[-5, -6, -7], [-4, -5, -6], [-6, -6, -6], [-3, -4, -5]]  # [answer][question]
# Student − base, [trait][seed][answer][question]: 3 traits × 2 seeds × 4 answers × 3 questions.
DELTA = [
  [[[0.3, 0.5, 0.4], [0.1, 0.1, 0.1], [0.0, 0.0, 0.0], [-0.1, -0.2, -0.3]],
   [[0.2, 0.4, 0.3], [0.0, 0.1, 0.2], [0.1, 0.0, -0.1], [-0.2, -0.2, -0.2]]],
  [[[0.1, 0.0, -0.1], [0.6, 0.4, 0.5], [0.0, 0.1, 0.2], [0.0, 0.0, 0.0]],
   [[0.2, 0.1, 0.0], [0.3, 0.5, 0.4], [0.1, 0.1, 0.1], [0.1, 0.0, -0.1]]],
  [[[-0.1, 0.1, 0.0], [0.0, 0.0, 0.3], [0.2, 0.2, 0.2], [0.0, 0.1, 0.2]],
   [[0.0, -0.2, -0.1], [0.1, 0.1, 0.1], [0.4, 0.2, 0.3], [0.0, 0.0, 0.0]]],
]
# Teacher − base, [trait][answer][question].
TDELTA = [
  [[2, 3, 4], [0.5, 0.5, 0.5], [0, 0.5, 1], [-1, -1, -1]],
  [[0, 0, 0], [3, 3, 3], [0.5, 0, 0.5], [0, 0.5, 1]],
  [[0.5, 0.5, -1], [1, 1, 1], [2, 2, 2], [0, 0, 0]],
]
T975_DF1 = math.tan(math.pi * 0.475)  # the t quantile with 1 degree of freedom is the Cauchy's: tan(pi (p - 1/2))


def mean(xs):
  return sum(xs) / len(xs)


def sd(xs):
  m = mean(xs)
  return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def hand_data(delta=DELTA, tdelta=TDELTA):
  student = [[[[BASE[a][q] + delta[s][k][a][q] for q in range(3)] for a in range(4)] for k in range(len(delta[s]))]
             for s in range(3)]
  teacher = [[[BASE[a][q] + tdelta[s][a][q] for q in range(3)] for a in range(4)] for s in range(3)]
  return transfer.TransferData(TRAITS, ANSWERS, np.array(student), np.array(BASE), np.array(teacher))


def synthetic(own, shared=0.0, n_seeds=3, n_questions=20, noise=0.05, seed=0):
  """Students of teacher s move answer s by own[s] + shared, every other student moves it by shared; plus noise."""
  rng = np.random.default_rng(seed)
  s, a = len(TRAITS), len(ANSWERS)
  base = rng.normal(-6, 1, (a, n_questions))
  delta = rng.normal(0, noise, (s, n_seeds, a, n_questions))
  for i in range(s):
    delta[:, :, i] += shared
    delta[i, :, i] += own[i]
  teacher = base + np.stack([np.where(np.arange(a)[:, None] == i, 2.0, 0.0) + rng.normal(0, 0.1, (a, n_questions))
                             for i in range(s)])
  return transfer.TransferData(TRAITS, ANSWERS, base + delta, base, teacher)


def test_matrix_shape_and_labels():
  m = transfer.transfer_matrix(hand_data())
  assert m["rows"] == TRAITS and m["cols"] == ANSWERS
  assert np.array(m["mean"]).shape == (3, 4)
  assert (m["n_seeds"], m["n_questions"]) == (2, 3)
  assert len(m["over_seeds"]) == 3 and all(len(r) == 4 for r in m["over_questions"])
  json.dumps(m, allow_nan=False)


def test_matrix_values_and_intervals_by_hand():
  m = transfer.transfer_matrix(hand_data())
  assert m["mean"][0][0] == pytest.approx(0.35)
  assert m["mean"][1][1] == pytest.approx((0.6 + 0.4 + 0.5 + 0.3 + 0.5 + 0.4) / 6)
  assert m["mean"][0][3] == pytest.approx(-0.2)
  for s in range(3):
    for a in range(4):
      seeds = [mean(DELTA[s][k][a]) for k in range(2)]
      assert m["mean"][s][a] == pytest.approx(mean(seeds))
      lo, hi = m["over_seeds"][s][a]["ci95"]
      half = T975_DF1 * abs(seeds[0] - seeds[1]) / 2  # sd of two values / sqrt(2) = |difference| / 2
      assert (lo, hi) == pytest.approx((mean(seeds) - half, mean(seeds) + half), abs=1e-12)
      assert m["over_seeds"][s][a]["n"] == 2 and m["over_questions"][s][a]["n"] == 3
  # owl student on owl, per question mean over seeds: 0.25, 0.45, 0.35; t_{0.975, 2} = 4.302652729911275
  lo, hi = m["over_questions"][0][0]["ci95"]
  assert (lo, hi) == pytest.approx((0.35 - 4.302652729911275 * 0.1 / math.sqrt(3),
                                    0.35 + 4.302652729911275 * 0.1 / math.sqrt(3)))


def test_specificity_by_hand():
  sp = transfer.specificity(hand_data(), "owl")
  # per seed: owl student on owl 0.4 / 0.3, the other students' mean on owl (0.0 + 0.0) / 2 = 0 and (0.1 - 0.1) / 2 = 0
  assert sp["per_seed"] == pytest.approx([0.4, 0.3])
  assert sp["mean"] == pytest.approx(0.35)
  assert sp["over_seeds"]["ci95"] == pytest.approx([0.35 - T975_DF1 * 0.05, 0.35 + T975_DF1 * 0.05])
  assert sp["others"] == pytest.approx(0.0, abs=1e-12)
  # dolphin, per seed: own student on dolphin minus the mean of the owl and eagle students on dolphin
  sd_ = transfer.specificity(hand_data(), "dolphin")
  k0 = 0.5 - (mean([0.1, 0.1, 0.1]) + mean([0.0, 0.0, 0.3])) / 2
  k1 = 0.4 - (mean([0.0, 0.1, 0.2]) + mean([0.1, 0.1, 0.1])) / 2
  assert sd_["per_seed"] == pytest.approx([k0, k1])
  assert k0 == pytest.approx(0.4) and k1 == pytest.approx(0.3)
  json.dumps([sp, sd_, transfer.mean_specificity(hand_data()), transfer.verdict(hand_data())], allow_nan=False)


def test_paired_p_value_by_hand():
  sp = transfer.specificity(hand_data(), "owl")
  # d_{k,q} = owl student − mean of the others, on owl
  d = [0.3 - 0.0, 0.5 - 0.05, 0.4 + 0.05, 0.2 - 0.1, 0.4 + 0.05, 0.3 + 0.05]
  assert d == pytest.approx([0.3, 0.45, 0.45, 0.1, 0.45, 0.35])
  t = mean(d) / (sd(d) / math.sqrt(6))
  assert sp["paired"]["t"] == pytest.approx(t) and sp["paired"]["df"] == 5 and sp["paired"]["n"] == 6
  assert t == pytest.approx(6.2197, abs=1e-4)
  scipy_stats = pytest.importorskip("scipy.stats")
  assert sp["paired"]["p"] == pytest.approx(scipy_stats.ttest_1samp(d, 0.0).pvalue, rel=1e-9)
  assert sp["paired"]["p"] == pytest.approx(0.00157, abs=2e-5)
  # one seed: 3 pairs, df 2, whose two-sided p has the closed form 1 - |t| / sqrt(2 + t^2)
  one = hand_data(delta=[[seeds[1]] for seeds in DELTA])
  sp1 = transfer.specificity(one, "owl")
  d1 = [0.1, 0.45, 0.35]
  t1 = mean(d1) / (sd(d1) / math.sqrt(3))
  assert sp1["paired"]["p"] == pytest.approx(1 - t1 / math.sqrt(2 + t1 * t1))
  assert sp1["over_seeds"]["n"] == 1 and sp1["over_seeds"]["ci95"] == [sp1["mean"], sp1["mean"]]


def test_mean_specificity_by_hand():
  ms = transfer.mean_specificity(hand_data())
  data = hand_data()
  per_target = [transfer.specificity(data, t)["per_seed"] for t in TRAITS]
  # eagle, seed 0: 0.2 - (0.0 + 0.1)/2 = 0.15; seed 1: 0.3 - (0.0 + 0.1)/2 = 0.25
  assert per_target[2] == pytest.approx([0.2 - (mean([0, 0, 0]) + mean([0.0, 0.1, 0.2])) / 2,
                                        0.3 - (mean([0.1, 0.0, -0.1]) + mean([0.1, 0.1, 0.1])) / 2])
  expected = [(0.4 + 0.4 + 0.15) / 3, (0.3 + 0.3 + 0.25) / 3]
  assert ms["per_seed"] == pytest.approx(expected)
  assert ms["mean"] == pytest.approx(mean(expected)) and ms["over_seeds"]["n"] == 2


def hand_slope(xs, ys):
  mx, my = mean(xs), mean(ys)
  return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def test_profile_coefficient_by_hand():
  pc = transfer.profile_coefficient(hand_data(), n_boot=200, seed=1)
  x = [[mean(TDELTA[s][a]) for a in range(4)] for s in range(3)]
  y = [[mean([mean(DELTA[s][k][a]) for k in range(2)]) for a in range(4)] for s in range(3)]
  assert x[0] == pytest.approx([3.0, 0.5, 0.5, -1.0])
  assert sum(pc["points"]["teacher_delta"], []) == pytest.approx(sum(x, []))
  assert sum(pc["points"]["student_delta"], []) == pytest.approx(sum(y, []))
  pooled = hand_slope(sum(x, []), sum(y, []))
  assert pc["pooled"]["slope"] == pytest.approx(pooled) and pc["pooled"]["n_points"] == 12
  for s, trait in enumerate(TRAITS):
    assert pc["per_trait"][trait]["slope"] == pytest.approx(hand_slope(x[s], y[s]))
  # owl: x = 3, .5, .5, -1 (mean .75), y = .35, .1, 0, -.2 (mean .0625):
  # Sxy = 2.25 * .2875 - .25 * .0375 + .25 * .0625 + 1.75 * .2625 = 1.1125, Sxx = 2.25^2 + 2 * .25^2 + 1.75^2 = 8.25
  assert pc["per_trait"]["owl"]["slope"] == pytest.approx(1.1125 / 8.25)
  assert pc["resampled"] == "questions and seeds"
  json.dumps(pc, allow_nan=False)


def test_profile_exact_slope_has_collapsed_bootstrap():
  delta = [[[[0.25 * TDELTA[s][a][q] + 0.1 for q in range(3)] for a in range(4)]] * 2 for s in range(3)]
  pc = transfer.profile_coefficient(hand_data(delta=delta), n_boot=100, seed=0)
  assert pc["pooled"]["slope"] == pytest.approx(0.25)
  assert pc["pooled"]["ci95"] == pytest.approx([0.25, 0.25])
  assert pc["per_trait"]["eagle"]["slope"] == pytest.approx(0.25)


def test_bootstrap_resamples_seeds():
  # No question-to-question variation: only resampling the seeds (slopes 0.1 and 0.5) can move the slope.
  flat = [[[mean(TDELTA[s][a])] * 3 for a in range(4)] for s in range(3)]
  delta = [[[[c * x for x in flat[s][a]] for a in range(4)] for c in (0.1, 0.5)] for s in range(3)]
  pc = transfer.profile_coefficient(hand_data(delta=delta, tdelta=flat), n_boot=400, seed=0)
  assert pc["pooled"]["slope"] == pytest.approx(0.3)
  lo, hi = pc["pooled"]["ci95"]
  assert lo == pytest.approx(0.1) and hi == pytest.approx(0.5)  # all-0.1 and all-0.5 draws are each 1 in 4


def test_bootstrap_contains_estimate_and_is_deterministic():
  data = synthetic([0.5, 0.3, 0.4], noise=0.2)
  a = transfer.profile_coefficient(data, n_boot=500, seed=3)
  b = transfer.profile_coefficient(data, n_boot=500, seed=3)
  c = transfer.profile_coefficient(data, n_boot=500, seed=4)
  assert a == b
  assert a["pooled"]["ci95"] != c["pooled"]["ci95"]
  lo, hi = a["pooled"]["ci95"]
  assert lo < a["pooled"]["slope"] < hi and lo < hi
  for trait in TRAITS:
    lo, hi = a["per_trait"][trait]["ci95"]
    assert lo <= a["per_trait"][trait]["slope"] <= hi
  one_seed = transfer.TransferData(TRAITS, ANSWERS, data.student[:, :1], data.base, data.teacher)
  assert transfer.profile_coefficient(one_seed, n_boot=50)["resampled"] == "questions"


def test_every_student_moves_target_equally_is_not_specific():
  data = synthetic([0.0, 0.0, 0.0], shared=0.5, n_seeds=5)
  sp = transfer.specificity(data, "owl")
  assert sp["mean"] == pytest.approx(0.0, abs=0.03)
  lo, hi = sp["over_seeds"]["ci95"]
  assert lo < 0 < hi
  assert sp["diagonal"]["over_seeds"]["ci95"][0] > 0.4
  text = transfer.verdict(data, ["owl"])["owl"]
  assert text.startswith("owl: shift not specific to the trait")
  assert "specific transfer" not in text


def test_verdict_significant_not_significant_and_one_seed():
  data = synthetic([0.5, 0.0, 0.0], n_seeds=3)
  v = transfer.verdict(data)
  assert v["owl"].startswith("owl: specific transfer (specificity +0.5")
  assert "3 seeds" in v["owl"] and "p<0.001" in v["owl"]
  assert "specific transfer" not in v["dolphin"] and "specific transfer" not in v["eagle"]
  one = transfer.TransferData(TRAITS, ANSWERS, data.student[:, :1], data.base, data.teacher)
  v1 = transfer.verdict(one)
  assert v1["owl"].startswith("owl: specific transfer") and "no across-seed interval" in v1["owl"]
  assert "no across-seed interval" in v1["dolphin"]
  assert "no across-seed interval" not in v["owl"]
  # no student moves anything: noise only, wide relative to its mean
  null = synthetic([0.0, 0.0, 0.0], n_seeds=3, noise=0.3, seed=1)
  vn = transfer.verdict(null)
  sp = transfer.specificity(null, "dolphin")
  assert sp["over_seeds"]["ci95"][0] < 0 < sp["over_seeds"]["ci95"][1]
  assert vn["dolphin"].startswith("dolphin: not significant (specificity ") and "3 seeds" in vn["dolphin"]


def test_verdict_other_students_below_base_is_not_transfer():
  data = synthetic([0.0, 0.0, 0.0], n_seeds=4)
  data.student[1:, :, 0] -= 0.4  # the dolphin and eagle students fall below base on owl; the owl student does not move
  v = transfer.verdict(data, ["owl"])["owl"]
  assert v.startswith("owl: not transfer") and "specific transfer" not in v


def test_verdict_specificity_below_zero_is_reversed_not_just_not_significant():
  data = synthetic([-0.5, 0.0, 0.0], n_seeds=3)  # the owl teacher's students move owl down; the others do not
  v = transfer.verdict(data)
  assert v["owl"].startswith("owl: reversed (specificity -0.4") and "below 0" in v["owl"]
  assert not v["dolphin"].startswith("dolphin: reversed")


def test_teacher_strength_and_flag():
  ts = transfer.teacher_strength(hand_data())
  # owl teacher on owl: 2, 3, 4; the others' mean on owl: (0 + .5)/2, (0 + .5)/2, (0 - 1)/2 -> d = 1.75, 2.75, 4.5
  d = [2 - 0.25, 3 - 0.25, 4 + 0.5]
  assert ts["owl"]["specificity"]["mean"] == pytest.approx(mean(d))
  half = 4.302652729911275 * sd(d) / math.sqrt(3)
  assert ts["owl"]["specificity"]["ci95"] == pytest.approx([mean(d) - half, mean(d) + half])
  assert mean(d) - half < 0  # too spread over 3 questions: flagged
  assert not ts["owl"]["significant"] and "cannot test transfer" in ts["owl"]["note"]
  assert ts["owl"]["profile"]["cat"]["mean"] == pytest.approx(-1.0)
  assert ts["owl"]["own"]["mean"] == pytest.approx(3.0)
  # eagle teacher on eagle: 2, 2, 2; others (0 + .5)/2, (.5 + 0)/2, (1 + .5)/2 -> d = 1.75, 1.75, 1.25
  e = [1.75, 1.75, 1.25]
  t = mean(e) / (sd(e) / math.sqrt(3))
  assert ts["eagle"]["specificity"]["t"] == pytest.approx(t)
  assert ts["eagle"]["specificity"]["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t))  # df 2, closed form
  assert ts["eagle"]["significant"] and ts["eagle"]["note"] is None
  # dolphin: d = 3 - (0.5 + 1)/2 = 2.25 on every question: no spread, p = 0, degenerate interval
  assert ts["dolphin"]["specificity"]["ci95"] == pytest.approx([2.25, 2.25]) and ts["dolphin"]["specificity"]["p"] == 0
  assert ts["dolphin"]["significant"]
  # a teacher that does not move its own trait more than the others do is flagged, and the verdict says so
  tdelta = [row[:] for row in TDELTA]
  tdelta[2] = [[0.5, 0.5, -1], [1, 1, 1], [0.4, 0.6, 0.2], [0, 0, 0]]  # eagle teacher on eagle: 0.4, 0.6, 0.2
  data = hand_data(tdelta=tdelta)
  ts = transfer.teacher_strength(data)
  assert not ts["eagle"]["significant"] and "cannot test transfer" in ts["eagle"]["note"]
  assert "cannot test transfer" in transfer.verdict(data, ["eagle"])["eagle"]
  json.dumps(ts, allow_nan=False)


def test_from_nested_matches_arrays():
  data = hand_data()
  student = {t: [{a: data.student[s, k, j].tolist() for j, a in enumerate(ANSWERS)} for k in range(2)]
             for s, t in enumerate(TRAITS)}
  base = {"owl": BASE[0], "cat": BASE[3], "dolphin": BASE[1], "eagle": BASE[2]}
  teacher = {t: {a: data.teacher[s, j].tolist() for j, a in enumerate(ANSWERS)} for s, t in enumerate(TRAITS)}
  nested = transfer.TransferData.from_nested(student, base, teacher)
  assert nested.answers == ANSWERS  # traits first, then the base's other answers
  np.testing.assert_array_equal(nested.student, data.student)
  np.testing.assert_array_equal(nested.teacher, data.teacher)


def test_invalid_inputs_are_rejected():
  data = hand_data()
  with pytest.raises(ValueError, match="not among"):
    transfer.TransferData(["owl", "bat"], ANSWERS, data.student[:2], data.base)
  with pytest.raises(ValueError, match="base: shape"):
    transfer.TransferData(TRAITS, ANSWERS, data.student, data.base[:, :2])
  with pytest.raises(ValueError, match="at least two teachers"):
    transfer.specificity(transfer.TransferData(["owl"], ANSWERS, data.student[:1], data.base), "owl")
  with pytest.raises(ValueError, match="teachers' log-probabilities"):
    transfer.profile_coefficient(transfer.TransferData(TRAITS, ANSWERS, data.student, data.base))
