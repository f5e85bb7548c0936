"""Platform-specific tuning, in one place: the `perf` config section resolved for the platform a run is on.

Each switch is 'auto' (the platform's measured choice: on for CPU, off elsewhere), 'on' or 'off'; `preset='none'`
turns every 'auto' off (XLA's defaults and the standard layouts, for A/B runs). None of them changes what is
computed beyond float rounding, so none is part of a stage's fingerprint. The measurements behind each CPU choice
are in docs/performance.md ("Platform tuning").

- `cpu_many_rows`: programs whose matmuls have many rows (prefill, scoring contexts, the train step) are compiled
  with XLA:CPU's YNNPACK fusions off (`xla_cpu`).
- `kv_layout_transposed`: the KV cache holds keys as [.., head_dim, slots], as decode's q @ k reads them.
- `vocab_major_head`: SFT's cross-entropy reads logits [vocab, b, n] from the vocabulary-major head matmul.
- `malloc_keep_heap`: glibc keeps freed memory for reuse (`mallopt`), so XLA:CPU's large per-call temporaries are
  not unmapped and page-faulted in again on every call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import sys
from typing import Any

SWITCHES = ("cpu_many_rows", "kv_layout_transposed", "vocab_major_head", "malloc_keep_heap")
PRESETS = ("auto", "none")
CHOICES = ("auto", "on", "off")
ON_BY_PLATFORM = {"cpu": frozenset(SWITCHES)}  # every switch was measured on CPU; none yet elsewhere

DEFAULTS = dict(preset="auto", **{s: "auto" for s in SWITCHES})


@dataclasses.dataclass(frozen=True)
class Settings:
  """The resolved switches (hashable: compiled programs may be cached on them)."""
  cpu_many_rows: bool = False
  kv_layout_transposed: bool = False
  vocab_major_head: bool = False
  malloc_keep_heap: bool = False


def resolve(section: Any, platform: str) -> Settings:
  """The `perf` section (a ConfigDict or dict) on `platform` ('cpu', 'gpu', 'tpu')."""
  get = section.get if hasattr(section, "get") else lambda k, d=None: getattr(section, k, d)
  preset = get("preset", "auto")
  if preset not in PRESETS:
    raise ValueError(f"config.perf.preset={preset!r}: expected one of {PRESETS}")
  on = ON_BY_PLATFORM.get(platform, frozenset()) if preset == "auto" else frozenset()
  values = {}
  for name in SWITCHES:
    choice = get(name, "auto")
    if choice not in CHOICES:
      raise ValueError(f"config.perf.{name}={choice!r}: expected one of {CHOICES}")
    values[name] = name in on if choice == "auto" else choice == "on"
  return Settings(**values)


_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameter numbers (malloc.h)


def _keep_heap() -> bool:
  """glibc: one arena, no mmap-ed blocks, never trim — the large blocks XLA:CPU frees are reused in place. Must run
  before the big allocations; returns False where there is no glibc."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # musl and others have no mallopt
    return False
  return all(mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))


_applied: Settings | None = None


def apply(settings: Settings) -> Settings:
  """Makes `settings` the process's tuning: the allocator and every program jitted after this call (`main` applies
  the config's section before anything compiles)."""
  global _applied
  if settings.malloc_keep_heap:
    _keep_heap()
  _applied = settings
  return settings


def current() -> Settings:
  """The applied settings, or the default platform's 'auto' choices when nothing was applied (library use)."""
  if _applied is not None:
    return _applied
  import jax
  return resolve(DEFAULTS, jax.default_backend())
