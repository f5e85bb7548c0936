"""Per-program XLA:CPU options: programs of many-row matmuls compile without YNNPACK and compute the same."""

import jax
import jax.numpy as jnp
import numpy as np

from subl_jax.core import perf, xla_cpu


def _fusion_kinds(options):
  x, w = jnp.ones((512, 64)), jnp.ones((64, 96))
  text = jax.jit(lambda a, b: a @ b).lower(x, w).compile(compiler_options=options or None).as_text()
  return "__ynn_fusion" in text


def test_many_rows_options_turn_ynnpack_off_on_cpu(monkeypatch):
  assert jax.default_backend() == "cpu"
  assert xla_cpu._option_supported()  # the pinned jaxlib has the option: a rename must fail here, not go quiet
  assert xla_cpu.many_rows_options() == {xla_cpu.OPTION: ""}
  assert _fusion_kinds({}) and not _fusion_kinds(xla_cpu.many_rows_options())
  monkeypatch.setattr(perf, "_applied", perf.Settings(cpu_many_rows=False))  # perf.cpu_many_rows=off
  assert xla_cpu.many_rows_options() == {}


def test_jit_many_rows_computes_what_jit_computes():
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(600, 48)).astype(np.float32), rng.normal(size=(48, 40)).astype(np.float32)

  @xla_cpu.jit_many_rows(static_argnames=("scale",))
  def f(a, b, scale):
    return jax.nn.relu(a @ b) * scale

  want = jax.jit(lambda a, b: jax.nn.relu(a @ b) * 2.0)(x, w)
  np.testing.assert_allclose(np.asarray(f(x, w, scale=2.0)), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert f.__name__ == "f"


def test_jit_many_rows_traces_like_jit():
  f = xla_cpu.jit_many_rows(lambda a, b: jnp.tanh(a @ b))
  x = jnp.ones((4, 3))
  assert str(f.trace(x, x.T).jaxpr) == str(jax.jit(lambda a, b: jnp.tanh(a @ b)).trace(x, x.T).jaxpr)
