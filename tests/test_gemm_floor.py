"""The benchmarks' GEMM floor counts every matmul a program runs: scan bodies times their length, while bodies per
iteration, dimension numbers and FLOPs as XLA sees them."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest
from jax import lax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import gemm_floor  # noqa: E402


def _program(x, ws, v):
  def layer(h, w):
    return jnp.tanh(h @ w) @ w.T, None  # two dots per layer

  h, _ = lax.scan(layer, x, ws)

  def body(c):
    i, u = c
    return i + 1, jnp.einsum("bk,bkn->bn", u, jnp.ones((2, 3, 3)))  # a batched dot per iteration

  _, u = lax.while_loop(lambda c: c[0] < 7, body, (0, v))
  return h.sum() + u.sum()


def test_count_dots_multiplies_scans_and_separates_while_bodies():
  x, ws, v = jnp.ones((8, 4)), jnp.ones((5, 4, 6)), jnp.ones((2, 3))
  once, per_iteration = gemm_floor.count_dots(jax.make_jaxpr(_program)(x, ws, v))
  assert sum(once.values()) == 10 and len(once) == 2  # 5 layers x 2 dots
  assert sorted(k[:2] for k in once) == [((8, 4), (4, 6)), ((8, 6), (6, 4))]
  assert sum(per_iteration.values()) == 1
  (key,) = per_iteration
  assert gemm_floor.dot_flops(key) == 2 * 2 * 3 * 3  # batch 2, [1 x 3] @ [3 x 3]
  for key in once:
    assert gemm_floor.dot_flops(key) == 2 * 8 * 4 * 6


def test_floor_sums_count_times_seconds():
  once, _ = gemm_floor.count_dots(jax.make_jaxpr(_program)(jnp.ones((8, 4)), jnp.ones((5, 4, 6)), jnp.ones((2, 3))))
  cache = {}
  seconds, rows = gemm_floor.floor(once, None, cache)
  assert set(cache) == set(once) and all(s > 0 for s in cache.values())
  assert seconds == pytest.approx(sum(n * cache[k] for k, n in once.items()))
  assert sum(r["count"] for r in rows) == 10


def test_nested_while_is_refused():
  def f(x):
    inner = lambda y: lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] @ c[1]), (0, y))[1]
    return lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, inner(c[1])), (0, x))[1]

  with pytest.raises(ValueError, match="while loop inside a while loop"):
    gemm_floor.count_dots(jax.make_jaxpr(f)(jnp.ones((3, 3))))
