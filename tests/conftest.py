"""Shared fixtures. Tests run on CPU; sharding tests set 8 fake host devices before jax initialises.

`make test` runs them in two processes (pytest-xdist) sharing one persistent compilation cache: many tests compile the
same small programs (timings: docs/performance.md, "The test suite")."""

import os
import pathlib

# XLA:CPU's backend optimisation off: the tests' tiny programs spend their time compiling, not running, and compile
# about twice as fast without LLVM's optimisation passes (docs/performance.md, "The test suite"). What they check holds
# at any optimisation level: equalities are between programs compiled alike, parity has its stated tolerances. Jobs a
# test starts as subprocesses get the same flag.
FAST_COMPILE = "--xla_backend_optimization_level=0"
# 8 fake CPU devices for the sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")


def job_env(**extra: str) -> dict:
  """The environment of a job a test starts as a subprocess: CPU, the test flags without the 8 fake devices, nothing
  else of the test process's (`extra` added)."""
  return {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "HOME": str(pathlib.Path.home()), "XLA_FLAGS": FAST_COMPILE,
          **extra}
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")  # the many sub-second compiles stay out

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf():
  """Path of the real SmolLM2-135M-Instruct GGUF (fetched once into the cache)."""
  from subl_jax.core.checkpoints import fetch
  return fetch.smollm2_gguf_path()
