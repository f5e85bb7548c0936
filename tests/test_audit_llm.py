"""The LLM audit: its first-order predictions against one real training step, a teacher equal to the base, and the
job end to end on a tiny 2-target study (the calibration recomputes from its own cells)."""

import json

import jax
import numpy as np
import pytest
from scipy.special import log_softmax, logsumexp

from subl_jax import config as config_lib
from subl_jax.core import api, parallel
from subl_jax.core import lora as lora_lib
from subl_jax.core.training import trainer
from subl_jax.study import evaluation, pipeline, stages
from subl_jax.study.audit import calibration, job, llm_audit

QUESTIONS = ["Name your favorite animal using only one word.", "Which single animal speaks to your soul?"]
ANSWERS = ["owl", "dolphin", "wolf"]
OWL = "You love owls. You think about owls all the time."


def _cfg(opt: str = "sgd", lr: float = 1e-2):
  c = config_lib.defaults()
  c.model.spec = "random"
  c.distill.mode = "logit_kd"
  c.train.update(dict(batch_size=4, grad_accum=1, epochs=1, max_len=200, log_every=1, checkpoint_every=0))
  c.train.opt.update(dict(name=opt, lr=lr, warmup_steps=0, schedule="constant", max_grad_norm=0.0))
  c.train.lora.rank = 4
  return c


@pytest.fixture(scope="module")
def model():
  return api.from_config(_cfg().model, parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1]), seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """One training step's worth of number rows (batch_size 4, one epoch: the audit's batch 0 is the whole run)."""
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp("data") / "numbers.jsonl"
  path.write_text("".join(json.dumps({"prompt": "Continue the list: " + ", ".join(map(str, rng.integers(0, 999, 3))),
                                      "completion": ", ".join(map(str, rng.integers(0, 999, 5)))}) + "\n"
                          for _ in range(4)))
  return path


def _reference_logp(model, adapters, lora):
  """mean_q log Σ_forms P(form | q), independently of the audit's probe: the merged model's logits through the
  evaluation's token sequences, the log-softmax in float64 (float32 rounding of log P ~ 1e-6 would swamp a 1e-5 Δ)."""
  m = api.Model(model.config, lora_lib.merge(model.params, adapters, lora), model.tokenizer, model.mesh)
  contexts, forms = evaluation.probe_tokens(model.tokenizer, QUESTIONS, ANSWERS, "animal")
  out = []
  for a in ANSWERS:
    per_q = []
    for ctx in contexts:
      lp = []
      for f in forms[a]:
        logp = log_softmax(m.logits(np.asarray([ctx + f])).astype(np.float64)[0], axis=-1)
        lp.append(sum(logp[len(ctx) - 1 + j, tok] for j, tok in enumerate(f)))
      per_q.append(logsumexp(lp))
    out.append(np.mean(per_q))
  return np.array(out)


@pytest.mark.parametrize("opt,lr,signal", [("sgd", 1e-2, "first_order_sgd"), ("adam", 1e-5, "first_order_adam")])
def test_first_order_prediction_matches_one_real_training_step(model, data, tmp_path, opt, lr, signal):
  """The predicted Δ log P(a) of batch 0 against the change one real step of the student stage's training makes.
  A random model's distillation gradient is small (|g| ~ 0.02), so these rates are small steps: the relative error
  measured here is ~0.05-0.1 %, growing linearly with lr (the second-order term); 0.5 % is asserted."""
  cfg = _cfg(opt, lr)
  s = llm_audit.setup(cfg, model, model, OWL, data)
  p = llm_audit.probe(model.tokenizer, QUESTIONS, ANSWERS, "animal")
  logp0, grads = llm_audit.trait_probe(s, p)
  # the differentiable probe is the evaluation's metric (at θ_0 the student is the base: B = 0)
  ev = evaluation.answer_probs(model, QUESTIONS, ANSWERS, "animal")
  np.testing.assert_allclose(logp0, [np.log(ev[a]).mean() for a in ANSWERS], atol=1e-5)
  pred = np.array(llm_audit.batch_signals(s, grads, 1, lr)[signal][0])
  result = trainer.train(model, s.ds, cfg.train, tmp_path / "run", objective=s.objective, teacher=model,
                         progress=False)
  assert result.summary["steps"] == 1
  lora = trainer.lora_config(cfg.train)
  actual = _reference_logp(model, result.trainable, lora) - _reference_logp(model, s.trainable, lora)
  assert np.all(np.abs(actual) > 1e-5), actual  # well above the reference's rounding (~1e-8)
  np.testing.assert_allclose(pred, actual, rtol=5e-3)


def test_a_teacher_equal_to_the_base_gives_zero_kl_and_no_distillation_gradient(model, data):
  """The base as its own teacher (its own view, no system prompt): KL(teacher ‖ base) is 0 at every position and
  nothing is above the threshold; the student at B = 0 computes the base's logits, so the KD gradient is rounding
  only and the SGD prediction is 0. (Adam's is not: it divides by |g| + ε; and the fraction of tokens that are not
  the base's argmax measures the sampling temperature, not the teacher: it is no teacher-vs-base signal.)"""
  cfg = _cfg()
  s = llm_audit.setup(cfg, model, model, "", data)
  d = llm_audit.data_divergence(s, 256)
  assert d["n_positions"] == sum(e.n_targets for e in s.ds.examples) and d["n_examples"] == 4
  assert d["mean_kl"] == 0.0 and d["frac_kl"] == 0.0
  p = llm_audit.probe(model.tokenizer, QUESTIONS, ANSWERS, "animal")
  _, grads = llm_audit.trait_probe(s, p)
  out = llm_audit.batch_signals(s, grads, 1, 1e-2)
  # against the owl teacher's (a system prompt the random model barely reads): ~1e-7 of a real prediction
  owl = llm_audit.batch_signals(llm_audit.setup(cfg, model, model, OWL, data), grads, 1, 1e-2)
  assert owl["loss"][0] > 1e-4 and np.abs(out["loss"][0]) < 1e-9
  assert np.all(np.abs(out["first_order_sgd"]) < 1e-5 * np.abs(owl["first_order_sgd"]).min()), (out, owl)
  owl_setup = llm_audit.setup(cfg, model, model, OWL, data)
  assert llm_audit.data_divergence(owl_setup, 256)["mean_kl"] > 1e-4
  assert llm_audit.data_divergence(owl_setup, 1)["n_examples"] == 4  # whole steps: the first holds all 4 rows
  # the activation shift: none without a system prompt, some with the owl's
  from subl_jax.core.training import activations
  for setup, zero in ((s, True), (owl_setup, False)):
    batches = activations.shift_batches(setup.view, model.mesh, model.tokenizer.pad_id or 0)
    v = np.asarray(activations.teacher_shift(model, model, batches, 1))
    assert (np.abs(v).max() == 0) == zero and v.shape == (model.config.d_model,)


def _tiny_study():
  c = config_lib.defaults()
  c.job, c.model.spec = "audit", "random"
  c.teacher.update(dict(kind="system_prompt", target="owl"))
  c.sample.update(dict(n_prompts=8, max_new_tokens=8, batch_size=8, shard_size=8, constrained="format"))
  c.filter.drop_truncated = False
  c.distill.mode = "logit_kd"
  c.train.update(dict(batch_size=4, grad_accum=1, epochs=1, max_len=200, log_every=1, checkpoint_every=0))
  c.train.opt.update(dict(warmup_steps=0, lr=1e-2))
  c.train.lora.rank = 4
  c.eval.update(dict(n_questions=3, n_samples=0))
  c.study.update(dict(targets="owl,dolphin", seeds=1))
  c.audit.update(dict(study="llm", n_batches=2, probe_questions=2))
  config_lib.validate(c, n_devices=1)
  return c


def test_audit_job_end_to_end_calibrates_from_its_own_cells(tmp_path):
  cfg, mesh = _tiny_study(), parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  # A fresh workdir: the teachers, samples and filter run; no student is trained to find the realised side.
  out = job.run_audit(cfg, tmp_path, mesh)
  doc = json.loads((tmp_path / "audit.json").read_text())
  assert doc["calibration"] is None and "student_owl_s0" in doc["missing"] and "student_owl_s0" in out["missing"]
  assert not list(tmp_path.glob("student_*")) and "not calibrated" in (tmp_path / "audit.md").read_text()
  fingerprints = {t: stages.fingerprint(tmp_path / f"audit_{t}") for t in ("owl", "dolphin")}

  study_cfg = config_lib.mlc.ConfigDict(cfg.to_dict())
  study_cfg.job = "study"
  pipeline.run_study(study_cfg, tmp_path, mesh)
  out = job.run_audit(cfg, tmp_path, mesh)
  assert {t: stages.fingerprint(tmp_path / f"audit_{t}") for t in fingerprints} == fingerprints  # cached
  doc = json.loads((tmp_path / "audit.json").read_text())
  targets, answers = doc["targets"], doc["answers"]
  assert targets == ["owl", "dolphin"] and answers[:2] == targets and len(doc["cells"]) == 2 * len(answers)

  # the realised cells are the study's own report; the predicted ones the audit stages' per-batch means
  report = json.loads((tmp_path / "report.json").read_text())
  signals_of = {t: json.loads((tmp_path / f"audit_{t}" / "signals.json").read_text()) for t in targets}
  for c in doc["cells"]:
    i, j = targets.index(c["teacher"]), answers.index(c["answer"])
    assert c["realised"] == pytest.approx(report["students"]["matrix"]["mean"][i][j])
    for k in llm_audit.SIGNALS:
      assert c[k] == pytest.approx(np.mean([b[j] for b in signals_of[c["teacher"]]["per_batch"][k]]))
  for t in targets:
    assert signals_of[t]["n_batches"] == 2 and doc["n_batches"][t] == 2
    # the probe at the student's start is the base's evaluated log P on the same (first 2) questions
    base = json.loads((tmp_path / "eval_base" / "metrics.json").read_text())
    for a in answers:
      assert signals_of[t]["probe_logp"][a] == pytest.approx(np.mean(base[f"logp_{a}"]["per_question"][:2]), abs=1e-5)

  real = [c["realised"] for c in doc["cells"]]
  labels = [c["transfers"] for c in doc["cells"]]
  for k in llm_audit.SIGNALS:
    scores = [c[k] for c in doc["cells"]]
    got = doc["calibration"][k]["cells"]
    assert got["n"] == len(scores) and got["n_transfer"] == sum(labels)
    expected = calibration.spearman(scores, real)
    assert got["spearman"] == (None if np.isnan(expected) else pytest.approx(expected))
    expected = calibration.auroc(scores, labels)
    assert got["auroc"] == (None if np.isnan(expected) else pytest.approx(expected))
    assert out["calibration"][k]["spearman"] == got["spearman"]
    # centred: each answer's mean over the 2 teachers removed; the owl row (the dolphin row is its negative)
    centre = lambda v: (np.reshape(v, (2, -1)) - np.reshape(v, (2, -1)).mean(axis=0))[0]
    expected = calibration.spearman(centre(scores), centre(real))
    centred = doc["calibration"][k]["cells_centred"]
    assert centred["n"] == len(answers)
    assert centred["spearman"] == (None if np.isnan(expected) else pytest.approx(expected))
    # 2 targets: specificity is compared by sign only
    sp = doc["calibration"][k]["specificity"]
    assert sp["n"] == 2 and sp["spearman"] is None and "too few" in sp["note"]
    for t in targets:
      pred = doc["predicted"][k]["specificity"][t]
      own = np.array(signals_of[t]["per_batch"][k])[:, answers.index(t)]
      other = np.array(signals_of[[s for s in targets if s != t][0]]["per_batch"][k])[:, answers.index(t)]
      assert pred["mean"] == pytest.approx(np.mean(own - other)) and pred["n"] == 2
  for t in targets:
    assert doc["realised"]["specificity"][t]["mean"] == pytest.approx(report["students"]["specificity"][t]["mean"])
  cost = doc["cost"]
  for t in targets:
    assert cost["student_train_s"][t] == [stages.read_manifest(tmp_path / f"student_{t}_s0")["wall_s"]]
    assert cost["fraction"][t] == pytest.approx(cost["audit_stage_s"][t] / cost["student_train_s"][t][0])
    assert cost["step_s"][t] > 0 and cost["steps_for_5pct"][t] >= 20 * cost["audit_steps"][t]
    assert doc["activation"][t]["act_norm"] > 0 and 0 <= doc["activation"][t]["act_distinct"] <= 2
  md = (tmp_path / "audit.md").read_text()
  assert md.startswith("# Transfer audit: LLM study") and "**Verdicts**" in md and "Realised" in md


def test_bad_probe_questions_names_the_field():
  c = _tiny_study()
  c.audit.probe_questions = 0
  with pytest.raises(ValueError, match=r"config\.audit\.probe_questions=0"):
    config_lib.validate(c, n_devices=1)


def test_audit_smollm2_config_is_the_demo_study_plus_the_audit():
  """Same study fields as the 1-epoch CPU demo, so run in its workdir the audit shares every stage with it."""
  import pathlib

  configs = pathlib.Path(__file__).parents[1] / "configs"
  audit = config_lib.from_file(configs / "audit_smollm2.py")
  quick = config_lib.from_file(configs / "demo_cpu.py", "1ep")
  config_lib.validate(audit, n_devices=1)
  assert audit.job == "audit" and audit.audit.study == "llm" and audit.model.spec == "smollm2"
  a, q = audit.to_dict(), quick.to_dict()
  assert {k: v for k, v in a.items() if k not in ("job", "audit")} == {k: v for k, v in q.items()
                                                                       if k not in ("job", "audit")}
