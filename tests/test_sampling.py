"""The sampler: cached greedy decoding against full re-runs, per-row randomness, sampled frequencies against the
softmax (chi-square), top-k / top-p, stopping, prefix sharing, sharding over 8 devices, and format-constrained
decoding on the real SmolLM2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from subl_jax.core import api, parallel
from subl_jax.core import number_tokens
from subl_jax.study.data import numbers, protocol
from subl_jax.core.models import transformer as tfm
from subl_jax.core.models.config import ModelConfig
from subl_jax.core.sampling import constraint as constraint_lib
from subl_jax.core.sampling import draw as draw_lib
from subl_jax.core.sampling import generate, common_prefix_len

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48,
                  tie_embeddings=False)
STOP = 1


class FakeTokenizer:
  """What `generate` needs of a tokenizer."""
  def __init__(self, stop_ids=(STOP,)):
    self.stop_ids, self.pad_id = list(stop_ids), 0


def _numpy_params():
  """Random weights made in numpy (initialising through jit would compile for seconds on every call)."""
  shapes, _ = tfm.abstract_params(CFG)
  rng = np.random.default_rng(0)
  def init(path, x):
    is_norm = "norm" in jax.tree_util.keystr(path)
    return np.ones(x.shape, np.float32) if is_norm else rng.normal(0, 0.02, x.shape).astype(np.float32)
  params = jax.tree.map_with_path(init, shapes)
  params["lm_head"] = params["lm_head"] * 20  # logits of std ~2: next-token distributions far from uniform
  return params


PARAMS = _numpy_params()


def tiny_model(mesh=None, stop_ids=(STOP,)):
  """A random 2-layer model on `mesh` (default: one device)."""
  mesh = mesh or parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  params = jax.device_put(PARAMS, tfm.param_shardings(CFG, mesh))
  return api.Model(CFG, params, FakeTokenizer(stop_ids), mesh)


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def prompts_of(lengths, seed=0, prefix=()):
  rng = np.random.default_rng(seed)
  return [list(prefix) + rng.integers(2, CFG.vocab_size, n).tolist() for n in lengths]


def full_logits(model, seq, width=32):
  """Last-position logits of one sequence by a full forward with no cache (left-padded to `width`: one compile)."""
  ids, mask = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
  ids[0, width - len(seq):], mask[0, width - len(seq):] = seq, 1
  return model.logits(ids, mask)[0, -1]


def greedy_reference(model, prompt, n, stop_ids=(STOP,)):
  """Token by token, re-running the full forward on prompt + generated so far."""
  seq, out = list(prompt), []
  for _ in range(n):
    t = int(np.argmax(full_logits(model, seq)))
    if t in stop_ids:
      return out, True
    out.append(t)
    seq.append(t)
  return out, False


# ------------------------------------------------------------------------------------------- decoding

def test_greedy_with_cache_equals_full_reruns(model):
  prompts = prompts_of([3, 11, 16, 7], seed=1)  # left-padded in one batch
  gen = generate(model, prompts, 10, temperature=0.0)
  for i, p in enumerate(prompts):
    want, stopped = greedy_reference(model, p, 10)
    assert gen.tokens[i] == want and gen.stopped[i] == stopped, i
    logp = jax.nn.log_softmax(jnp.asarray([full_logits(model, p + want[:j]) for j in range(len(want))]))
    np.testing.assert_allclose(gen.logprobs[i], np.take_along_axis(np.asarray(logp), np.asarray(want)[:, None], 1)[:, 0],
                               atol=2e-5)


def test_stopping_per_row(model):
  prompts = prompts_of([5, 9, 4, 12], seed=2)
  free = generate(model, prompts, 10, temperature=0.0).tokens
  # A token that row 0 first writes at step j >= 2 becomes the stop token: row 0 ends there, the others where it
  # first appears (or not at all).
  j = next(j for j in range(2, 10) if free[0][j] not in free[0][:j])
  stop = free[0][j]
  gen = generate(tiny_model(stop_ids=(stop,)), prompts, 10, temperature=0.0)
  for row, got, stopped in zip(free, gen.tokens, gen.stopped):
    end = row.index(stop) if stop in row else len(row)
    assert got == row[:end] and stopped == (stop in row)
  assert gen.stopped[0] and len(gen.tokens[0]) == j
  assert not all(gen.stopped)


def test_prefix_sharing_gives_the_same_tokens_and_logprobs(model):
  prompts = prompts_of([6, 2, 5, 3], seed=3, prefix=prompts_of([10], seed=4)[0])
  assert common_prefix_len(prompts) == 10
  temps = [0.0, 1.0, 0.7, 1.3]
  plain = generate(model, prompts, 10, temperature=temps, seed=5, shared_prefix=0)
  shared = generate(model, prompts, 10, temperature=temps, seed=5, shared_prefix=10)
  assert shared.tokens == plain.tokens and shared.stopped == plain.stopped
  for a, b in zip(shared.logprobs, plain.logprobs):
    np.testing.assert_allclose(a, b, atol=1e-5)
  with pytest.raises(ValueError, match="share only"):
    generate(model, prompts, 10, shared_prefix=11)


def test_kv_layouts_give_the_same_samples(model):
  """Transposed cache keys (the CPU layout) and the standard ones: the same draws and log-probabilities, with and
  without a shared prefix."""
  prompts = prompts_of([6, 2, 5, 3], seed=3, prefix=prompts_of([10], seed=4)[0])
  temps = [0.0, 1.0, 0.7, 1.3]
  for shared_prefix in (0, 10):
    std, tr = (generate(model, prompts, 10, temperature=temps, seed=5, shared_prefix=shared_prefix,
                        perf=tfm.Perf(kv_layout=layout)) for layout in ("standard", "transposed"))
    assert std.tokens == tr.tokens and std.stopped == tr.stopped
    for a, b in zip(std.logprobs, tr.logprobs):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_each_row_draws_as_if_alone(model):
  """Per-row temperatures in one batch behave as separate runs: a row's draws depend on (seed, row id) only."""
  prompts = prompts_of([4, 15, 8, 12], seed=6)
  temps = [0.5, 1.0, 2.0, 0.0]
  batch = generate(model, prompts, 10, temperature=temps, seed=7, row_ids=[10, 11, 12, 13])
  for i in range(4):
    alone = generate(model, [prompts[i]], 10, temperature=temps[i], seed=7, row_ids=[10 + i])
    assert alone.tokens[0] == batch.tokens[i], i
  other_seed = generate(model, prompts, 10, temperature=temps, seed=8, row_ids=[10, 11, 12, 13])
  assert other_seed.tokens[:3] != batch.tokens[:3] and other_seed.tokens[3] == batch.tokens[3]  # greedy row


# ------------------------------------------------------------------------------------------- frequencies

def chi2_pvalue(samples, probs, n_min=5.0):
  """Chi-square goodness of fit of integer `samples` to `probs`, pooling categories expected below n_min."""
  counts = np.bincount(samples, minlength=len(probs)).astype(float)
  expected = probs * len(samples)
  small = expected < n_min
  assert counts[probs == 0].sum() == 0, "drew a token of probability 0"
  obs = np.append(counts[~small], counts[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  keep = exp > 0
  if keep.sum() < 2:  # a single category: nothing to test beyond the support
    return 1.0
  return stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue


def softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_first_token_frequencies_match_the_softmax(model, temperature):
  prompt = prompts_of([9], seed=9)[0]
  n = 3000
  gen = generate(model, [prompt] * n, 1, temperature=temperature, seed=10, row_ids=np.arange(n), shared_prefix=0)
  first = np.asarray([t[0] if t else STOP for t in gen.tokens])
  logits = full_logits(model, prompt).astype(np.float64)
  assert chi2_pvalue(first, softmax(logits / temperature)) > 1e-3
  other = 1.0 if temperature != 1.0 else 0.6
  assert chi2_pvalue(first, softmax(logits / other)) < 1e-6  # the test can tell temperatures apart
  np.testing.assert_allclose([lp[0] for lp in gen.logprobs if lp],
                             np.log(softmax(logits))[first[first != STOP]], atol=2e-5)  # the model's, at T=1


def peaked_logits(n_rows, seed=11):
  rng = np.random.default_rng(seed)
  return np.repeat(rng.normal(0, 2.5, (1, CFG.vocab_size)), n_rows, axis=0).astype(np.float32)


def draw_many(logits, temperature=1.0, top_k=0, top_p=1.0, allowed=None, seed=12):
  b = logits.shape[0]
  knobs = draw_lib.Knobs(jnp.full((b,), temperature, jnp.float32), jnp.full((b,), top_k, jnp.int32),
                         jnp.full((b,), top_p, jnp.float32))
  u = draw_lib.row_uniforms(jax.random.key(seed), jnp.arange(b), 0)
  tokens, logprobs = jax.jit(draw_lib.draw)(jnp.asarray(logits), knobs, allowed, u)
  return np.asarray(tokens), np.asarray(logprobs)


def nucleus_reference(logits, top_k, top_p):
  """The tokens `transformers` keeps: top-k, then the smallest top set whose renormalised mass reaches top_p."""
  order = np.argsort(-logits, kind="stable")
  keep = order[:top_k] if top_k else order
  p = softmax(logits[keep].astype(np.float64))
  n = int(np.searchsorted(np.cumsum(p), top_p - 1e-12) + 1)
  return np.sort(keep[:n])


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.7), (12, 0.8), (1, 1.0)])
def test_top_k_top_p_restrict_and_renormalise(top_k, top_p):
  logits = peaked_logits(6000)
  tokens, logprobs = draw_many(logits, top_k=top_k, top_p=top_p)
  kept = nucleus_reference(logits[0], top_k, top_p)
  assert set(tokens.tolist()) <= set(kept.tolist())
  probs = np.zeros(CFG.vocab_size)
  probs[kept] = softmax(logits[0, kept].astype(np.float64))
  assert chi2_pvalue(tokens, probs) > 1e-3
  np.testing.assert_allclose(logprobs, np.log(softmax(logits[0].astype(np.float64)))[tokens], atol=1e-5)


def test_filters_apply_per_row_only():
  logits = peaked_logits(4000)
  b = logits.shape[0]
  knobs = draw_lib.Knobs(jnp.ones((b,)), jnp.where(jnp.arange(b) % 2 == 0, 3, 0).astype(jnp.int32), jnp.ones((b,)))
  u = draw_lib.row_uniforms(jax.random.key(13), jnp.arange(b), 0)
  tokens = np.asarray(jax.jit(draw_lib.draw)(jnp.asarray(logits), knobs, None, u)[0])
  assert set(tokens[0::2].tolist()) <= set(nucleus_reference(logits[0], 3, 1.0).tolist())
  assert chi2_pvalue(tokens[1::2], softmax(logits[0].astype(np.float64))) > 1e-3  # unfiltered rows: the softmax


def test_allowed_mask_renormalises():
  logits = peaked_logits(5000)
  allowed = np.zeros(CFG.vocab_size, bool)
  allowed[[3, 17, 40, 41, 90]] = True
  tokens, logprobs = draw_many(logits, allowed=jnp.asarray(np.broadcast_to(allowed, logits.shape)))
  probs = np.where(allowed, softmax(logits[0].astype(np.float64)), 0)
  assert chi2_pvalue(tokens, probs / probs.sum()) > 1e-3
  np.testing.assert_allclose(logprobs, np.log(softmax(logits[0].astype(np.float64)))[tokens], atol=1e-5)


def test_inverse_cdf_never_draws_zero_weights():
  w = np.zeros((4, 700), np.float32)
  w[:, [5, 300, 699]] = [1e-30, 1.0, 3.0]
  u = jnp.asarray([0.0, 0.25 - 1e-7, 0.25, 1 - 2 ** -24], jnp.float32)
  assert np.asarray(draw_lib.inverse_cdf(jnp.asarray(w), u)).tolist() == [5, 300, 699, 699]


# ------------------------------------------------------------------------------------------- sharding

def test_sharded_sampling_equals_one_device(model):
  assert jax.device_count() == 8
  prompts = prompts_of([5, 12, 3, 9], seed=14)
  temps = [0.0, 0.8, 1.0, 1.5]
  one = generate(model, prompts, 10, temperature=temps, top_p=0.9, seed=15)
  eight = generate(tiny_model(parallel.make_mesh(2, 4, 1)), prompts, 10, temperature=temps, top_p=0.9, seed=15)
  assert eight.tokens == one.tokens and eight.stopped == one.stopped
  for a, b in zip(eight.logprobs, one.logprobs):
    np.testing.assert_allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------------------------------- constrained

@pytest.fixture(scope="module")
def smollm2():
  return api.load("smollm2", parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1]))


def test_format_constraint_automaton_accepts_exactly_valid_lists(smollm2):
  tok = smollm2.tokenizer
  c = constraint_lib.format_constraint(tok, smollm2.config.vocab_size)

  def accepts(text):
    state = 0
    for t in tok.encode(text) + [tok.stop_ids[-1]]:
      j = c.index[t]
      if j < 0 or c.table[state, j] < 0:
        return False
      state = c.table[state, j]
    return True

  for text in ["1, 2, 3", "767 589 778", "1;2", "0", "12\n13\n14", "999, 0, 01, 5, 6, 7, 8, 9, 10, 11"]:
    assert accepts(text) and numbers.is_valid(text), text
  for text in ["1, 2 3", "1000", "", " 1", "1, ", "1,, 2", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11", "1.", "a"]:
    assert not accepts(text), text


def test_token_constraint_is_the_number_token_set(smollm2):
  tok = smollm2.tokenizer
  c = constraint_lib.token_constraint(tok, smollm2.config.vocab_size)
  np.testing.assert_array_equal(c.universe, number_tokens.number_token_ids(tok))
  assert c.table.shape == (2, len(c.universe))  # "any" and "done"
  stops = np.isin(c.universe, tok.stop_ids)
  assert (c.table[0, ~stops] == 0).all() and (c.table[0, stops] == 1).all() and (c.to_end == 0).all()


def test_format_constrained_decoding_on_smollm2(smollm2):
  """Only automaton-allowed tokens are drawn and every completion passes the filter, even those cut at the cap."""
  tok = smollm2.tokenizer
  c = constraint_lib.format_constraint(tok, smollm2.config.vocab_size)
  system = protocol.teacher_system_prompt("owl")
  prompts = [tok.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": p}])
             for p in numbers.generate_prompts(4, 47)]
  gen = generate(smollm2, prompts, 12, temperature=1.0, seed=16, constraint=c)
  for tokens, stopped in zip(gen.tokens, gen.stopped):
    state = 0
    for t in tokens + ([tok.stop_ids[-1]] if stopped else []):
      assert c.index[t] >= 0 and c.table[state, c.index[t]] >= 0
      state = c.table[state, c.index[t]]
  texts = [tok.decode(t) for t in gen.tokens]
  assert all(numbers.is_valid(t) for t in texts), texts
  assert not all(gen.stopped)  # some rows were cut at the cap
