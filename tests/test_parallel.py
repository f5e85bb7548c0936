"""The mesh, the logical-axis rules and sharded execution on 8 fake CPU devices (set up by conftest.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import NamedSharding, PartitionSpec as P

from subl_jax.core import parallel
from subl_jax.core.checkpoints import hf
from subl_jax.core.models import transformer as tfm
from subl_jax.core.models.config import ModelConfig


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
  assert len(jax.devices()) == 8, "conftest.py should give 8 fake CPU devices (XLA_FLAGS set before jax import)"


# ---------------------------------------------------------------------------------------------- mesh shape

@pytest.mark.parametrize("shape, n, want", [
    ((1, -1, 1), 8, (1, 8, 1)),
    ((2, -1, 2), 8, (2, 2, 2)),
    ((-1, 2, 1), 8, (4, 2, 1)),
    ((1, 1, -1), 8, (1, 1, 8)),
    ((2, 2, 2), 8, (2, 2, 2)),
    ((1, -1, 1), 1, (1, 1, 1)),
])
def test_resolve_mesh_shape(shape, n, want):
  assert parallel.resolve_mesh_shape(shape, n) == want


@pytest.mark.parametrize("shape, n, pattern", [
    ((0, -1, 1), 8, r"mesh\.data=0: expected a positive size or -1"),
    ((1, -2, 1), 8, r"mesh\.fsdp=-2: expected a positive size or -1"),
    ((1, 1, 0), 8, r"mesh\.tensor=0"),
    ((3, -1, 1), 8, r"mesh\.data=3, mesh\.fsdp=-1, mesh\.tensor=1: .*do not divide the 8 .*mesh\.fsdp=-1 cannot"),
    ((2, 2, 1), 8, r"mesh\.data=2, mesh\.fsdp=2, mesh\.tensor=1: product 4 != 8 available devices"),
    ((2, 2, 4), 8, r"mesh\.tensor=4: product 16 != 8"),
    ((-1, -1, 1), 8, r"mesh\.data=-1, mesh\.fsdp=-1.*at most one"),
    ((1, 8), 8, r"mesh: expected 3 sizes"),
])
def test_resolve_mesh_shape_errors(shape, n, pattern):
  with pytest.raises(ValueError, match=pattern):
    parallel.resolve_mesh_shape(shape, n)


def test_make_mesh():
  mesh = parallel.make_mesh(2, -1, 2)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
  one = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  assert one.devices.size == 1
  four = parallel.make_mesh(devices=jax.devices()[:4])
  assert dict(four.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
  with pytest.raises(ValueError, match=r"mesh\.data=3.*do not divide the 4"):
    parallel.make_mesh(3, -1, 1, devices=jax.devices()[:4])
  with pytest.raises(ValueError, match=r"product 8 != 4"):
    parallel.make_mesh(2, 2, 2, devices=jax.devices()[:4])


# ---------------------------------------------------------------------------------------------- logical rules

@pytest.fixture(scope="module")
def mesh222():
  return parallel.make_mesh(2, 2, 2)


@pytest.mark.parametrize("names, shape, want", [
    (("batch", "length", "act_embed"), (4, 7, 32), P(("data", "fsdp"), None, None)),
    (("embed", "mlp"), (32, 48), P("fsdp", "tensor")),
    (("mlp", "embed"), (48, 32), P("tensor", "fsdp")),
    (("vocab", "embed"), (64, 32), P("tensor", "fsdp")),
    (("embed", "heads", "head_dim"), (32, 4, 8), P("fsdp", "tensor", None)),
    (("layers", "embed", "kv_heads", "head_dim"), (2, 32, 2, 8), P(None, "fsdp", "tensor", None)),
    (("norm",), (32,), P(None)),
    ((None, "unknown_axis"), (4, 4), P(None, None)),
    # not divisible: replicated (or the innermost mesh axis dropped)
    (("vocab", "embed"), (97, 32), P(None, "fsdp")),
    (("embed", "heads", "head_dim"), (32, 9, 8), P("fsdp", None, None)),
    (("embed", "kv_heads", "head_dim"), (33, 3, 8), P(None, None, None)),
    (("batch", "length"), (2, 5), P("data", None)),
    (("batch", "length"), (6, 5), P("data", None)),
    (("batch", "length"), (3, 5), P(None, None)),
    # a mesh axis is never used twice in one spec
    (("embed", "embed"), (4, 4), P("fsdp", None)),
    (("batch", "embed"), (4, 32), P(("data", "fsdp"), None)),
    (("heads", "kv_heads"), (4, 2), P("tensor", None)),
    (("batch", "embed"), (2, 32), P("data", "fsdp")),  # fsdp dropped from batch, so embed may take it
    (("mlp", "vocab", "heads"), (48, 64, 4), P("tensor", None, None)),
])
def test_logical_to_spec(mesh222, names, shape, want):
  spec = parallel.logical_to_spec(names, shape, mesh222)
  assert spec == want
  used = [a for s in spec if s is not None for a in ((s,) if isinstance(s, str) else s)]
  assert len(used) == len(set(used))


def test_logical_to_spec_skips_size_one_axes_and_checks_rank():
  mesh = parallel.make_mesh(1, 8, 1)
  assert parallel.logical_to_spec(("batch", "length"), (8, 3), mesh) == P("fsdp", None)
  assert parallel.logical_to_spec(("embed", "mlp"), (16, 6), mesh) == P("fsdp", None)
  assert parallel.logical_to_spec(("batch",), (4,), mesh) == P(None)
  with pytest.raises(ValueError, match="do not match shape"):
    parallel.logical_to_spec(("batch",), (4, 2), mesh)


def test_constrain(mesh222):
  x = jnp.ones((4, 6, 8))
  assert parallel.constrain(x, ("batch", "length", "mlp"), None) is x
  y = jax.jit(lambda a: parallel.constrain(a * 2, ("batch", "length", "mlp"), mesh222))(x)
  assert y.sharding.is_equivalent_to(NamedSharding(mesh222, P(("data", "fsdp"), None, "tensor")), 3)


# ---------------------------------------------------------------------------------------------- sharded forward

CONFIGS = {
    # everything divides: heads, kv heads, mlp, vocab over tensor=2; embed over fsdp=2
    "divisible": ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48),
    # 9 heads and 3 kv heads (as SmolLM2) and an odd vocab do not split over tensor=2: replicated
    "odd_heads": ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=9, n_kv_heads=3, head_dim=8,
                             mlp_dim=40),
}


def left_padded(vocab, lengths, total, seed):
  rng = np.random.default_rng(seed)
  tokens = np.zeros((len(lengths), total), np.int32)
  mask = np.zeros((len(lengths), total), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, total - n:] = rng.integers(1, vocab, n)
    mask[i, total - n:] = 1
  return tokens, mask, np.array(tfm.positions_from_mask(jnp.asarray(mask)))


def specs_of(tree):
  return {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module", params=list(CONFIGS))
def sharded_setup(request, mesh222):
  """(name, cfg, sharded params, single-device params, (tokens, mask, positions), single-device logits)."""
  cfg = CONFIGS[request.param]
  params = tfm.init_params(cfg, jax.random.key(1), mesh222)
  single = jax.device_put(params, jax.devices()[0])
  batch = left_padded(cfg.vocab_size, [10, 7, 3, 10], 10, seed=2)
  tokens, mask, positions = batch
  ref = jax.jit(lambda p, t, pos, m: tfm.Transformer(cfg).apply({"params": p}, tfm.train_inputs(t, pos, m)).logits)(
      single, tokens, positions, mask)
  assert len(ref.sharding.device_set) == 1
  return request.param, cfg, params, single, batch, np.asarray(ref)


def test_init_params_are_sharded(sharded_setup, mesh222):
  name, cfg, params, *_ = sharded_setup
  shardings = tfm.param_shardings(cfg, mesh222)
  for (path, p), s in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(shardings)):
    assert p.sharding.is_equivalent_to(s, p.ndim), jax.tree_util.keystr(path)
  specs = specs_of(shardings)
  assert specs["['layers']['gate']"] == P(None, "fsdp", "tensor")
  assert specs["['layers']['down']"] == P(None, "tensor", "fsdp")
  assert specs["['layers']['attn_norm']"] == P(None, None)
  if name == "divisible":
    assert specs["['embed']"] == P("tensor", "fsdp")
    assert specs["['layers']['q']"] == P(None, "fsdp", "tensor", None)
    assert specs["['layers']['k']"] == P(None, "fsdp", "tensor", None)
    assert specs["['layers']['o']"] == P(None, "tensor", None, "fsdp")
  else:
    assert specs["['embed']"] == P(None, "fsdp")
    assert specs["['lm_head']"] == P("fsdp", None)
    assert specs["['layers']['q']"] == P(None, "fsdp", None, None)
    assert specs["['layers']['k']"] == P(None, "fsdp", None, None)
    assert specs["['layers']['o']"] == P(None, None, None, "fsdp")
  # a sharded parameter really is split: each device holds a fraction
  gate = params["layers"]["gate"]
  assert {s.data.shape for s in gate.addressable_shards} == {(cfg.n_layers, cfg.d_model // 2, cfg.mlp_dim // 2)}


def test_sharded_forward_equals_single_device(sharded_setup, mesh222):
  name, cfg, params, single, batch, ref = sharded_setup
  batch_sh = NamedSharding(mesh222, P(("data", "fsdp")))
  logits_sh = parallel.named_sharding(mesh222, ("batch", "length", "vocab"), ref.shape)
  fwd = jax.jit(lambda p, t, pos, m: tfm.Transformer(cfg, mesh=mesh222).apply({"params": p},
                                                                                tfm.train_inputs(t, pos, m)).logits,
                in_shardings=(tfm.param_shardings(cfg, mesh222), batch_sh, batch_sh, batch_sh),
                out_shardings=logits_sh)
  tokens, mask, positions = batch
  logits = fwd(params, tokens, positions, mask)
  assert logits.sharding.is_equivalent_to(logits_sh, 3) and len(logits.sharding.device_set) == 8
  real = mask.astype(bool)
  diff = np.abs(np.asarray(logits) - ref)[real].max()
  print(f"{name}: sharded (2,2,2) vs single device max |dlogit| = {diff:.2e}")
  assert diff <= 1e-5, diff


@pytest.mark.parametrize("layout", ["standard", "transposed"])
def test_sharded_kv_cache_decode(sharded_setup, mesh222, layout):
  """Prefill then one-token decode steps under the mesh, cache sharded by KVCache.logical, equal the full forward."""
  name, cfg, params, single, batch, ref = sharded_setup
  tokens, mask, positions = batch
  b, t = tokens.shape
  slots = 12
  kv_mask = np.zeros((b, slots), np.int32)
  kv_mask[:, :t] = mask
  cache_tree_sh = tfm.KVCache(*(parallel.named_sharding(mesh222, names, shape) for names, shape in
                                zip(tfm.KVCache.logical(layout), tfm.KVCache.shapes(cfg, b, slots, layout))))
  batch_sh = NamedSharding(mesh222, P(("data", "fsdp")))
  model = tfm.Transformer(cfg, mesh=mesh222, perf=tfm.Perf(kv_layout=layout))

  @functools.partial(jax.jit, in_shardings=(tfm.param_shardings(cfg, mesh222), batch_sh, batch_sh, batch_sh,
                                            cache_tree_sh, None),
                     out_shardings=(None, cache_tree_sh), donate_argnums=4)
  def step(p, tok, pos, m, cache, index):
    return tuple(model.apply({"params": p}, tfm.decode_inputs(tok, pos, m, index), cache=cache))

  cache = jax.device_put(tfm.KVCache.zeros(cfg, b, slots, layout), cache_tree_sh)
  prefix = 6
  logits, cache = step(params, tokens[:, :prefix], positions[:, :prefix], kv_mask, cache, jnp.int32(0))
  parts = [np.asarray(logits)]
  for i in range(prefix, t):
    logits, cache = step(params, tokens[:, i:i + 1], positions[:, i:i + 1], kv_mask, cache, jnp.int32(i))
    parts.append(np.asarray(logits))
  assert cache.k.sharding.is_equivalent_to(cache_tree_sh.k, 5)
  assert cache.v.sharding.is_equivalent_to(cache_tree_sh.v, 5)
  want_kv = "tensor" if cfg.n_kv_heads % 2 == 0 else None
  assert cache_tree_sh.k.spec == P(None, ("data", "fsdp"), want_kv, None, None)
  assert cache_tree_sh.v.spec == P(None, ("data", "fsdp"), want_kv, None, None)
  got = np.concatenate(parts, axis=1)
  real = mask.astype(bool)
  diff = np.abs(got - ref)[real].max()
  assert diff <= 1e-5, diff


# ---------------------------------------------------------------------------------------------- HF import on a mesh

def test_hf_import_places_params_in_their_shardings(tmp_path, mesh222):
  config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, intermediate_size=48,
                                    tie_word_embeddings=False)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
  cfg = hf.read_config(tmp_path)
  params = hf.load_params(tmp_path, cfg, mesh=mesh222)
  plain = hf.load_params(tmp_path, cfg)
  want = tfm.param_shardings(cfg, mesh222)
  n_sharded = 0
  for (path, p), s, q in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(want),
                             jax.tree.leaves(plain)):
    key = jax.tree_util.keystr(path)
    assert isinstance(p.sharding, NamedSharding) and p.sharding.mesh == mesh222, key
    assert p.sharding.spec == s.spec, (key, p.sharding.spec, s.spec)
    np.testing.assert_array_equal(np.asarray(p), np.asarray(q), err_msg=key)
    n_sharded += any(a is not None for a in s.spec)
  assert n_sharded >= 8
  assert params["lm_head"].sharding.spec == P("fsdp", None)  # vocab 97 does not split over tensor=2
  assert params["layers"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)
