"""Shared fixtures. Tests run on CPU; sharding tests set 8 fake host devices before jax initialises."""

import os

# 8 fake CPU devices for the sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf():
  """Path of the real SmolLM2-135M-Instruct GGUF (fetched once into the cache)."""
  from subl_jax.core.checkpoints import fetch
  return fetch.smollm2_gguf_path()
