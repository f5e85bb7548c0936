"""The mitigations of issue #21 (`core/training/mitigations.py`, `divergence.py`): KL to the base, divergence-token
masking, gradient projection off the trait direction. Tiny random models and hand-made logits."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from subl_jax import config
from subl_jax.core import api, parallel
from subl_jax.core.lora import LoraConfig, init_adapters, scaled
from subl_jax.core.models import transformer as tfm
from subl_jax.core.models.config import ModelConfig
from subl_jax.core.training import buckets, divergence, losses, metrics_log, mitigations, objectives, optim
from subl_jax.core.training import step as step_lib, trainer
from subl_jax.core.training.chat_data import ChatDataset, Example
from subl_jax.core.training.mitigations import KLToBase, MaskPositions

TINY = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64)
LORA = LoraConfig(rank=4)


def one_device_mesh():
  return parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def numpy_params(seed, scale=0.2):
  """Random parameters drawn with numpy (a jitted random init is a long compile on CPU): norms 1, weights N(0, s²)."""
  rng = np.random.default_rng(seed)
  shapes, _ = tfm.abstract_params(TINY)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.ones(s.shape, s.dtype) if "norm" in jax.tree_util.keystr(path)
      else jnp.asarray(rng.normal(0, scale, s.shape).astype(np.float32)), shapes)


def nonzero_adapters(seed=1):
  """Adapters with B ≠ 0, so that the student differs from its base."""
  return jax.tree.map(lambda x: x + 0.1, init_adapters(TINY, LORA, jax.random.key(seed)))


def dataset(n, seed=0, prompt=9, completion=5, teacher=False):
  """n random sequences of one length (one compiled shape): `prompt` tokens, then a `completion` (the loss targets);
  with `teacher`, the teacher's view has 3 extra (system) tokens before the same sequence."""
  rng = np.random.default_rng(seed)
  mask = np.r_[np.zeros(prompt), np.ones(completion)].astype(np.int8)
  examples = [Example(rng.integers(0, 97, prompt + completion).astype(np.int32), mask) for _ in range(n)]
  views = [Example(np.r_[rng.integers(0, 97, 3), e.tokens].astype(np.int32), np.r_[np.zeros(3, np.int8), mask])
           for e in examples] if teacher else None
  return ChatDataset(examples, views, n_rows=n)


def fake_forward(seed=0, b=2, n=5, v=97, vocab_major_head=False, step=0):
  """A `Forward` of fixed logits (student, teacher, base) and a micro-batch with padding; counts student calls."""
  rng = np.random.default_rng(seed)
  student, teacher, base = (jnp.asarray(3 * rng.normal(size=(b, n, v)), jnp.float32) for _ in range(3))
  mb = dict(targets=jnp.asarray(rng.integers(0, v, (b, n)), jnp.int32),
            weights=jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.float32))
  calls = []

  def student_fwd(mb, vocab_first=False):
    calls.append(vocab_first)
    return jnp.moveaxis(student, -1, 0) if vocab_first else student

  fwd = objectives.Forward(student_fwd, lambda mb: teacher, vocab_major_head, lambda mb: base, step)
  return fwd, mb, (student, teacher, base), calls


# --------------------------------------------------------------------------------------------- KL to base

def test_kl_to_base_adds_the_weighted_kl_from_the_base_and_runs_the_student_once():
  """Σ loss = inner's + w · Σ_w KL(base ‖ student), Σ tokens inner's; inner's student pass is reused (either layout)."""
  for vocab_major_head in (False, True):
    for inner in (objectives.SFT(), objectives.LogitKD(2.0)):
      fwd, mb, (student, teacher, base), calls = fake_forward(vocab_major_head=vocab_major_head)
      s, c = jax.jit(lambda: KLToBase(inner, 0.3).micro_loss(fwd, mb))()
      assert len(calls) == 1  # one student pass, the layout inner asked for
      s0, c0 = inner.micro_loss(fwd, mb)
      kl = losses.masked_sum(losses.kd_token_loss(student, base, 1.0), mb["weights"])[0]
      assert float(kl) > 1e-2 and float(c) == float(c0) == 8
      np.testing.assert_allclose(float(s), float(s0 + 0.3 * kl), rtol=1e-6)
  assert KLToBase(objectives.LogitKD(), 0.3).forwards == ("teacher", "base")
  assert KLToBase(objectives.SFT(), 0.0).forwards == ()  # weight 0 runs no base pass
  assert KLToBase(objectives.SFT(), 0.3).describe() == dict(name="KLToBase", weight=0.3, until_step=0,
                                                            inner={"name": "SFT"})
  with pytest.raises(ValueError, match="weight=-1"):
    KLToBase(objectives.SFT(), -1.0)


def test_kl_to_base_until_step_applies_the_penalty_only_before_it():
  fwd, mb, _, _ = fake_forward()
  obj = KLToBase(objectives.SFT(), 0.5, until_step=3)
  run = jax.jit(lambda step: obj.micro_loss(dataclasses.replace(fwd, step=step), mb))
  s0, _ = objectives.SFT().micro_loss(fwd, mb)
  with_penalty = KLToBase(objectives.SFT(), 0.5).micro_loss(fwd, mb)[0]
  np.testing.assert_allclose(float(run(jnp.int32(2))[0]), float(with_penalty), rtol=1e-6)
  for step in (3, 7):  # from until_step on: the inner loss (plus an exact zero)
    assert float(run(jnp.int32(step))[0]) == float(s0)


def test_kl_to_base_at_weight_zero_trains_bitwise_like_the_inner_objective():
  """LoRA and full fine-tuning: the same gradients and, after 3 Adam steps, the same parameters, bit for bit."""
  params, mesh = numpy_params(0), one_device_mesh()
  ds = dataset(8, seed=3)
  batch = step_lib.put_batch(buckets.collate_step(ds, np.arange(8), 2, 0), mesh)
  tx = optim.make_optimizer(dict(name="adam", lr=1e-2), 3)
  for lora in (LORA, None):
    trainable = nonzero_adapters() if lora else params
    frozen = params if lora else None
    runs = []
    for obj in (objectives.SFT(), KLToBase(objectives.SFT(), 0.0)):
      spec = step_lib.StepSpec(TINY, lora, obj)
      g, loss, _ = jax.jit(lambda t, b: step_lib.grads_and_loss(spec, mesh, t, frozen, None, b))(trainable, batch)
      fn = step_lib.make_train_step(spec, tx, mesh)
      state = step_lib.init_state(jax.tree.map(jnp.copy, trainable), tx, step_lib.state_shardings(spec, tx, mesh))
      for _ in range(3):
        state, _ = fn(state, frozen, None, batch)
      runs.append((g, loss, state["trainable"]))
    (g0, l0, t0), (g1, l1, t1) = runs
    assert float(l0) == float(l1)
    for a, b in zip(jax.tree.leaves((g0, t0)), jax.tree.leaves((g1, t1))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(jax.tree.leaves(t0), jax.tree.leaves(trainable)))


def test_the_base_pass_is_the_frozen_model_without_adapters():
  """Through the step's passes: LoRA's base is the frozen parameters (fresh adapters, B = 0: no penalty at all), full
  fine-tuning's the initial parameters it is given as `frozen` (and an error without them)."""
  params = numpy_params(0)
  ds = dataset(4, seed=4)
  mb = jax.tree.map(lambda x: x[0], buckets.collate_step(ds, np.arange(4), 1, 0))
  inputs = tfm.train_inputs(mb["tokens"], mb["positions"], mb["kv_mask"])
  logits = jax.jit(lambda p, a: tfm.Transformer(TINY).apply({"params": p}, inputs, logit_idx_bn=mb["logit_idx"],
                                                            adapters=a).logits)
  obj = KLToBase(objectives.SFT(), 0.7)

  def loss(lora, trainable, frozen, objective):
    spec = step_lib.StepSpec(TINY, lora, objective)
    return jax.jit(lambda t, f: step_lib.micro_loss(spec, None)(t, f, None, mb))(trainable, frozen)

  def want_kl(student_logits):
    return losses.masked_sum(losses.kd_token_loss(student_logits, logits(params, None), 1.0), mb["weights"])[0]

  adapters = nonzero_adapters()
  moved = jax.tree.map(lambda x: x * 1.1, params)
  for lora, trainable, student_logits in ((LORA, adapters, logits(params, scaled(adapters, LORA))),
                                          (None, moved, logits(moved, None))):
    s, c = loss(lora, trainable, params, obj)
    s0, c0 = loss(lora, trainable, params, objectives.SFT())
    kl = float(want_kl(student_logits))
    assert kl > 1e-2 and float(c) == float(c0)
    np.testing.assert_allclose(float(s), float(s0) + 0.7 * kl, rtol=1e-5)
  fresh = init_adapters(TINY, LORA, jax.random.key(2))
  assert np.array_equal(loss(LORA, fresh, params, obj), loss(LORA, fresh, params, objectives.SFT()))
  with pytest.raises(ValueError, match="needs the initial parameters"):
    loss(None, moved, None, obj)


# --------------------------------------------------------------------------------------------- masking

def test_masking_removes_exactly_the_marked_positions_from_the_sums():
  fwd, mb, (student, _, _), _ = fake_forward()
  marked = jnp.asarray([[0, 1, 0, 1, 0], [1, 0, 0, 1, 1]], jnp.float32)  # [0, 3] is padding: nothing to remove
  masked_mb = {**mb, mitigations.MASK_KEY: marked}
  for inner in (objectives.SFT(), objectives.LogitKD(2.0), KLToBase(objectives.SFT(), 0.3)):
    s, c = jax.jit(lambda: MaskPositions(inner).micro_loss(fwd, masked_mb))()
    by_hand = inner.micro_loss(fwd, {**mb, "weights": mb["weights"] * jnp.asarray([[1, 0, 1, 0, 1], [0, 1, 1, 0, 0]])})
    assert float(s) == float(by_hand[0]) and float(c) == float(by_hand[1])
    s0, c0 = inner.micro_loss(fwd, mb)
    assert float(c0) - float(c) == 4  # the marked real positions
    if isinstance(inner, objectives.SFT):
      per_token = np.asarray(losses.token_nll(student, mb["targets"]))
      removed = per_token[np.asarray(marked * mb["weights"]) > 0].sum()
      np.testing.assert_allclose(float(s0) - float(s), removed, rtol=1e-5)
  assert MaskPositions(objectives.LogitKD()).needs_teacher
  assert MaskPositions(KLToBase(objectives.SFT(), 0.3)).forwards == ("base",)


def test_divergence_mask_marks_the_real_positions_above_the_kl_threshold():
  """Against a numpy KL(teacher ‖ base), and the audit's reporting of the same divergence."""
  from subl_jax.study.audit import signals
  rng = np.random.default_rng(5)
  base = rng.normal(size=(3, 6, 11)).astype(np.float32)
  teacher = base + rng.normal(size=base.shape).astype(np.float32) * rng.uniform(0, 2, (3, 6, 1)).astype(np.float32)
  weights = np.ones((3, 6), np.float32)
  weights[0, 4:] = 0
  log_t, log_b = (x - np.log(np.exp(x).sum(-1, keepdims=True)) for x in (teacher.astype(np.float64),
                                                                          base.astype(np.float64)))
  kl = (np.exp(log_t) * (log_t - log_b)).sum(-1)
  threshold = float(np.median(kl))
  mask, n_masked, n_positions = jax.jit(divergence.divergence_mask, static_argnums=3)(teacher, base, weights,
                                                                                      threshold)
  want = (kl > threshold) & (weights > 0)
  assert 0 < want.sum() < weights.sum()
  np.testing.assert_array_equal(np.asarray(mask), want.astype(np.float32))
  assert float(n_masked) == want.sum() and float(n_positions) == 16
  audit = signals.divergence(teacher, base, np.zeros((3, 6), np.int32), weights, threshold)
  np.testing.assert_array_equal(np.asarray(mask, bool), audit["kl_mask"])


def test_dataset_masks_are_the_divergent_completion_positions_and_reach_the_loss():
  """The pre-pass over a dataset (teacher on its view, base on the student's) marks the positions an independent
  per-example computation finds; collated, `MaskPositions` leaves exactly those out of Σ tokens."""
  base_params, teacher_params = numpy_params(0), numpy_params(1)
  tok = type("NoTokenizer", (), {"pad_id": 0})()
  base = api.Model(TINY, base_params, tok, one_device_mesh())
  teacher = api.Model(TINY, teacher_params, tok, one_device_mesh())
  ds = dataset(6, seed=6, teacher=True)

  @jax.jit
  def logits(p, tokens):
    t = tokens.shape[0] - 1
    return tfm.Transformer(TINY).apply({"params": p}, tfm.train_inputs(
        tokens[None, :-1], jnp.arange(t)[None], jnp.ones((1, t), jnp.int32))).logits[0]

  def example_kl(i):
    s, t = ds.examples[i], ds.teacher[i]
    ls = np.asarray(logits(base_params, s.tokens))[np.nonzero(s.mask[1:])[0]]
    lt = np.asarray(logits(teacher_params, t.tokens))[np.nonzero(t.mask[1:])[0]]
    return np.asarray(losses.kd_token_loss(ls, lt, 1.0))

  kls = [example_kl(i) for i in range(len(ds))]
  threshold = float(np.median(np.concatenate(kls)))
  masks, stats = divergence.dataset_masks(base, teacher, ds, threshold, batch_size=4)
  for m, kl in zip(masks, kls):
    far = np.abs(kl - threshold) > 1e-4  # away from the threshold, where float rounding cannot flip the comparison
    np.testing.assert_array_equal(m[far], (kl > threshold)[far])
  positions = sum(e.n_targets for e in ds.examples)
  assert stats["positions"] == positions and 0 < stats["masked"] < positions
  assert stats["fraction"] == stats["masked"] / positions
  masked_ds = dataclasses.replace(ds, drop=masks)
  assert masked_ds.summary()["masked_loss_tokens"] == stats["masked"]
  mb = jax.tree.map(lambda x: x[0], buckets.collate_step(masked_ds, np.r_[np.arange(6), -1, -1], 1, 0))
  spec = step_lib.StepSpec(TINY, objective=MaskPositions(objectives.SFT()))
  _, count = jax.jit(lambda p: step_lib.micro_loss(spec, None)(p, None, None, mb))(base_params)
  assert float(count) == positions - stats["masked"]


# --------------------------------------------------------------------------------------------- projection

def pytrees(seed, cos):
  """(g, d): random pytrees with g ≈ cos-aligned to d."""
  rng = np.random.default_rng(seed)
  shapes = {"a": (40, 30), "b": {"c": (500,), "d": (7, 3, 5)}}
  d = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes, is_leaf=lambda x: isinstance(x, tuple))
  g = jax.tree.map(lambda x: (cos * x + np.sqrt(1 - cos ** 2) * rng.normal(size=x.shape)).astype(np.float32), d)
  return jax.tree.map(jnp.asarray, g), jax.tree.map(jnp.asarray, d)


def dot64(a, b):
  return sum(np.vdot(np.asarray(x, np.float64), np.asarray(y, np.float64))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_projection_removes_the_trait_component_only_when_the_step_would_raise_the_trait():
  project = jax.jit(mitigations.project_off)
  # aligned: g·d < 0, so the descent step −g raises log P(trait): g' ⟂ d, and g' − g is along d
  g, d = pytrees(0, -0.6)
  out, projected = project(g, d)
  norm = np.sqrt(dot64(g, g) * dot64(d, d))
  assert bool(projected) and dot64(g, d) < -0.5 * norm
  assert abs(dot64(out, d)) <= 1e-6 * norm
  coef = dot64(g, d) / dot64(d, d)
  for a, b, x in zip(jax.tree.leaves(out), jax.tree.leaves(g), jax.tree.leaves(d)):
    np.testing.assert_allclose(np.asarray(a) - np.asarray(b), -coef * np.asarray(x), rtol=0, atol=1e-5)
  # not aligned, or no direction: unchanged, bit for bit
  g, d = pytrees(1, 0.6)
  for direction in (d, jax.tree.map(jnp.zeros_like, d)):
    out, projected = project(g, direction)
    assert not bool(projected)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_update_projection_removes_the_trait_component_whatever_its_sign():
  project = jax.jit(mitigations.project_update_off)
  for seed, cos in ((3, -0.6), (4, 0.6)):  # a step that lowers the trait, one that raises it: both lose it
    u, d = pytrees(seed, cos)
    out, projected = project(u, d)
    norm = np.sqrt(dot64(u, u) * dot64(d, d))
    assert bool(projected) and abs(dot64(u, d)) > 0.5 * norm and abs(dot64(out, d)) <= 1e-6 * norm
    coef = dot64(u, d) / dot64(d, d)
    for a, b, x in zip(jax.tree.leaves(out), jax.tree.leaves(u), jax.tree.leaves(d)):
      np.testing.assert_allclose(np.asarray(a) - np.asarray(b), -coef * np.asarray(x), rtol=0, atol=1e-5)
  out, projected = project(u, jax.tree.map(jnp.zeros_like, d))  # no direction: unchanged, bit for bit
  assert not bool(projected)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(u)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_projection_as_an_optax_transform_before_the_optimizer():
  g, d = pytrees(2, -0.6)
  tx = optax.chain(mitigations.project_off_transform(), optax.sgd(0.1))
  params = jax.tree.map(jnp.zeros_like, g)
  updates, _ = jax.jit(lambda g, d: tx.update(g, tx.init(params), params, direction=d))(g, d)
  want = jax.tree.map(lambda x: -0.1 * x, mitigations.project_off(g, d)[0])
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):  # g − c·d cancels: float32 rounding of the max
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6 * np.abs(b).max())


def projection_setup():
  """(base params, mesh, a training batch, nonzero adapters, probes) for one LoRA step: probe "raised" is the
  training data's first rows (this step raises their log P), "lowered" unrelated sequences (the tests check the
  signs)."""
  params, mesh = numpy_params(0), one_device_mesh()
  ds = dataset(8, seed=7)
  batch = step_lib.put_batch(buckets.collate_step(ds, np.arange(8), 2, 0), mesh)
  probes = {"raised": buckets.collate_step(ds, np.arange(4), 1, 0),
            "lowered": buckets.collate_step(dataset(8, seed=103), np.arange(8), 1, 0)}
  return params, mesh, batch, nonzero_adapters(), probes


def test_projected_sgd_step_is_orthogonal_to_the_probe_gradient_when_aligned():
  """The step's probe gradient at the current adapters: a probe of the training data's first rows rises with the
  training (aligned: the SGD update is orthogonal to ∇ log P(probe)); a probe of unrelated sequences that this step
  makes less likely (the test checks the sign) is left alone (the plain step's update, bit for bit)."""
  params, mesh, batch, adapters, probes = projection_setup()
  tx = optim.make_optimizer(dict(name="sgd", lr=0.5), 4)
  spec = step_lib.StepSpec(TINY, LORA, project="gradient")
  plain_spec = dataclasses.replace(spec, project="")
  grad = jax.jit(lambda t, b: step_lib.grads_and_loss(plain_spec, mesh, t, params, None, b)[0])(adapters, batch)
  fn, plain = step_lib.make_train_step(spec, tx, mesh), step_lib.make_train_step(plain_spec, tx, mesh)
  sh = step_lib.state_shardings(spec, tx, mesh)
  state = lambda: step_lib.init_state(jax.tree.map(jnp.copy, adapters), tx, sh)
  plain_new = plain(state(), params, None, batch)[0]["trainable"]
  for name, probe in probes.items():
    probe = step_lib.put_batch(probe, mesh)
    direction = jax.jit(lambda t, p: step_lib.probe_direction(spec, mesh, t, params, p))(adapters, probe)
    new, metrics = fn(state(), params, None, batch, probe)
    # the applied update, exactly (float64 differences of the float32 parameters)
    update = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), new["trainable"],
                          adapters)
    gd, norm = dot64(grad, direction), np.sqrt(dot64(grad, grad) * dot64(direction, direction))
    if name == "raised":
      assert float(metrics["projected"]) == 1 and gd < -0.1 * norm
      assert abs(dot64(update, direction)) <= 1e-6 * 0.5 * norm  # lr · |g| |d|
      assert np.sqrt(dot64(update, update)) > 0.1 * 0.5 * np.sqrt(dot64(grad, grad))  # not all of it removed
    else:
      assert float(metrics["projected"]) == 0 and gd > 0
      for a, b in zip(jax.tree.leaves(new["trainable"]), jax.tree.leaves(plain_new)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="needs a probe batch"):
    fn(state(), params, None, batch)


def test_adam_step_projected_on_the_update_is_orthogonal_to_the_probe_gradient_and_on_the_gradient_is_not():
  """Why 'update' exists: Adam rescales each coordinate, so a gradient made orthogonal to d = ∇ log P(probe) gives an
  update that is not (here the update's cosine with d goes from +0.45 to −0.02, not 0: it now lowers the trait);
  projecting the update itself leaves it orthogonal, for a probe this step would raise and for one it would lower."""
  params, mesh, batch, adapters, probes = projection_setup()
  tx = optim.make_optimizer(dict(name="adam", lr=1e-2), 4)
  specs = {p: step_lib.StepSpec(TINY, LORA, project=p) for p in ("", "gradient", "update")}
  sh = step_lib.state_shardings(specs[""], tx, mesh)
  state = lambda: step_lib.init_state(jax.tree.map(jnp.copy, adapters), tx, sh)
  steps = {p: step_lib.make_train_step(spec, tx, mesh) for p, spec in specs.items()}
  update_of = lambda new: jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                                       new["trainable"], adapters)
  plain = update_of(steps[""](state(), params, None, batch)[0])
  for name, probe in probes.items():
    probe = step_lib.put_batch(probe, mesh)
    d = jax.jit(lambda t, p: step_lib.probe_direction(specs["update"], mesh, t, params, p))(adapters, probe)
    cos = lambda u: dot64(u, d) / np.sqrt(dot64(u, u) * dot64(d, d))
    assert (cos(plain) > 0.05) == (name == "raised") and abs(cos(plain)) > 0.05, cos(plain)
    new, metrics = steps["update"](state(), params, None, batch, probe)
    assert float(metrics["projected"]) == 1 and abs(cos(update_of(new))) < 1e-5, cos(update_of(new))
    if name == "raised":
      new, metrics = steps["gradient"](state(), params, None, batch, probe)
      assert float(metrics["projected"]) == 1 and abs(cos(update_of(new))) > 0.01, cos(update_of(new))
  with pytest.raises(ValueError, match="StepSpec.project='both'"):
    step_lib.StepSpec(TINY, LORA, project="both")


# --------------------------------------------------------------------------------------------- through the trainer

def test_trainer_runs_every_mitigation_together(tmp_path):
  """Full fine-tuning (the base: the model's own parameters) with KL to base, divergence masking and projection: the
  run's loss tokens are the unmasked ones, and the summary records the mitigations."""
  tok = type("NoTokenizer", (), {"pad_id": 0})()
  model = api.Model(TINY, numpy_params(0), tok, one_device_mesh())
  teacher = api.Model(TINY, numpy_params(1), tok, one_device_mesh())
  ds = dataset(16, seed=8, teacher=True)
  masks, stats = divergence.dataset_masks(model, teacher, ds, 1.0)
  assert 0 < stats["masked"] < stats["positions"]
  tc = config.defaults().train
  tc.update(dict(batch_size=8, grad_accum=1, epochs=1, log_every=1, checkpoint_every=0))
  tc.lora.rank = 0
  tc.opt.update(dict(lr=1e-2, warmup_steps=0))
  obj = MaskPositions(KLToBase(objectives.SFT(), 0.5, until_step=1))
  result = trainer.train(model, dataclasses.replace(ds, teacher=None, drop=masks), tc, tmp_path, objective=obj,
                         probe=dataset(3, seed=9), progress=False)
  rows = [r for r in metrics_log.read(tmp_path) if "loss" in r]
  assert sum(r["loss_tokens"] for r in rows) == stats["positions"] - stats["masked"]
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert all(r["projected"] in (0.0, 1.0) for r in rows)  # one step per row (log_every=1): projected or not
  s = result.summary
  assert s["project"] == "gradient" and s["objective"]["name"] == "MaskPositions" and s["data"]["masked_loss_tokens"] == \
      stats["masked"]
  json.dumps(s)
