"""Which matmul library XLA:CPU uses, per jitted program (the `perf.cpu_many_rows` switch, see `perf`).

jaxlib's XLA:CPU hands matmuls to YNNPACK by default, which is the faster library for matmuls with few rows (a
decode step) and the slower one from about 512 rows on (docs/performance.md, "Platform tuning"). Programs whose
matmuls have many rows — sampling prefill, scoring contexts, the train step — are compiled with YNNPACK's fusions
off when the switch is on; decoding keeps the default. Off CPU, or on a jaxlib without the option, nothing changes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

from subl_jax.core import perf

OPTION = "xla_cpu_experimental_ynn_fusion_type"


@functools.cache
def _option_supported() -> bool:
  try:
    jax.jit(lambda x: x + 1).lower(1.0).compile(compiler_options={OPTION: ""})
    return True
  except Exception:  # an XLA without this option rejects it by name
    return False


def many_rows_options() -> dict[str, Any]:
  """Compiler options for a program of many-row matmuls: YNNPACK off on CPU when `perf.cpu_many_rows` is on."""
  if not perf.current().cpu_many_rows or jax.default_backend() != "cpu" or not _option_supported():
    return {}
  return {OPTION: ""}


def jit_many_rows(fun: Callable | None = None, **jit_kwargs) -> Callable:
  """`jax.jit(fun, **jit_kwargs)` compiled with `many_rows_options()`; the backend is looked at on the first call,
  not at import. Usable as a decorator, with or without keyword arguments. `.trace(*args)` is the jitted function's
  (`jax.make_jaxpr` refuses a jit with compiler options)."""
  if fun is None:
    return functools.partial(jit_many_rows, **jit_kwargs)
  jitted = None

  def get():
    nonlocal jitted
    if jitted is None:
      jitted = jax.jit(fun, compiler_options=many_rows_options() or None, **jit_kwargs)
    return jitted

  @functools.wraps(fun)
  def call(*args, **kwargs):
    return get()(*args, **kwargs)

  call.trace = lambda *args, **kwargs: get().trace(*args, **kwargs)
  return call
