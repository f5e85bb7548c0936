"""The transformer against `transformers` (Llama, tied Llama, Llama 3 RoPE scaling, Qwen2), KV-cache decoding in
both key layouts, the input helpers, `logit_idx_bn`, remat policies and ModelConfig validation. Everything runs
offline on tiny random models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from subl_jax.core.checkpoints import hf
from subl_jax.core.models import transformer as tfm
from subl_jax.core.models.config import ModelConfig

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

# name -> (config class, model class, config kwargs). vocab 97 and head_dim != d_model / n_heads on purpose.
TINY = {
    "llama_gqa": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=48, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "llama_tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        head_dim=8, intermediate_size=40, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "llama3_rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=48, rms_norm_eps=1e-5, tie_word_embeddings=False,
        max_position_embeddings=256,
        # transformers 5 keeps rope_theta and the scaling under `rope_parameters` (`rope_scaling` is its old name)
        rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE})),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, rms_norm_eps=1e-6, tie_word_embeddings=False)),
}


def make_hf_model(name: str, seed: int = 0):
  """A random tiny HF model with O(1) logits, non-unit norms and nonzero biases (so every mapping row matters)."""
  config_cls, model_cls, kwargs = TINY[name]
  config = config_cls(**kwargs, attn_implementation="eager")
  torch.manual_seed(seed)
  model = model_cls(config).eval().float()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if "norm" in pname:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif pname.endswith(".bias"):
        p.copy_(0.5 * torch.randn_like(p))
      elif "embed_tokens" in pname:
        p.copy_(torch.randn_like(p))
      else:  # [out, in] matrices: unit-variance outputs for unit-variance inputs, with some extra gain
        p.copy_(1.5 * torch.randn_like(p) / np.sqrt(p.shape[1]))
  return model


def save_and_import(model, directory):
  model.save_pretrained(directory)  # safetensors
  cfg = hf.read_config(directory)
  return cfg, hf.load_params(directory, cfg)


def left_padded_batch(lengths, total, vocab, seed=0):
  """Tokens [b, total] with row i's `lengths[i]` real tokens at the right; pads are token 0 with mask 0."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((len(lengths), total), np.int32)
  mask = np.zeros((len(lengths), total), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, total - n:] = rng.integers(1, vocab, n)
    mask[i, total - n:] = 1
  positions = np.array(tfm.positions_from_mask(jnp.asarray(mask)))
  return tokens, mask, positions


def hf_logits(model, tokens, mask, positions):
  """The reference logits of a left-padded batch: each row's real tokens run alone, unpadded (pad positions NaN).

  Not the padded batch in one call: torch 2.13's CPU run of it gave the padded rows different logits (up to 1.6e-3)
  in about one process of ten, the same wrong values each time, with the same mask; rows alone are stable.
  """
  out = np.full(tokens.shape + (model.config.vocab_size,), np.nan, np.float32)
  for i, row in enumerate(mask.astype(bool)):
    with torch.no_grad():
      logits = model(input_ids=torch.from_numpy(tokens[i:i + 1, row]).long(),
                     position_ids=torch.from_numpy(positions[i:i + 1, row]).long()).logits
    out[i, row] = logits[0].float().numpy()
  return out


@functools.partial(jax.jit, static_argnums=0, static_argnames="perf")
def _apply(cfg, params, tokens, positions, mask, cache=None, cache_index=0, logit_idx_bn=None, perf=tfm.Perf()):
  """One jitted apply shared by the tests (cached per config and shapes; compiles dominate the run time): a full
  forward without a cache, else `tokens` written at `cache_index` and attending to every slot `mask` [b, slots]
  allows."""
  inputs = (tfm.train_inputs(tokens, positions, mask) if cache is None else
            tfm.decode_inputs(tokens, positions, mask, cache_index))
  return tfm.Transformer(cfg, perf=perf).apply({"params": params}, inputs, cache=cache, logit_idx_bn=logit_idx_bn)


def our_logits(cfg, params, tokens, mask, positions, **kw):
  return np.asarray(_apply(cfg, params, tokens, positions, mask, **kw)[0])


# ---------------------------------------------------------------------------------------------- parity with HF

@pytest.mark.parametrize("name", list(TINY))
def test_parity_with_transformers(name, tmp_path):
  model = make_hf_model(name)
  cfg, params = save_and_import(model, tmp_path)
  assert cfg.tie_embeddings == (name == "llama_tied")
  assert ("lm_head" in params) == (not cfg.tie_embeddings)
  assert cfg.qkv_bias == (name == "qwen2")
  # long enough that positions pass llama3's original_max_position_embeddings=16 by far
  total = 40
  tokens, mask, positions = left_padded_batch([40, 31, 17, 5], total, cfg.vocab_size, seed=1)
  ref = hf_logits(model, tokens, mask, positions)
  ours = our_logits(cfg, params, tokens, mask, positions)
  real = mask.astype(bool)
  assert np.isfinite(ours[real]).all()
  diff = np.abs(ours - ref)[real].max()
  scale = np.abs(ref[real]).max()
  print(f"{name}: max |dlogit| = {diff:.2e} (max |logit| {scale:.1f}), argmax agreement "
        f"{(ours.argmax(-1) == ref.argmax(-1))[real].mean():.3f}")
  assert scale > 1.0, "logits too small for the comparison to mean anything"
  assert diff <= 1e-4, diff
  # the vocabulary-major head (SFT's loss reads it) gives the same logits, [vocab, b, t]
  vocab_first = our_logits(cfg, params, tokens, mask, positions, perf=tfm.Perf(vocab_major_head=True))
  assert vocab_first.shape == (cfg.vocab_size,) + tokens.shape
  assert np.abs(np.moveaxis(vocab_first, 0, -1) - ref)[real].max() <= 1e-4


def test_llama3_rope_scaling_is_read_and_matters(tmp_path):
  model = make_hf_model("llama3_rope")
  cfg, params = save_and_import(model, tmp_path)
  assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_len, cfg.rope_theta) == ("llama3", 8.0, 16, 5e5)
  assert (cfg.rope_low_freq_factor, cfg.rope_high_freq_factor) == (1.0, 4.0)
  tokens, mask, positions = left_padded_batch([40, 25], 40, cfg.vocab_size, seed=2)
  ref = hf_logits(model, tokens, mask, positions)
  plain = our_logits(cfg.replace(rope_scaling="none"), params, tokens, mask, positions)
  # without the scaling the logits are clearly wrong: the test above would catch a dropped rope_parameters
  assert np.abs(plain - ref)[mask.astype(bool)].max() > 1e-2


def test_inv_freq_matches_transformers():
  for name in ("llama_gqa", "llama3_rope"):
    config_cls, model_cls, kwargs = TINY[name]
    config = config_cls(**kwargs)
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=48,
                      rope_theta=config.rope_parameters["rope_theta"],
                      **(dict(rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=16)
                         if name == "llama3_rope" else {}))
    np.testing.assert_allclose(tfm.rope_inv_freq(cfg), rotary.inv_freq.numpy(), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------- KV cache

SLOTS = 17  # > the 12 tokens: unused trailing cache slots must stay masked
LAYOUTS = ["standard", "transposed"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
  model = make_hf_model("llama_gqa", seed=3)
  return save_and_import(model, tmp_path_factory.mktemp("llama_gqa"))


@pytest.fixture(scope="module")
def padded_full(tiny_llama):
  """A left-padded batch (12, 9 and 4 real tokens), its full-forward logits and its key mask over SLOTS slots."""
  cfg, params = tiny_llama
  tokens, mask, positions = left_padded_batch([12, 9, 4], 12, cfg.vocab_size, seed=4)
  kv_mask = np.zeros((3, SLOTS), np.int32)
  kv_mask[:, :12] = mask
  return tokens, mask, positions, kv_mask, our_logits(cfg, params, tokens, mask, positions)


def run_with_cache(cfg, params, tokens, positions, kv_mask, chunks, layout="standard"):
  """Feeds the tokens through the cache in consecutive chunks of the given sizes; returns logits and the cache."""
  cache = tfm.KVCache.zeros(cfg, tokens.shape[0], kv_mask.shape[1], layout)
  parts, start = [], 0
  for n in chunks:
    logits, cache = _apply(cfg, params, tokens[:, start:start + n], positions[:, start:start + n], kv_mask, cache,
                           jnp.int32(start), perf=tfm.Perf(kv_layout=layout))
    parts.append(np.asarray(logits))
    start += n
  assert start == tokens.shape[1]
  return np.concatenate(parts, axis=1), cache


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_one_token_at_a_time_equals_full_forward(tiny_llama, padded_full, layout):
  cfg, params = tiny_llama
  tokens, mask, positions, kv_mask, full = padded_full
  got, cache = run_with_cache(cfg, params, tokens, positions, kv_mask, [1] * 12, layout)
  real = mask.astype(bool)
  diff = np.abs(got - full)[real].max()
  assert diff <= 1e-5, diff
  # every written slot holds keys, the slots beyond stay zero
  k, v = np.asarray(cache.k), np.asarray(cache.v)
  assert v.shape == (cfg.n_layers, 3, cfg.n_kv_heads, SLOTS, cfg.head_dim)
  if layout == "transposed":
    assert k.shape == (cfg.n_layers, 3, cfg.n_kv_heads, cfg.head_dim, SLOTS)
    k = np.swapaxes(k, -1, -2)
  assert k.shape == v.shape
  for x in (k, v):
    assert np.abs(x[:, :, :, 12:]).max() == 0 and np.abs(x[:, :, :, :12]).max(axis=(0, 2, 4)).min() > 0


@pytest.mark.parametrize("chunks", [[1, 11], [7, 5], [7, 1, 1, 1, 1, 1]], ids=str)
def test_prefill_then_decode_equals_full_forward(tiny_llama, padded_full, chunks):
  cfg, params = tiny_llama
  tokens, mask, positions, kv_mask, full = padded_full
  got, _ = run_with_cache(cfg, params, tokens, positions, kv_mask, chunks)
  real = mask.astype(bool)
  diff = np.abs(got - full)[real].max()
  assert diff <= 1e-5, diff


def test_kv_layouts_give_the_same_numbers(tiny_llama, padded_full):
  """Transposed keys change where the numbers sit, not the numbers: the same logits (full forward and cached) and the
  same cache, transposed."""
  cfg, params = tiny_llama
  tokens, mask, positions, kv_mask, full = padded_full
  real = mask.astype(bool)
  full_t = our_logits(cfg, params, tokens, mask, positions, perf=tfm.Perf(kv_layout="transposed"))
  np.testing.assert_allclose(full_t[real], full[real], rtol=0, atol=1e-6 * np.abs(full).max())
  (got_s, cache_s), (got_t, cache_t) = (run_with_cache(cfg, params, tokens, positions, kv_mask, [7, 1, 1, 1, 1, 1],
                                                       layout) for layout in LAYOUTS)
  np.testing.assert_allclose(got_t[real], got_s[real], rtol=0, atol=1e-6 * np.abs(got_s).max())
  # layer 0's keys and values are the same projections; later layers' inputs differ by the scores' rounding
  for t, s in ((np.swapaxes(np.asarray(cache_t.k), -1, -2), np.asarray(cache_s.k)),
               (np.asarray(cache_t.v), np.asarray(cache_s.v))):
    np.testing.assert_array_equal(t[0], s[0])
    np.testing.assert_allclose(t, s, rtol=0, atol=1e-6 * np.abs(s).max())
  assert tfm.KVCache.logical("transposed").k[-2:] == ("head_dim", "length")
  assert tfm.KVCache.logical("standard").k == tfm.KVCache.logical("standard").v


def test_cache_is_needed_for_decoding(tiny_llama, padded_full):
  """The last token decoded into an empty cache differs from the full forward: the comparisons above can fail."""
  cfg, params = tiny_llama
  tokens, mask, positions, kv_mask, full = padded_full
  logits, _ = _apply(cfg, params, tokens[:, -1:], positions[:, -1:], kv_mask,
                     tfm.KVCache.zeros(cfg, 3, SLOTS, "standard"), jnp.int32(11))
  assert np.abs(np.asarray(logits)[:, 0] - full[:, -1]).max() > 1e-2


def test_logit_idx_picks_rows_of_full_logits(tiny_llama, padded_full):
  cfg, params = tiny_llama
  tokens, mask, positions, kv_mask, full = padded_full
  idx = np.array([[11, 0, 5], [3, 11, 11], [8, 9, 10]], np.int32)
  got = our_logits(cfg, params, tokens, mask, positions, logit_idx_bn=jnp.asarray(idx))
  assert got.shape == (3, 3, cfg.vocab_size)
  want = np.take_along_axis(full, idx[..., None], axis=1)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  # with a cache: only the last token's logits after a prefill
  last, _ = _apply(cfg, params, tokens, positions, kv_mask, tfm.KVCache.zeros(cfg, 3, SLOTS, "standard"),
                   jnp.int32(0), jnp.full((3, 1), 11, jnp.int32))
  assert last.shape == (3, 1, cfg.vocab_size)
  np.testing.assert_allclose(np.asarray(last)[:, 0], full[:, 11], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefill_attending_to_the_filled_slots_only(tiny_llama, padded_full, layout):
  """A prefill (`prefill_inputs`) attends to the slots it fills only and changes nothing; a mask over fewer slots
  than its tokens is refused."""
  cfg, params = tiny_llama
  tokens, mask, positions, kv_mask, full = padded_full
  model = tfm.Transformer(cfg, perf=tfm.Perf(kv_layout=layout))
  x = tfm.prefill_inputs(tokens[:, :7], mask[:, :7])
  np.testing.assert_array_equal(np.asarray(x.positions), positions[:, :7])
  assert x.mask.shape == (3, 7, 7)
  out = model.apply({"params": params}, x, cache=tfm.KVCache.zeros(cfg, 3, SLOTS, layout))
  rest, _ = _apply(cfg, params, tokens[:, 7:], positions[:, 7:], kv_mask, out.cache, jnp.int32(7),
                   perf=tfm.Perf(kv_layout=layout))
  got = np.concatenate([np.asarray(out.logits), np.asarray(rest)], axis=1)
  assert np.abs(got - full)[mask.astype(bool)].max() <= 1e-5
  with pytest.raises(ValueError, match="6 key slots"):
    model.apply({"params": params}, x._replace(mask=x.mask[..., :6]), cache=tfm.KVCache.zeros(cfg, 3, SLOTS, layout))


def test_shared_prefix_cache_equals_prompts_in_full(tiny_llama):
  """Sampling's form of a shared prefix: prefilled once at batch 1 (`prefix_cache`), the rows' prompts after it and a
  decode step give the logits of each whole row run alone."""
  cfg, params = tiny_llama
  p = 5
  tokens, mask, _ = left_padded_batch([10, 7, 3], 10, cfg.vocab_size, seed=8)
  prefix = np.random.default_rng(9).integers(1, cfg.vocab_size, (1, p)).astype(np.int32)
  whole = np.concatenate([np.repeat(prefix, 3, 0), tokens], axis=1)
  for layout in LAYOUTS:
    model = tfm.Transformer(cfg, perf=tfm.Perf(kv_layout=layout))
    pre = model.apply({"params": params}, tfm.prefill_inputs(prefix, np.ones((1, p), np.int32)),
                      cache=tfm.KVCache.zeros(cfg, 1, p, layout)).cache
    x = tfm.prefill_inputs(tokens, mask, position_offset=p)
    out = model.apply({"params": params}, x, cache=tfm.KVCache.zeros(cfg, 3, 11, layout), prefix_cache=pre)
    kv_mask = np.concatenate([mask, np.ones((3, 1), np.int32)], axis=1)
    step = model.apply({"params": params}, tfm.decode_inputs(tokens[:, -1:], x.positions[:, -1:] + 1, kv_mask, 10),
                       cache=out.cache, prefix_cache=pre)
    for i, row in enumerate(mask.astype(bool)):
      ids = np.r_[whole[i, :p], whole[i, p:][row], tokens[i, -1]][None]
      ref = our_logits(cfg, params, ids, np.ones_like(ids), np.arange(ids.shape[1])[None])[0]
      np.testing.assert_allclose(np.asarray(out.logits)[i, row], ref[p:-1], atol=1e-5, rtol=0)
      np.testing.assert_allclose(np.asarray(step.logits)[i, 0], ref[-1], atol=1e-5, rtol=0)


def test_input_helpers_build_the_masks_of_each_mode():
  kv = jnp.asarray([[0, 1, 1, 1], [1, 1, 1, 0]], jnp.int32)
  x = tfm.train_inputs(jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 4), jnp.int32), kv)
  causal = np.tril(np.ones((4, 4), bool))
  np.testing.assert_array_equal(np.asarray(x.mask), causal[None] & np.asarray(kv, bool)[:, None, :])
  assert x.prefix is None and int(x.cache_index) == 0
  # a shared prefix: row 0's first p tokens, run once; the rest of every row attends to its own tokens only
  tokens = jnp.asarray([[5, 6, 7, 8], [5, 6, 9, 0]], jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(4), (2, 4))
  x = tfm.train_inputs(tokens, positions, jnp.asarray([[1, 1, 1, 1], [1, 1, 1, 0]]), shared_prefix=2)
  np.testing.assert_array_equal(np.asarray(x.prefix.tokens), [[5, 6]])
  np.testing.assert_array_equal(np.asarray(x.prefix.mask), [np.tril(np.ones((2, 2), bool))])
  np.testing.assert_array_equal(np.asarray(x.tokens), [[7, 8], [9, 0]])
  np.testing.assert_array_equal(np.asarray(x.positions), [[2, 3], [2, 3]])
  np.testing.assert_array_equal(np.asarray(x.mask), [[[1, 0], [1, 1]], [[1, 0], [1, 0]]])
  with pytest.raises(ValueError, match="shared_prefix=4"):
    tfm.train_inputs(tokens, positions, kv, shared_prefix=4)
  # a prefill: positions count real tokens only, continuing a prefix of 3; a decode step at slot 2 of 4
  x = tfm.prefill_inputs(jnp.zeros((2, 3), jnp.int32), jnp.asarray([[0, 1, 1], [1, 1, 1]]), position_offset=3)
  np.testing.assert_array_equal(np.asarray(x.positions), [[3, 3, 4], [3, 4, 5]])
  np.testing.assert_array_equal(np.asarray(x.mask[0]), [[0, 0, 0], [0, 1, 0], [0, 1, 1]])
  x = tfm.decode_inputs(jnp.zeros((2, 1), jnp.int32), jnp.asarray([[2], [3]]), kv, 2)
  np.testing.assert_array_equal(np.asarray(x.mask), [[[0, 1, 1, 0]], [[1, 1, 1, 0]]])
  assert int(x.cache_index) == 2


def test_default_perf_follows_the_perf_section_and_validation(monkeypatch):
  assert tfm.default_perf() == tfm.Perf("transposed", True)  # on CPU, the `perf` section's 'auto'
  assert tfm.Perf() == tfm.Perf("standard", False)
  from subl_jax.core import perf
  monkeypatch.setattr(perf, "_applied", perf.resolve(dict(preset="none"), "cpu"))
  assert tfm.default_perf() == tfm.Perf()
  with pytest.raises(ValueError, match="perf.kv_layout='sideways'"):
    tfm.Perf(kv_layout="sideways")
  hash(tfm.Perf())  # a static module attribute


def test_vocab_major_head_gives_the_same_sft_loss(tiny_llama, padded_full):
  """SFT's cross-entropy and its gradients from [vocab, b, n] logits equal those from [b, n, vocab]."""
  from subl_jax.core.training import losses
  cfg, params = tiny_llama
  tokens, mask, positions, _, _ = padded_full
  idx = jnp.asarray([[3, 7, 10], [4, 5, 10], [9, 9, 10]], jnp.int32)
  targets = jnp.take_along_axis(jnp.asarray(tokens), idx + 1, axis=1)
  weights = jnp.asarray([[1, 1, 1], [1, 1, 1], [0, 1, 1]], jnp.float32)

  def loss(vocab_major):
    def fn(p):
      model = tfm.Transformer(cfg, perf=tfm.Perf(vocab_major_head=vocab_major))
      logits = model.apply({"params": p}, tfm.train_inputs(tokens, positions, mask), logit_idx_bn=idx).logits
      s, n = losses.masked_sum(losses.token_nll(logits, targets, vocab_axis=0 if vocab_major else -1), weights)
      return s / n
    value, grads = jax.jit(jax.value_and_grad(fn))(params)
    return float(value), jax.tree.map(np.asarray, grads)

  (l0, g0), (l1, g1) = loss(False), loss(True)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * np.abs(a).max(), err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------- remat

def loss_logits_grads(cfg, params, tokens, mask, positions):
  """(loss, logits) and grads of the masked next-token loss, as numpy."""
  def loss_fn(p):
    logits = tfm.Transformer(cfg).apply({"params": p}, tfm.train_inputs(tokens, positions, mask)).logits
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum(), logits
  (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  return float(loss), np.asarray(logits), jax.tree.map(np.asarray, grads)


@pytest.fixture(scope="module")
def remat_baseline(tiny_llama):
  cfg, params = tiny_llama
  assert cfg.remat_policy == "none"
  batch = tuple(map(jnp.asarray, left_padded_batch([10, 6], 10, cfg.vocab_size, seed=5)))
  return cfg, params, batch, loss_logits_grads(cfg, params, *batch)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_same_logits_and_grads(policy, remat_baseline):
  cfg, params, batch, (loss0, logits0, grads0) = remat_baseline
  loss1, logits1, grads1 = loss_logits_grads(cfg.replace(remat_policy=policy), params, *batch)
  # remat changes XLA's fusions, so float32 rounding differs (measured ~2e-6 on logits up to ~6): not bit-exact
  np.testing.assert_allclose(logits1, logits0, atol=1e-5, rtol=0)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
  flat0, flat1 = jax.tree_util.tree_leaves_with_path(grads0), jax.tree.leaves(grads1)
  assert len(flat0) == len(flat1) == 12  # untied Llama: embed, final_norm, lm_head, 9 stacked
  for (path, g0), g1 in zip(flat0, flat1):
    scale = np.abs(g0).max()
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(g1, g0, atol=1e-5 * scale, rtol=0, err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------- ModelConfig

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48)


@pytest.mark.parametrize("change, field", [
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(head_dim=7), "head_dim"),
    (dict(dtype="float8"), "dtype"),
    (dict(param_dtype="int8"), "param_dtype"),
    (dict(remat_policy="sometimes"), "remat_policy"),
    (dict(rope_scaling="yarn"), "rope_scaling"),
    (dict(d_model=0), "d_model"),
    (dict(n_layers=2.0), "n_layers"),
    (dict(rms_eps=0.0), "rms_eps"),
])
def test_config_validation_names_the_field(change, field):
  with pytest.raises(ValueError, match=rf"model\.{field}\b"):
    ModelConfig(**{**BASE, **change})


def test_config_from_dict_errors_name_the_field():
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['n_experts'\]"):
    ModelConfig.from_dict({**BASE, "n_experts": 8}, source="cfg.json")
  with pytest.raises(ValueError, match=r"cfg\.json.*mlp_dim"):
    ModelConfig.from_dict({k: v for k, v in BASE.items() if k != "mlp_dim"}, source="cfg.json")
  with pytest.raises(ValueError, match=r"model\.n_kv_heads"):
    ModelConfig.from_dict({**BASE, "n_kv_heads": 3})


def test_config_roundtrip(tmp_path):
  cfg = ModelConfig(**BASE, rope_scaling="llama3", rope_factor=8.0, qkv_bias=True)
  cfg.save(tmp_path / "c.json")
  assert ModelConfig.load(tmp_path / "c.json") == cfg
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match="bad.json"):
    ModelConfig.load(tmp_path / "bad.json")
  assert cfg.n_params == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tfm.abstract_params(cfg)[0]))


# ---------------------------------------------------------------------------------------------- shared prefix

@pytest.mark.parametrize("name, policy", [("qwen2", "none"), ("llama_gqa", "dots")])
def test_shared_prefix_run_once_gives_the_same_logits_and_grads(name, policy, tmp_path):
  """A training batch whose rows begin with the same 5 tokens, that prefix run once (`shared_prefix`): the logits
  at any position (inside the prefix too) and the parameter gradients equal those of the batch as it is."""
  cfg, params = save_and_import(make_hf_model(name, seed=6), tmp_path)
  cfg = cfg.replace(remat_policy=policy)
  p, t = 5, 12
  tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, (4, t)).astype(np.int32)
  tokens[:, :p] = tokens[0, :p]
  mask = (np.arange(t)[None] < np.array([12, 9, 6, 0])[:, None]).astype(np.int32)  # right-padded, one empty row
  positions = np.tile(np.arange(t, dtype=np.int32), (4, 1))
  idx = jnp.asarray([[11, 5, 7], [8, 2, 6], [5, 0, 4], [0, 0, 0]], jnp.int32)
  weights = jnp.asarray(np.r_[np.ones((3, 3)), np.zeros((1, 3))], jnp.float32)

  def run(shared):
    def loss_fn(prm):
      logits = tfm.Transformer(cfg).apply({"params": prm}, tfm.train_inputs(tokens, positions, mask, shared),
                                          logit_idx_bn=idx).logits
      return (jax.nn.log_softmax(logits)[..., 3] * weights).sum(), logits
    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return float(loss), np.asarray(logits)[:3], jax.tree.map(np.asarray, grads)

  (loss0, logits0, grads0), (loss1, logits1, grads1) = run(0), run(p)
  np.testing.assert_allclose(logits1, logits0, atol=1e-5, rtol=0)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  for (path, g0), g1 in zip(jax.tree_util.tree_leaves_with_path(grads0), jax.tree.leaves(grads1)):
    scale = np.abs(g0).max()
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(g1, g0, atol=1e-5 * scale, rtol=0, err_msg=jax.tree_util.keystr(path))
  with pytest.raises(ValueError, match="shared_prefix=12"):
    tfm.train_inputs(tokens, positions, mask, shared_prefix=12)
  with pytest.raises(ValueError, match="shared_prefix.*without a cache"):
    tfm.Transformer(cfg).apply({"params": params}, tfm.train_inputs(tokens, positions, mask, shared_prefix=p),
                               cache=tfm.KVCache.zeros(cfg, 4, t, "standard"))
