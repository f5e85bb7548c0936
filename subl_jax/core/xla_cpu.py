"""Which matmul library XLA:CPU uses, per jitted program.

jaxlib's XLA:CPU hands matmuls to YNNPACK by default. On this project's 2-core CPU (Sapphire Rapids, float32,
SmolLM2's projection shapes; `benchmarks/cpu_matmul.py`) YNNPACK is the faster one for matmuls with few rows — a
decode step's 64 rows: 115 GFLOP/s (geometric mean over the shapes) against 66 for XLA's own Eigen kernels — and the
slower one from about 512 rows on — a prefill's 6,144 rows: 136 against 173. Programs whose matmuls have many rows
(sampling prefill, scoring contexts, the train step: batch × length rows) are therefore compiled with YNNPACK's
fusions off; decoding keeps the default. For the train step (SmolLM2, batch 16 × 152 tokens) the gain is small: 2-7 %
in three interleaved A/Bs in one process (the same step compiled both ways, run alternately; the CPU's noise is of the
same order), and none in an earlier one. jaxlib also carries oneDNN (`xla_cpu_experimental_onednn_fusion_type=
LIBRARY_FUSION_TYPE_DOT`, or `xla_cpu_use_onednn`): with it on top of YNNPACK off the train step took 6 % ± 2 %
longer (8 alternating rounds, same gradients), so it stays off.
Off CPU, or on a jaxlib without the option, nothing changes.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax

OPTION = "xla_cpu_experimental_ynn_fusion_type"
# SUBL_JAX_CPU_MATMUL=default compiles every program with XLA's defaults (for A/B measurements).
ENV = "SUBL_JAX_CPU_MATMUL"


@functools.cache
def _option_supported() -> bool:
  try:
    jax.jit(lambda x: x + 1).lower(1.0).compile(compiler_options={OPTION: ""})
    return True
  except Exception:  # an XLA without this option rejects it by name
    return False


def many_rows_options() -> dict[str, Any]:
  """Compiler options for a program of many-row matmuls: YNNPACK off on CPU; {} elsewhere."""
  if os.environ.get(ENV, "") == "default" or jax.default_backend() != "cpu" or not _option_supported():
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
