"""The `perf` section: per-platform defaults, overrides, errors naming the field, and glibc's allocator settings."""

import subprocess
import sys

import pytest

from subl_jax import config as config_lib
from subl_jax.core import perf


def test_auto_turns_every_switch_on_for_cpu_and_off_elsewhere():
  section = config_lib.defaults().perf
  assert perf.resolve(section, "cpu") == perf.Settings(True, True, True, True)
  assert perf.resolve(section, "gpu") == perf.Settings() == perf.resolve(section, "tpu")


def test_preset_none_and_single_switches():
  assert perf.resolve(dict(preset="none"), "cpu") == perf.Settings()
  assert perf.resolve(dict(preset="none", kv_layout_transposed="on"), "gpu") == perf.Settings(kv_layout_transposed=True)
  assert perf.resolve(dict(vocab_major_head="off"), "cpu") == perf.Settings(True, True, False, True)


@pytest.mark.parametrize("field,value", [("preset", "fast"), ("malloc_keep_heap", "yes")])
def test_a_bad_choice_names_the_field(field, value):
  cfg = config_lib.defaults()
  cfg.perf[field] = value
  with pytest.raises(ValueError, match=rf"config\.perf\.{field}='{value}': expected one of"):
    config_lib.validate(cfg)


def test_keep_heap_takes_large_blocks_from_the_heap_not_mmap():
  """After `apply`, freeing and re-allocating a 64 MiB block faults no new pages in (glibc serves it from the
  kept heap); without it every allocation of that size is a fresh mmap."""
  probe = """
import ctypes, resource, sys
from subl_jax.core import perf
if sys.argv[1] == "on":
  perf.apply(perf.Settings(malloc_keep_heap=True))
libc = ctypes.CDLL("libc.so.6"); libc.malloc.restype = ctypes.c_void_p
def touch():
  p = libc.malloc(64 << 20); ctypes.memset(p, 1, 64 << 20); libc.free(ctypes.c_void_p(p))
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5): touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
  faults = {mode: int(subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True,
                                     check=True).stdout) for mode in ("on", "off")}
  assert faults["off"] > 5 * 16000  # 5 × 64 MiB of 4 KiB pages faulted in again
  assert faults["on"] < 1000, faults
