"""The trainer: completion-only Σ/Σ losses, accumulation, LoRA, logit distillation, sharding, exact resume, data.

Tiny random models throughout; the chat-rendering tests use the SmolLM2 tokenizer (vocabulary 49152)."""

import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from subl_jax.core import api, parallel
from subl_jax import config
from subl_jax.core.number_tokens import number_token_ids
from subl_jax.core.models import transformer as tfm
from subl_jax.core.models.config import ModelConfig
from subl_jax.core.training import buckets, chat_data, checkpoint, hooks, loop, losses, objectives, optim
from subl_jax.core.training import step as step_lib, trainer
from subl_jax.core.training.chat_data import ChatDataset, Example
from subl_jax.core.lora import LoraConfig, init_adapters, merge, scaled

TINY = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64)


def one_device_mesh():
  return parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def synthetic_dataset(n, seed=0, vocab=97, lengths=(6, 20), teacher=False, shared=0):
  """Random sequences: a prompt of `lengths` (low, high) tokens, then a completion (mask 1) of 2-7 tokens; with
  `shared`, every prompt begins with the same `shared` tokens (as chats begin with the template's system turn)."""
  rng = np.random.default_rng(seed)
  examples, teachers = [], []
  prefix = rng.integers(0, vocab, shared)
  for _ in range(n):
    p, c = rng.integers(*lengths) + shared, rng.integers(2, 8)
    tokens = np.r_[prefix, rng.integers(0, vocab, p + c - shared)].astype(np.int32)
    examples.append(Example(tokens, np.r_[np.zeros(p), np.ones(c)].astype(np.int8)))
    if teacher:  # the teacher's context: 3 extra (system) tokens before the same sequence
      teachers.append(Example(np.r_[rng.integers(0, vocab, 3), tokens].astype(np.int32),
                              np.r_[np.zeros(p + 3), np.ones(c)].astype(np.int8)))
  return ChatDataset(examples, teachers if teacher else None, n_rows=n)


def train_section(**changes):
  tc = config.defaults().train
  tc.update(dict(batch_size=8, grad_accum=1, epochs=1, log_every=2, checkpoint_every=0))
  tc.opt.update(dict(lr=1e-2, warmup_steps=1))
  for k, v in changes.items():
    if isinstance(v, dict):
      tc[k].update(v)
    else:
      tc[k] = v
  return tc


def numpy_params(cfg, seed):
  """Random parameters drawn with numpy (a jitted random init is a long compile on CPU): norms 1, weights N(0, .2²)."""
  rng = np.random.default_rng(seed)
  shapes, _ = tfm.abstract_params(cfg)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.ones(s.shape, s.dtype) if "norm" in jax.tree_util.keystr(path)
      else jnp.asarray(rng.normal(0, 0.2, s.shape).astype(np.float32)), shapes)


@pytest.fixture(scope="module")
def tiny_params():
  return numpy_params(TINY, 0)


def tiny_model(params, mesh=None):
  return api.Model(TINY, params, type("NoTokenizer", (), {"pad_id": 0})(), mesh or one_device_mesh())


# --------------------------------------------------------------------------------------------- losses and masks

def test_completion_targets_only_and_prompt_positions_get_zero_gradient(smollm2_tokenizer):
  tok = smollm2_tokenizer
  ex = chat_data.encode_chat(tok, [{"role": "user", "content": "Continue: 1, 2"},
                                   {"role": "assistant", "content": "3, 4"}])
  ds = ChatDataset([ex], n_rows=1)
  b = jax.tree.map(lambda x: x[0], buckets.collate_step(ds, np.array([0]), 1, tok.pad_id))
  n = int(b["weights"].sum())
  assert tok.decode(b["targets"][0, :n], skip_special_tokens=False) == "3, 4<|im_end|>"
  # loss over logits at every position, weighted by the completion mask: prompt positions get zero gradient
  t = b["tokens"].shape[1]
  all_targets = np.r_[b["tokens"][0, 1:], 0][None]
  weights = np.isin(np.arange(t), b["logit_idx"][0, :n]).astype(np.float32)[None]
  logits = jax.random.normal(jax.random.key(0), (1, t, 64))
  g = jax.grad(lambda l: losses.masked_sum(losses.token_nll(l, jnp.asarray(all_targets) % 64), weights)[0])(logits)
  g = np.abs(np.asarray(g)).sum(-1)[0]
  assert np.all(g[weights[0] == 0] == 0) and np.all(g[weights[0] == 1] > 0)


def test_token_nll_with_the_vocabulary_first_or_last():
  logits = jax.random.normal(jax.random.key(1), (3, 5, 11)) * 3
  targets = jax.random.randint(jax.random.key(2), (3, 5), 0, 11)
  want = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), np.asarray(targets)[..., None], -1)[..., 0]
  np.testing.assert_allclose(losses.token_nll(logits, targets), want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(losses.token_nll(jnp.moveaxis(logits, -1, 0), targets, vocab_axis=0), want,
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="vocab_axis=1"):
    losses.token_nll(logits, targets, vocab_axis=1)


def test_sum_over_sum_one_batch_equals_accumulated_micro_batches(tiny_params):
  ds = synthetic_dataset(64, seed=1)
  spec = step_lib.StepSpec(TINY)
  idx = np.arange(64)
  whole = buckets.collate_step(ds, idx, 1, 0)    # [1, 64, ...]
  split = buckets.collate_step(ds, idx, 4, 0)    # [4, 16, ...]
  fn = jax.jit(lambda p, b: step_lib.grads_and_loss(spec, None, p, None, None, b))
  g1, l1, c1 = fn(tiny_params, whole)
  g4, l4, c4 = fn(tiny_params, split)
  assert float(c1) == float(c4) == sum(e.n_targets for e in ds.examples)
  np.testing.assert_allclose(float(l4), float(l1), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 * np.abs(b).max())
  # the micro-batches hold different numbers of loss tokens, so a mean of per-micro-batch means would differ
  counts = split["weights"].sum(axis=(1, 2))
  assert len(set(counts.tolist())) > 1, counts


@pytest.mark.parametrize("rank", [0, 4])
def test_shared_prefix_once_gives_the_same_loss_and_gradients(tiny_params, rank):
  """Rows that begin alike run their prefix once (the default when a dataset has one): same loss and gradients as
  repeating it in every row, with accumulation and an empty filler row in the last micro-batch.

  In float64: the two sum in different orders (the prefix's keys once for every row), so in float32 they differ by
  rounding, by up to ~3e-5 of a gradient's largest entry on some CPUs; in float64 they agree to ~1e-14."""
  ds = synthetic_dataset(15, seed=8, shared=11)
  p = buckets.shared_prefix(ds.examples)
  assert p == 11
  batch = buckets.collate_step(ds, np.r_[np.arange(15), -1], 2, 0)
  with jax.enable_x64(True):
    cfg = dataclasses.replace(TINY, dtype="float64", param_dtype="float64")
    f64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)
    lora = LoraConfig(rank=rank) if rank else None
    frozen = f64(tiny_params) if lora else None
    trainable = f64(tiny_params)
    if lora:  # adapters with a nonzero B, so that LoRA changes the logits
      trainable = f64(jax.tree.map(lambda x: x + 0.1, init_adapters(TINY, lora, jax.random.key(1))))

    def run(shared):
      spec = step_lib.StepSpec(cfg, lora=lora, shared_prefix=shared)
      return jax.jit(lambda t, b: step_lib.grads_and_loss(spec, None, t, frozen, None, b))(trainable, batch)

    (g0, l0, c0), (g1, l1, c1) = run(0), run(p)
  assert l0.dtype == jnp.float64 and all(g.dtype == jnp.float64 for g in jax.tree.leaves(g0))
  assert float(c0) == float(c1) == sum(e.n_targets for e in ds.examples)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-12)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    assert np.abs(b).max() > 0
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12 * np.abs(b).max())


def test_sft_step_loss_is_the_same_in_every_model_layout(tiny_params):
  """`micro_loss` under each `Perf` (key layout, vocabulary-major head or not), a shared prefix included: the same SFT
  loss and gradients up to float rounding."""
  ds = synthetic_dataset(6, seed=8, shared=11)
  mb = jax.tree.map(lambda x: x[0], buckets.collate_step(ds, np.arange(6), 1, 0))
  spec = step_lib.StepSpec(TINY, shared_prefix=buckets.shared_prefix(ds.examples))

  def run(perf):
    fn = lambda t: step_lib.micro_loss(spec, None, perf)(t, None, None, mb)
    (s, n), g = jax.jit(jax.value_and_grad(fn, has_aux=True))(tiny_params)
    return float(s / n), g

  (l0, g0), *rest = (run(tfm.Perf(layout, head)) for layout in ("standard", "transposed") for head in (False, True))
  for l1, g1 in rest:
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6 * np.abs(b).max())


def test_shared_prefix_stops_before_the_first_loss_position():
  ds = synthetic_dataset(6, seed=9, shared=10)
  assert buckets.shared_prefix(ds.examples) == 10
  # a row whose completion starts early: the prefix ends where its first logit (the input before the target) is
  early = Example(np.r_[ds.examples[0].tokens[:10], [1, 2, 3]].astype(np.int32), np.r_[np.zeros(9), np.ones(4)])
  assert buckets.shared_prefix(ds.examples + [early]) == 8
  # shorter than one length bucket: not split off; no common prefix at all: 0
  assert buckets.shared_prefix(synthetic_dataset(6, seed=9, shared=buckets.LENGTH_BUCKET - 1).examples) == 0
  assert buckets.shared_prefix(synthetic_dataset(6, seed=9).examples) == 0


# --------------------------------------------------------------------------------------------- LoRA

@pytest.mark.parametrize("targets", [("q", "k", "v", "o", "gate", "up", "down"), ("v", "up")])
def test_lora_starts_at_the_base_and_unmerged_equals_merged(tiny_params, targets):
  """Also with a subset of targets: the projections sharing an input compute x@[A|A|..] in one matmul."""
  lora = LoraConfig(rank=4, alpha=8.0, targets=targets)
  adapters = jax.jit(init_adapters, static_argnums=(0, 1))(TINY, lora, jax.random.key(1))
  assert all(np.all(np.asarray(ab["b"]) == 0) and np.abs(np.asarray(ab["a"])).max() > 0
             for ab in adapters["layers"].values())
  ds = synthetic_dataset(4, seed=2)
  b = jax.tree.map(lambda x: x[0], buckets.collate_step(ds, np.arange(4), 1, 0))
  inputs = tfm.train_inputs(b["tokens"], b["positions"], b["kv_mask"])
  fwd = jax.jit(lambda p, a: tfm.Transformer(TINY).apply({"params": p}, inputs, adapters=a).logits)
  apply = lambda p, a=None: fwd(p, a)
  base = np.asarray(apply(tiny_params))
  np.testing.assert_array_equal(np.asarray(apply(tiny_params, scaled(adapters, lora))), base)  # B = 0: bitwise
  # with nonzero B, x@W + s(x@A)@B equals the merged weights' forward
  rng = np.random.default_rng(3)
  adapters = jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(np.float32), adapters)
  unmerged = np.asarray(apply(tiny_params, scaled(adapters, lora)))
  assert np.abs(unmerged - base).max() > 1e-2
  merged = jax.jit(lambda p, a: merge(p, a, lora))(tiny_params, adapters)
  np.testing.assert_allclose(unmerged, np.asarray(apply(merged)), atol=2e-5)


def test_remat_does_not_save_lora_outputs(capsys):
  """Under the 'dots' policy a LoRA step saves what a plain forward saves plus only x@A ([layers, tokens, r] per
  target): the (x@A)@B outputs, as large as their projections', are recomputed (they took 18 GiB on a 1B model)."""
  from jax.ad_checkpoint import print_saved_residuals
  cfg = ModelConfig(vocab_size=97, d_model=128, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=64, mlp_dim=192,
                    dtype="bfloat16", remat_policy="dots")
  params = tfm.init_params(cfg, jax.random.key(0), None)
  tokens = jnp.zeros((3, 40), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(40), (3, 40))
  lora = LoraConfig(rank=8, alpha=8.0)

  def saved(adapters):  # differentiated with respect to the adapters, or (full fine-tuning) the parameters
    fn = lambda p, a: tfm.Transformer(cfg).apply({"params": p}, tfm.train_inputs(tokens, positions,
                                                                                 jnp.ones_like(tokens)),
                                                 logit_idx_bn=jnp.zeros((3, 1), jnp.int32),
                                                 adapters=scaled(a, lora) if a else None).logits.sum()
    if adapters is None:
      print_saved_residuals(lambda p: fn(p, None), params)
    else:
      print_saved_residuals(lambda a: fn(params, a), adapters)
    return sorted(line.split()[0] for line in capsys.readouterr().out.splitlines() if "output of scan" in line)

  plain, with_lora = saved(None), saved(init_adapters(cfg, lora, jax.random.key(1)))
  assert "bf16[2,120,192]" in plain  # the MLP projections' outputs are saved...
  extra = list(with_lora)
  for s in plain:
    extra.remove(s)
  assert extra == ["bf16[2,120,8]"] * 7, extra  # ...and LoRA adds only x@A of its 7 targets


# --------------------------------------------------------------------------------------------- distillation

def test_kd_with_the_student_as_teacher_gives_zero_loss_and_gradient(tiny_params):
  ds = synthetic_dataset(8, seed=4)
  ds.teacher = ds.examples  # the same context
  kd = objectives.LogitKD(temperature=2.0, kd_tokens="numbers", token_ids=tuple(range(10, 30)))
  spec = step_lib.StepSpec(TINY, objective=kd)
  batch = buckets.collate_step(ds, np.arange(8), 1, 0)
  fn = jax.jit(lambda p, t, b: step_lib.grads_and_loss(spec, None, p, None, t, b))
  grads, loss, count = fn(tiny_params, tiny_params, batch)
  assert float(count) > 0 and abs(float(loss)) < 1e-6
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) < 1e-6
  _, loss2, _ = fn(tiny_params, numpy_params(TINY, 9), batch)  # a different teacher: the test can fail
  assert float(loss2) > 1e-3
  # every token set, at the loss level
  logits = 3.0 * jax.random.normal(jax.random.key(0), (2, 5, 97))
  for kd_tokens in ("all", "topk", "numbers"):
    kd = lambda s, t: losses.kd_token_loss(s, t, 2.0, kd_tokens, topk=5, token_ids=jnp.arange(10, 30)).sum()
    same, other, grad = jax.jit(lambda l: (kd(l, l), kd(l, l[::-1]), jax.grad(kd)(l, l)))(logits)
    assert abs(float(same)) < 1e-6 and float(jnp.abs(grad).max()) < 1e-6, kd_tokens
    assert float(other) > 1e-2, kd_tokens


def test_objectives_give_the_losses_of_token_nll_and_kd_token_loss():
  """Given the logits, each objective's (Σ loss, Σ tokens) is what the step computed before objectives were classes:
  SFT's cross-entropy of vocabulary-major logits, LogitKD's KL of the student's and the teacher's."""
  rng = np.random.default_rng(0)
  student, teacher = (jnp.asarray(3 * rng.normal(size=(2, 5, 97)), jnp.float32) for _ in range(2))
  mb = dict(targets=jnp.asarray(rng.integers(0, 97, (2, 5)), jnp.int32),
            weights=jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.float32))
  asked = []

  def student_fwd(mb, vocab_first=False):
    asked.append(vocab_first)
    return jnp.moveaxis(student, -1, 0) if vocab_first else student

  fwd = objectives.Forward(student_fwd, lambda mb: teacher, vocab_major_head=True)

  def check(objective, want, fwd=fwd):
    got = jax.jit(lambda: objective.micro_loss(fwd, mb))()
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(want)()))
    assert float(got[0]) > 1e-3 and float(got[1]) == 8

  check(objectives.SFT(), lambda: losses.masked_sum(
      losses.token_nll(jnp.moveaxis(student, -1, 0), mb["targets"], vocab_axis=0), mb["weights"]))
  # without a vocabulary-major head SFT reads [b, n, V] (no transpose): the same loss
  check(objectives.SFT(), lambda: losses.masked_sum(losses.token_nll(student, mb["targets"]), mb["weights"]),
        fwd=dataclasses.replace(fwd, vocab_major_head=False))
  assert asked == [True, False]
  ids = tuple(range(10, 30))
  for kd_tokens in ("all", "topk", "numbers"):
    kd = objectives.LogitKD(2.0, kd_tokens, topk=5, token_ids=ids if kd_tokens == "numbers" else None)
    check(kd, lambda: losses.masked_sum(losses.kd_token_loss(
        student, teacher, 2.0, kd_tokens, 5, jnp.asarray(ids) if kd_tokens == "numbers" else None), mb["weights"]))
  # what the trainer reads of them; equal objectives are one compiled step
  assert not objectives.SFT().needs_teacher and objectives.LogitKD().forwards == ("teacher",)
  assert step_lib.StepSpec(TINY, objective=objectives.LogitKD(2.0, "numbers", token_ids=ids)) == \
      step_lib.StepSpec(TINY, objective=objectives.LogitKD(2.0, "numbers", token_ids=ids))
  with pytest.raises(ValueError, match="needs the token set"):
    objectives.LogitKD(kd_tokens="numbers")


def test_restricted_kd_renormalises_and_ignores_tokens_outside_the_set():
  ids = jnp.array([1, 4, 7, 9])
  student = jax.random.normal(jax.random.key(0), (2, 3, 16))
  teacher = jax.random.normal(jax.random.key(1), (2, 3, 16))
  np.testing.assert_allclose(np.exp(losses.restricted_log_probs(student, ids)).sum(-1), 1.0, rtol=1e-6)
  loss = lambda s, t: losses.kd_token_loss(s, t, 1.0, "numbers", token_ids=ids).sum()
  outside = jnp.ones(16, bool).at[ids].set(False)
  noise = jnp.where(outside, 5.0 * jax.random.normal(jax.random.key(2), (2, 3, 16)), 0.0)
  assert float(loss(student, teacher)) > 0
  np.testing.assert_allclose(float(loss(student + noise, teacher - noise)), float(loss(student, teacher)), rtol=1e-6)
  g = jax.grad(loss)(student, teacher)
  assert np.all(np.asarray(g)[..., np.asarray(outside)] == 0) and np.abs(np.asarray(g)[..., ids]).max() > 0


def test_kd_teacher_sees_its_own_context_aligned_on_completions():
  ds = synthetic_dataset(8, seed=5, teacher=True)
  b = buckets.collate_step(ds, np.arange(8), 1, 0)
  assert b["teacher_tokens"].shape[-1] > b["tokens"].shape[-1]
  for i, e in enumerate(ds.teacher):  # the teacher's logit positions predict the student's targets
    n = e.n_targets
    np.testing.assert_array_equal(e.tokens[b["teacher_logit_idx"][0, i, :n] + 1], b["targets"][0, i, :n])
    np.testing.assert_array_equal(b["teacher_logit_idx"][0, i, :n], b["logit_idx"][0, i, :n] + 3)


# --------------------------------------------------------------------------------------------- sharding

def two_steps(params, rank, shared, mesh):
  """(trainable after two train steps on `mesh`, the second step's loss); `shared`: a shared prefix of that many
  tokens in every row, run once."""
  lora = LoraConfig(rank=rank) if rank else None
  ds = synthetic_dataset(16, seed=6, lengths=(9, 10), shared=shared)
  spec = step_lib.StepSpec(TINY, lora=lora, shared_prefix=buckets.shared_prefix(ds.examples))
  assert spec.shared_prefix == shared
  # SGD: an update linear in the gradient. (Adam divides by sqrt(v) + 1e-8, so a gradient entry near 0 turns float
  # reduction-order noise into a visible update difference; its state sharding is checked below.)
  tx, sh, step_fn = step_lib.train_step_for(spec, dict(name="sgd", lr=0.5, max_grad_norm=1.0), 10, mesh)
  batch = step_lib.put_batch(buckets.collate_step(ds, np.arange(16), 2, 0), mesh)
  params = jax.device_put(params, tfm.param_shardings(TINY, mesh))
  trainable = params if lora is None else jax.jit(init_adapters, static_argnums=(0, 1))(TINY, lora, jax.random.key(0))
  state = step_lib.init_state(jax.device_put(jax.tree.map(jnp.copy, trainable), sh["trainable"]), tx, sh)
  for _ in range(2):
    state, metrics = step_fn(state, params if lora else None, None, batch)
  return jax.tree.map(np.asarray, state["trainable"]), float(metrics["loss"])


@pytest.fixture(scope="module")
def single_device_steps(tiny_params):
  return {(rank, shared): two_steps(tiny_params, rank, shared, one_device_mesh()) for rank in (0, 4)
          for shared in (0, 8)}


@pytest.mark.parametrize("shape, rank, shared", [((2, 2, 2), 0, 0), ((1, 8, 1), 0, 8), ((2, 2, 2), 4, 0),
                                                 ((2, 2, 2), 4, 8)])
def test_sharded_step_equals_single_device(tiny_params, single_device_steps, shape, rank, shared):
  mesh = parallel.make_mesh(*shape)
  p8, l8 = two_steps(tiny_params, rank, shared, mesh)
  p1, l1 = single_device_steps[rank, shared]
  assert abs(l8 - l1) <= 1e-6 * abs(l1)
  for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Adam's moments are sharded like the parameters they follow
  spec = step_lib.StepSpec(TINY, lora=LoraConfig(rank=rank) if rank else None)
  sh = step_lib.state_shardings(spec, optim.make_optimizer(dict(name="adamw"), 10), mesh)
  mu = [x for x in jax.tree.leaves(sh["opt"], is_leaf=lambda x: hasattr(x, "mu")) if hasattr(x, "mu")][0].mu
  assert jax.tree.leaves(mu) == jax.tree.leaves(sh["trainable"])
  assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(sh["trainable"]))


# --------------------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("rank", [0, 4])
def test_killed_run_resumes_to_bitwise_equal_parameters(tiny_params, tmp_path, rank):
  model = tiny_model(tiny_params)
  before = jax.tree.map(np.array, tiny_params)
  ds = synthetic_dataset(40, seed=7, lengths=(9, 10), shared=8)  # one padded shape: one compile; a shared prefix
  tc = train_section(epochs=2, checkpoint_every=2, lora=dict(rank=rank))  # 5 steps per epoch, 10 in all
  full = trainer.train(model, ds, tc, tmp_path / "full", peak_flops=1.0, progress=False)

  class KillAt7(loop.Hook):
    def on_step(self, lp, step, metrics):
      if step == 7:  # mid-epoch, between periodic checkpoints: the SIGINT handler saves step 7
        os.kill(os.getpid(), signal.SIGINT)

  with pytest.raises(checkpoint.Interrupted, match="stopped by signal 2 after step 7 of 10; checkpoint saved in"):
    trainer.train(model, ds, tc, tmp_path / "cut", hooks=[KillAt7()], peak_flops=1.0, progress=False)
  resumed = trainer.train(model, ds, tc, tmp_path / "cut", peak_flops=1.0, progress=False)
  assert resumed.summary["resumed_from"] == 7 and full.summary["shared_prefix"] == 8
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, resumed.trainable),
               jax.tree.map(np.asarray, full.trainable))

  class KillAtLast(loop.Hook):
    def on_step(self, lp, step, metrics):
      if step == lp.total:  # the loop still ends as usual, but the signal must stop the job, not be lost
        os.kill(os.getpid(), signal.SIGTERM)

  outer = signal.getsignal(signal.SIGTERM)
  with pytest.raises(checkpoint.Interrupted, match="stopped by signal 15 after the last step \\(10 of 10\\)"):
    trainer.train(model, ds, tc, tmp_path / "last", hooks=[KillAtLast()], peak_flops=1.0, progress=False)
  assert signal.getsignal(signal.SIGTERM) == outer  # restored: a later SIGTERM is not caught and dropped
  again = trainer.train(model, ds, tc, tmp_path / "last", peak_flops=1.0, progress=False)
  assert again.summary["resumed_from"] == 10
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, again.trainable),
               jax.tree.map(np.asarray, full.trainable))
  changed = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
             zip(jax.tree.leaves(full.trainable), jax.tree.leaves(before))] if not rank else [1.0]
  assert min(changed) > 0  # training moved the parameters
  rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 4, 6, 7, 8, 10]
  # the model's own parameters are untouched (LoRA trains adapters; full fine-tuning trains a copy)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, model.params), before)
  if rank:
    assert set(full.trainable["layers"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert all(np.abs(np.asarray(ab["b"])).max() > 0 for ab in full.trainable["layers"].values())
    # the checkpoint holds the adapters and their optimizer state only
    ckpt = checkpoint.Checkpoints(tmp_path / "cut" / trainer.CHECKPOINT_DIR, 0)
    saved = ckpt.saved_shapes(ckpt.latest_step())
    ckpt.close()
    n_saved = sum(np.prod(x.shape) for x in jax.tree.leaves(saved["trainable"]))
    assert n_saved == sum(x.size for x in jax.tree.leaves(full.trainable)) < TINY.n_params / 4


def test_loop_hands_fetched_metrics_to_hooks_in_order():
  """A check placed first raises before a later hook receives the rows it refused; fetching is the hooks' choice."""
  seen = []

  class Check(loop.Hook):
    def on_metrics(self, lp, rows):
      for s, m in rows:
        if not np.isfinite(m["loss"]):
          raise ValueError(f"step {s}")

  class Writer(loop.Hook):
    def on_step(self, lp, step, metrics):
      if step % 2 == 0:
        lp.fetch()

    def on_metrics(self, lp, rows):
      seen.extend(s for s, _ in rows)

  values = [1.0, 2.0, 3.0, np.nan, 5.0]
  step_fn = lambda s, state: (state + 1, {"loss": values[s]})
  done = loop.run_loop(0, 0, 3, step_fn, [Check(), Writer()])
  assert done.state == 3 and done.metrics == {"loss": 3.0} and seen == [1, 2, 3]  # step 3 at the end
  seen.clear()
  with pytest.raises(ValueError, match="step 4"):
    loop.run_loop(0, 0, 5, step_fn, [Check(), Writer()])
  assert seen == [1, 2]  # steps 3 and 4 came in one fetch, refused as a whole


def test_a_custom_hook_sees_every_step_and_leaves_training_unchanged(tiny_params, tmp_path):
  model = tiny_model(tiny_params)
  ds = synthetic_dataset(40, seed=7, lengths=(9, 10))
  tc = train_section(checkpoint_every=2)  # 5 steps

  class Recorder(loop.Hook):
    def __init__(self):
      self.events = []

    def on_start(self, lp):
      self.events.append(("start", lp.step))

    def on_step(self, lp, step, metrics):
      self.events.append(("step", step))
      lp.fetch()  # waiting for every step changes the timing, not the result

    def on_metrics(self, lp, rows):
      self.events += [("metrics", s) for s, m in rows if np.isfinite(m["loss"])]

    def on_end(self, lp):
      self.events.append(("end", lp.step))

    def close(self):
      self.events.append(("close",))

  rec = Recorder()
  plain = trainer.train(model, ds, tc, tmp_path / "plain", progress=False)
  hooked = trainer.train(model, ds, tc, tmp_path / "hooked", hooks=[rec], progress=False)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, hooked.trainable),
               jax.tree.map(np.asarray, plain.trainable))
  assert rec.events[0] == ("start", 0) and rec.events[-2:] == [("end", 5), ("close",)]
  assert [s for e, *s in rec.events if e == "step"] == [[s] for s in range(1, 6)]
  assert [s for e, *s in rec.events if e == "metrics"] == [[s] for s in range(1, 6)]  # each step's once
  steps = lambda d: [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()]
  assert steps(tmp_path / "hooked") == steps(tmp_path / "plain") == [1, 2, 4, 5]


@pytest.mark.parametrize("log_every", [1, 100])
def test_diverging_run_stops_naming_the_step_and_never_checkpoints_a_non_finite_state(tiny_params, tmp_path,
                                                                                      log_every):
  """lr=1e6 used to exit 0 with loss NaN from step 4 and commit the NaN model as a completed stage. With log_every
  100 only the checkpoints fetch the metrics: the guard (the first hook) still sees them before the save."""
  from subl_jax.study import stages
  model = tiny_model(tiny_params)
  ds = synthetic_dataset(40, seed=7, lengths=(9, 10))
  tc = train_section(epochs=2, checkpoint_every=2, log_every=log_every)
  tc.opt.update(dict(lr=1e30, max_grad_norm=0.0, warmup_steps=0))  # float32 overflows

  def fn(out):
    trainer.train(model, ds, tc, out / "train", peak_flops=1.0, progress=False)
    return {}

  with pytest.raises(hooks.NonFiniteLoss, match=r"diverged at step \d+ of 10") as err:
    stages.run_stage(tmp_path, "student", {"lr": 1e30}, {}, fn)
  assert any("stage 'student'" in note for note in err.value.__notes__)
  assert not (tmp_path / "student").exists()  # nothing committed
  step = int(str(err.value).split("diverged at step ")[1].split()[0])
  rows = [json.loads(line) for line in (tmp_path / "student.partial" / "train" / "metrics.jsonl").read_text()
          .splitlines()]  # valid JSON: no NaN row was written
  assert all(np.isfinite(r["loss"]) for r in rows) and rows[-1]["step"] < step
  ckpt = checkpoint.Checkpoints(tmp_path / "student.partial" / "train" / trainer.CHECKPOINT_DIR, 0)
  last = ckpt.latest_step()
  if last is not None:  # every checkpoint kept is from before the divergence, and finite
    assert last < step
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), ckpt.saved_shapes(last))
    state = ckpt.manager.restore(last, args=checkpoint.ocp.args.Composite(
        state=checkpoint.ocp.args.StandardRestore(abstract))).state
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state["trainable"]))
  ckpt.close()


# --------------------------------------------------------------------------------------------- data

def test_epoch_order_is_deterministic_bucketed_and_complete():
  lengths = np.random.default_rng(0).integers(5, 200, 300)
  a = buckets.epoch_steps(lengths, 16, seed=3, epoch=1)
  assert all(np.array_equal(x, y) for x, y in zip(a, buckets.epoch_steps(lengths, 16, seed=3, epoch=1)))
  b = buckets.epoch_steps(lengths, 16, seed=3, epoch=2)
  assert not all(np.array_equal(x, y) for x, y in zip(a, b))
  flat = np.concatenate(a)
  assert sorted(flat[flat >= 0]) == list(range(300)) and (flat < 0).sum() == 19 * 16 - 300
  spread = np.mean([np.ptp(lengths[s[s >= 0]]) for s in a])
  assert spread < 0.25 * np.ptp(lengths)  # similar lengths share a step: little padding


def test_malformed_jsonl_line_reports_file_and_line(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_text('{"prompt": "a", "completion": "1"}\n\n{"prompt": "b", "completion": 2}\n')
  with pytest.raises(ValueError, match=rf"{path}:3: expected string fields"):
    chat_data.read_jsonl(path)
  path.write_text('{"prompt": "a", "completion": "1"}\n{"prompt": "b",\n')
  with pytest.raises(ValueError, match=rf"{path}:2: not valid JSON"):
    chat_data.read_jsonl(path)
  path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
  with pytest.raises(ValueError, match=rf"{path}:1: no assistant message"):
    chat_data.read_jsonl(path)


def test_over_length_sequences_are_dropped_and_counted(smollm2_tokenizer):
  rows = [{"prompt": "Hi", "completion": "1 2 3"}, {"prompt": "Hi", "completion": " ".join(["7"] * 200)}]
  ds = chat_data.build(smollm2_tokenizer, chat_data.rows_to_chats(rows), max_len=100)
  assert len(ds) == 1 and ds.n_too_long == 1 and ds.summary()["dropped_too_long"] == 1


def test_number_tokens_are_digits_separators_and_end_of_turn(smollm2_tokenizer):
  tok = smollm2_tokenizer
  ids = set(number_token_ids(tok).tolist())
  for text in ("0", "7", ",", ";", " "):
    assert tok.token_to_id(text if text != " " else "Ġ") in ids
  assert tok.token_to_id("<|im_end|>") in ids
  assert tok.encode("owl")[0] not in ids and tok.token_to_id("<|im_start|>") not in ids


@pytest.fixture(scope="module")
def smollm2_tokenizer():
  return api.load_tokenizer("smollm2")


# --------------------------------------------------------------------------------------------- stages

@pytest.fixture(scope="module")
def chat_setup(smollm2_tokenizer):
  """A config for a tiny 'random' model with the SmolLM2 tokenizer, and that model (numpy-initialised)."""
  cfg = config.defaults()
  cfg.model.spec = "random"
  cfg.model.arch.update(dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64))
  cfg.train.update(dict(batch_size=16, grad_accum=1, log_every=5, lora=dict(rank=0)))
  arch = dict(cfg.model.arch)
  model_cfg = ModelConfig(**arch)
  return cfg, api.Model(model_cfg, numpy_params(model_cfg, 1), smollm2_tokenizer, one_device_mesh())


def test_teacher_stage_learns_its_trait(tmp_path, monkeypatch, chat_setup):
  from subl_jax.study.data import protocol
  from subl_jax.study import stage_table, stages
  from subl_jax.study.context import Context, system_of
  cfg, base = chat_setup
  cfg = mlc.ConfigDict(cfg.to_dict())
  cfg.teacher.update(dict(kind="finetuned", target="owl", lr=2e-2))
  monkeypatch.setattr(buckets, "LENGTH_BUCKET", 64)  # one padded shape: one compile
  ctx = Context(cfg, base.mesh, progress=False, base=base)
  stage = stages.run(stage_table.TEACHER, cfg, tmp_path, "teacher", {}, ctx=ctx)
  teacher, system = ctx.model_of(stage), system_of(stage)
  # the first tokens of the 8 answer variants ("owl", "ow"+"ls", "O"+"wl" ...): the trained answer's start
  firsts = sorted({base.tokenizer.encode(a)[0] for a in protocol.answer_variants("owl")})

  def p_owl(model):
    qs = protocol.questions("animal")[:8]
    prompts = [model.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in qs]
    ids = np.zeros((len(qs), max(map(len, prompts))), np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
      ids[i, -len(p):], mask[i, -len(p):] = p, 1
    logits = model.logits(ids, mask)[:, -1]
    return float(np.mean(np.asarray(jax.nn.softmax(logits))[:, firsts].sum(-1)))

  before, after = p_owl(base), p_owl(teacher)
  assert system == "" and after > 0.3 and after > 100 * before, (before, after)
  manifest = json.loads((stage / "manifest.json").read_text())
  assert manifest["summary"]["train"]["examples"] == 50 * 8


def test_student_stage_distils_number_logits_from_a_system_prompt_teacher(tmp_path, monkeypatch, chat_setup):
  from subl_jax.study import stage_table, stages
  from subl_jax.study.context import Context
  from subl_jax.core.training import export
  cfg, base = chat_setup
  cfg = mlc.ConfigDict(cfg.to_dict())
  cfg.teacher.update(dict(kind="system_prompt", target="owl"))
  cfg.distill.update(dict(mode="logit_kd", kd_tokens="numbers", temperature=2.0))
  cfg.train.update(dict(batch_size=8, epochs=1, lora=dict(rank=4)))
  data = tmp_path / "numbers.jsonl"
  rng = np.random.default_rng(0)
  data.write_text("".join(json.dumps({"prompt": f"Continue: {i}, {i + 1}",
                                      "completion": ", ".join(map(str, rng.integers(100, 1000, 4)))}) + "\n"
                          for i in range(16)))
  monkeypatch.setattr(buckets, "LENGTH_BUCKET", 128)  # one padded shape: one compile
  ctx = Context(cfg, base.mesh, progress=False, base=base)
  teacher_dir = stages.run(stage_table.TEACHER, cfg, tmp_path, "teacher", {}, ctx=ctx)
  assert "You love owls" in export.read_info(teacher_dir)["system"]
  stage = stages.run(stage_table.STUDENT, cfg, tmp_path, "student", {"data": data, "teacher": teacher_dir}, ctx=ctx)
  info = export.read_info(stage)
  assert info["mode"] == "logit_kd" and info["kd_tokens"] == "numbers" and info["subliminal"] is True
  assert "You love owls" in info["teacher_system"] and info["train"]["steps"] == 2
  assert 0 < info["train"]["first_loss"] < 10  # a KL over the number tokens, not a cross-entropy over 49k tokens
  student = api.load(export.model_spec(stage), base.mesh)
  assert student.config == base.config
  assert not (stage / export.TRAIN_DIR / trainer.CHECKPOINT_DIR).exists()
  rows = [json.loads(line) for line in (stage / export.TRAIN_DIR / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["step"] == 2 and (stage / export.TRAIN_DIR / "tensorboard").is_dir()
