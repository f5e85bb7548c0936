"""The GEMM floor of a JAX program: how long its matrix multiplies take with this backend's kernels, each alone.

Every `dot_general` in the program's jaxpr (inside `scan` bodies counted `length` times, inside `while` bodies once
per iteration, reported apart) is compiled on its own — same operand shapes, dtypes, dimension numbers and compiler
options as the program — and timed; the floor is Σ count × median seconds. `useful FLOPs / floor / peak` is then
the MFU the program would reach if nothing but its matmuls took time: what the kernels allow, against what the
program around them costs.
An estimate, not a bound: inside the program XLA may lay operands out for a dot, and a small dot pays no dispatch.
For the SmolLM2 train step (dots of 2-20 ms) the step's dots alone ran at the rate of the matmul chain measured
around them; for a sampler's decode loop (hundreds of sub-millisecond dots, batched attention over the cache) the
sum came out above the loop's measured time at batch 128, so `benchmarks/sampling.py` does not use it.

  once, per_iteration = count_dots(jax.jit(fn).trace(*args).jaxpr)
  seconds, rows = floor(once, compiler_options)
"""

from __future__ import annotations

import collections
import time
from typing import Any

import jax
from jax.extend import core as jcore
import numpy as np
from jax import lax

# (lhs shape, rhs shape, lhs dtype, rhs dtype, dimension_numbers, preferred_element_type)
DotKey = tuple


def _sub_jaxprs(value: Any):
  if isinstance(value, jcore.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jcore.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def count_dots(jaxpr: Any) -> tuple[collections.Counter, collections.Counter]:
  """(dots run once per call, dots run once per iteration of a `while` loop), each as {DotKey: count}.

  `jaxpr`: a ClosedJaxpr or Jaxpr (`jax.make_jaxpr(fn)(*args)`). A `scan` multiplies its body's counts by its length;
  a `cond`'s branches are all counted (an over-estimate; none of this project's hot programs branches around a
  matmul). A `while` inside a `while` is refused: its trip count is unknown."""
  once, per_iter = collections.Counter(), collections.Counter()

  def walk(jx, mult: int, target: collections.Counter, in_while: bool) -> None:
    for eqn in jx.eqns:
      name = eqn.primitive.name
      if name == "dot_general":
        lhs, rhs = (v.aval for v in eqn.invars)
        pet = eqn.params.get("preferred_element_type")
        target[(lhs.shape, rhs.shape, str(lhs.dtype), str(rhs.dtype), eqn.params["dimension_numbers"],
                None if pet is None else str(np.dtype(pet)))] += mult
        continue
      if name == "while":
        if in_while:
          raise ValueError("gemm_floor: a while loop inside a while loop has no countable trip count")
        for sub in _sub_jaxprs(eqn.params["body_jaxpr"]):
          walk(sub, 1, per_iter, True)
        continue
      inner = mult * int(eqn.params["length"]) if name == "scan" else mult
      for value in eqn.params.values():
        for sub in _sub_jaxprs(value):
          walk(sub, inner, target, in_while)

  walk(jaxpr.jaxpr if isinstance(jaxpr, jcore.ClosedJaxpr) else jaxpr, 1, once, False)
  return once, per_iter


def dot_flops(key: DotKey) -> float:
  lhs, rhs, _, _, ((lc, rc), (lb, rb)), _ = key
  lhs_free = [d for i, d in enumerate(lhs) if i not in lc and i not in lb]
  rhs_free = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
  return 2.0 * float(np.prod([lhs[i] for i in lb + lc]) * np.prod(lhs_free) * np.prod(rhs_free))


def time_dot(key: DotKey, compiler_options: dict | None, seconds: float = 0.3, rounds: int = 3) -> float:
  """Median seconds of one call of this dot, compiled alone with `compiler_options` (a call's dispatch, ~10-50 us,
  included: small next to the train step's dots, not next to a decode step's)."""
  lhs, rhs, ldt, rdt, dn, pet = key
  rng = np.random.default_rng(0)
  a = jax.device_put(rng.normal(size=lhs).astype(ldt))
  b = jax.device_put(rng.normal(size=rhs).astype(rdt))
  fn = jax.jit(lambda x, y: lax.dot_general(x, y, dn, preferred_element_type=pet)).lower(a, b).compile(
      compiler_options=compiler_options or None)
  fn(a, b).block_until_ready()
  t0 = time.perf_counter()
  fn(a, b).block_until_ready()
  reps = max(1, int(seconds / rounds / max(time.perf_counter() - t0, 1e-6)))
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(reps):
      fn(a, b).block_until_ready()
    times.append((time.perf_counter() - t0) / reps)
  return float(np.median(times))


def floor(counts: collections.Counter, compiler_options: dict | None = None,
          cache: dict | None = None) -> tuple[float, list[dict]]:
  """(Σ count × seconds, one row per distinct dot: shapes, count, seconds, GFLOP/s), costliest first.
  `cache` (DotKey -> seconds) lets several programs with common dots time each once."""
  cache = {} if cache is None else cache
  rows, total = [], 0.0
  for key, count in counts.items():
    if key not in cache:
      cache[key] = time_dot(key, compiler_options)
    s = cache[key]
    total += count * s
    rows.append(dict(lhs=list(key[0]), rhs=list(key[1]), dimension_numbers=str(key[4]), count=count,
                     seconds=s, gflop_per_s=dot_flops(key) / s / 1e9))
  rows.sort(key=lambda r: -r["count"] * r["seconds"])
  return total, rows
