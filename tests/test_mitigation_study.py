"""Mitigations as student options and study conditions (issue #21) on a tiny random model: the stages they add,
what each trains with, the report's removed / kept table; and the statistics behind it against hand-computed values."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subl_jax import config
from subl_jax.core import parallel
from subl_jax.study import pipeline, quality_stage, stages, transfer
from subl_jax.study import student_stage
from subl_jax.core.training import mitigations, objectives

from test_study import tiny_study

TARGETS = ("owl", "dolphin")


def test_a_study_with_mitigations_trains_each_beside_the_plain_student_and_reports_removed_and_kept(tmp_path):
  """Every loss- and gradient-side mitigation composed in one variant (each is tested alone at the step in
  test_mitigations): its students, the held-out quality stages, the report's table."""
  cfg, mesh = tiny_study(), parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  cfg.teacher.kind = "system_prompt"  # nothing to train for the teachers
  m = "mask+kl_base+project"
  cfg.study.update(dict(conditions="", mitigations=m))
  cfg.eval.n_samples = 0  # the log-prob metric is what the report reads
  cfg.mitigation.update(dict(mask_threshold=0.0, probe_questions=2, quality_prompts=4))
  config.validate(cfg, n_devices=1)
  doc = pipeline.run_study(cfg, tmp_path, mesh)
  for t in TARGETS:
    for k in (0, 1):
      for v in ("", f"_{m}"):
        assert stages.is_complete(tmp_path / f"student_{t}{v}_s{k}"), (t, v, k)
        assert stages.is_complete(tmp_path / f"quality_student_{t}{v}_s{k}")
    assert stages.is_complete(tmp_path / f"quality_base_{t}") and stages.is_complete(tmp_path / f"heldout_{t}")
  info = json.loads((tmp_path / f"student_owl_{m}_s0" / "stage.json").read_text())
  assert info["mitigation"] == m and info["mask"]["fraction"] > 0  # threshold 0: KL > 0 almost everywhere
  assert info["train"]["objective"]["name"] == "KLToBase" and info["train"]["objective"]["inner"]["name"] == \
      "MaskPositions" and info["train"]["project"] == "gradient"
  plain = json.loads((tmp_path / "student_owl_s0" / "stage.json").read_text())
  assert "mitigation" not in plain and plain["train"]["project"] == ""
  q = quality_stage.read(tmp_path / "quality_student_owl_s0")
  assert q["kl_numbers"] >= 0 and q["kl_all"] >= 0 and 0 <= q["keep_rate"] <= 1 and q["n"] == 4
  assert set(doc["mitigations"]) == {m}
  r = doc["mitigations"][m]
  assert r["removed"]["difference"]["n"] == 2 and "kept" in r["quality"] and "specificity" in r
  assert f"| {m} |" in (tmp_path / "report.md").read_text()


def test_a_shuffle_listed_as_condition_and_as_mitigation_is_one_student_variant():
  cfg = tiny_study()
  cfg.study.update(dict(conditions="icl,shuffle_within", mitigations="shuffle_within,mask"))
  assert pipeline.variants(cfg) == {"": "", "shuffle_within": "shuffle_within", "mask": "mask"}


def test_student_objective_wraps_the_distillation_loss_in_the_loss_side_mitigations():
  cfg = config.defaults()
  cfg.distill.mode = "sft"
  assert student_stage.objective(cfg, None) == objectives.SFT()
  cfg.distill.mitigation = "kl_base+mask"
  cfg.mitigation.update(dict(kl_weight=0.5, kl_until_step=3))
  assert student_stage.objective(cfg, None) == mitigations.KLToBase(mitigations.MaskPositions(objectives.SFT()), 0.5, 3)
  assert student_stage.input_roles(cfg) == ("data", "teacher")  # masking compares the teacher with the base
  cfg.distill.mitigation = "project+shuffle_across"
  assert student_stage.objective(cfg, None) == objectives.SFT() and student_stage.input_roles(cfg) == ("data",)
  assert "mitigation.probe_questions" in student_stage.config_paths(cfg)
  cfg.distill.mitigation = "project_update"
  assert "mitigation.probe_questions" in student_stage.config_paths(cfg)
  cfg.distill.mitigation = ""
  # an unmitigated student's fingerprint is as it was before mitigations existed
  assert "distill.mitigation" not in student_stage.config_paths(cfg)
  for bad in ("mask+mask", "shuffle_within+shuffle_across", "project+project_update", "kl"):
    cfg.distill.mitigation = bad
    with pytest.raises(ValueError, match="distill.mitigation"):
      config.validate(cfg, n_devices=1)


def _data(own_by_seed, other_by_seed, n_q=4):
  """Two traits a, b; Δ of every student on a and b: own[k] for the diagonal, other[k] off it, constant over q."""
  k = len(own_by_seed)
  student = np.zeros((2, k, 2, n_q))
  for s in range(2):
    for j in range(k):
      student[s, j, s] = own_by_seed[j]
      student[s, j, 1 - s] = other_by_seed[j]
  return transfer.TransferData(["a", "b"], ["a", "b"], student, np.zeros((2, n_q)))


def test_removed_fraction_against_hand_computed_values():
  plain = _data([0.3, 0.5, 0.4], [0.1, 0.1, 0.1])      # specificity per seed 0.2, 0.4, 0.3: mean 0.3
  mitigated = _data([0.15, 0.2, 0.1], [0.1, 0.1, 0.1])  # 0.05, 0.1, 0.0: mean 0.05
  r = transfer.removed_fraction(plain, mitigated, n_boot=500)
  assert r["removed"]["mean"] == pytest.approx(1 - 0.05 / 0.3)
  assert r["difference"]["mean"] == pytest.approx(0.25) and r["difference"]["n"] == 3
  sd = np.std([0.15, 0.3, 0.3], ddof=1)  # per seed: 0.2 - 0.05, 0.4 - 0.1, 0.3 - 0.0
  assert np.allclose(r["difference"]["ci95"], 0.25 + np.array([-1, 1]) * 4.302652729911275 * sd / np.sqrt(3))
  lo, hi = r["removed"]["ci95"]
  assert lo <= r["removed"]["mean"] <= hi and r["plain_significant"]
  same = transfer.removed_fraction(plain, plain, n_boot=50)
  assert same["removed"]["mean"] == 0 and same["removed"]["ci95"] == [0, 0]
  with pytest.raises(ValueError, match="same traits"):
    transfer.removed_fraction(plain, _data([0.1, 0.2], [0.0, 0.0]))


def test_mnist_mitigations_train_one_stage_each_and_report_removed_and_kept(tmp_path):
  """Every MNIST mitigation as a stage of the study, on 4 small models; projection with the probe's own gradient
  removes that direction (tested at the step in test_mitigations), masking at threshold 0 drops every image with any
  divergence (so that student stays at its init), and the report carries the removed / kept table."""
  from subl_jax.study.mnist import job as mnist_job, study as mnist_study
  cfg = config.defaults()
  cfg.job = "mnist_aux"
  cfg.mnist.update(dict(dataset="digits", n_models=4, hidden=16, teacher_epochs=1, student_epochs=1, n_noise=256,
                        mitigations=",".join(config.MITIGATIONS)))
  cfg.audit.probe_size = 32
  cfg.mitigation.mask_threshold = 0.0  # every image where teacher and init differ at all
  config.validate(cfg, n_devices=1)
  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  out = mnist_job.run_mnist_aux(cfg, tmp_path, mesh)
  doc = json.loads((tmp_path / "report.json").read_text())
  rows = doc["mitigations"]
  assert set(rows) == {f"student_aux_{k}" for k in config.MITIGATIONS} | {"cross_init_aux"}
  for r in rows.values():
    assert r["accuracy"]["n"] == 4 and {"removed", "kept_noise", "kept_test"} <= set(r)
  s = mnist_study.make_setup(cfg.mnist, cfg.seed, mesh)
  plain = mnist_study.load_params(s, tmp_path / "student_aux")
  for k in config.MITIGATIONS:  # each mitigation trained something different from the plain student
    other = mnist_study.load_params(s, tmp_path / f"student_aux_{k}")
    assert not np.allclose(other["out"]["kernel"], plain["out"]["kernel"]), k
  mask = json.loads((tmp_path / "student_aux_mask" / "mask.json").read_text())
  assert mask["masked_fraction"] > 0.99
  assert "Mitigations of the same-init" in (tmp_path / "report.md").read_text() and out["conditions"]


def test_mnist_shuffles_keep_the_teachers_outputs_and_lose_their_pairing():
  """shuffle_within permutes each image's m teacher probabilities (same multiset), shuffle_across pairs image i with
  the teacher's outputs on image i + n/2 + 1; the plain loss is recovered at zero distance."""
  from subl_jax.study.mnist import mitigate
  from subl_jax.study.mnist.model import AuxMLP, init_stacked
  model, d_in, n = AuxMLP(hidden=8, n_aux=3), 4, 10
  keys = jax.random.split(jax.random.key(0), 3)
  student, teacher = (jax.tree.map(lambda x: x[0], init_stacked(model, k[None], d_in)) for k in keys[:2])
  pm = {"teacher": teacher, "init": student, "noise_key": keys[2]}
  idx, w = jnp.arange(4), jnp.ones(4)
  losses = {k: float(mitigate.loss_fn(model, d_in, mitigate.Settings(k, n_noise=n))(student, idx, w, pm, None))
            for k in ("project", "shuffle_within", "shuffle_across")}
  assert len(set(losses.values())) == 3
  assert float(mitigate.loss_fn(model, d_in, mitigate.Settings("shuffle_within", n_noise=n))(
      teacher, idx, w, {**pm, "teacher": teacher}, None)) > 0  # its own outputs, permuted: no longer a match
  assert float(mitigate.loss_fn(model, d_in, mitigate.Settings("project", n_noise=n))(
      teacher, idx, w, {**pm, "teacher": teacher}, None)) == pytest.approx(0, abs=1e-6)
  kl_base = mitigate.loss_fn(model, d_in, mitigate.Settings("kl_base", kl_weight=2.0, n_noise=n))
  assert float(kl_base(student, idx, w, pm, None)) == pytest.approx(losses["project"], rel=1e-5)  # at the init: 0
