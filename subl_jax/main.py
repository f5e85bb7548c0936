"""Entry point: `python -m subl_jax.main --config=configs/X.py[:arg] --workdir=DIR [--config.field=value ...]`.

Exit status, for schedulers and launchers:
  0   the job finished.
  75  (EX_TEMPFAIL, `EXIT_INTERRUPTED`) training stopped on SIGTERM/SIGINT after saving a checkpoint; one line on
      stderr says what stopped and where the checkpoint is. Re-running the same command resumes from it. A second
      signal while that checkpoint is being saved kills the process instead (SIGTERM: -15 / 143).
  2   (`EXIT_WORKDIR_BUSY`) another run holds the workdir (`<workdir>/.lock`, see `subl_jax.workdir_lock`); the
      message names its pid and command, and nothing in the workdir was touched.
  1   anything else: a bad flag or config field (one message), a crash (with its traceback).

One run per workdir: process 0 holds an exclusive lock on `<workdir>/.lock` from before the first write until it
exits (with several JAX processes sharing a workdir, the others rely on process 0's).

Compiled XLA programs are kept in a persistent cache, `<cache>/jax_compilation_cache/` (`<cache>`: $SUBL_JAX_CACHE,
default ~/.cache/subl_jax), so a re-run, a resume or the next job of a sweep skips recompiling what it has compiled
before. Off with `--compile_cache=false` or SUBL_JAX_COMPILE_CACHE=0; JAX's own variables
(JAX_COMPILATION_CACHE_DIR, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, ...) take precedence where set.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from subl_jax import config as config_lib
from subl_jax import jobs
from subl_jax import workdir_lock
from subl_jax.core import parallel, perf
from subl_jax.core.checkpoints import fetch
from subl_jax.core.training import checkpoint

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: resolved config and every artifact go here.")
_STAGE = flags.DEFINE_string("stage", "", "Job 'study': run the stages up to this one and stop (teacher, sample, "
                             "filter, student, evaluate, report); '' runs them all.")
_COMPILE_CACHE = flags.DEFINE_bool(
    "compile_cache", True, "Keep compiled programs in <cache>/jax_compilation_cache ($SUBL_JAX_CACHE, default "
    "~/.cache/subl_jax) for later runs; also off with SUBL_JAX_COMPILE_CACHE=0.")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_INTERRUPTED = 75   # EX_TEMPFAIL (sysexits.h): stopped on a signal, checkpoint saved; re-run to resume
EXIT_WORKDIR_BUSY = 2   # another run holds the workdir's lock

COMPILE_CACHE_ENV = "SUBL_JAX_COMPILE_CACHE"
COMPILE_CACHE_DIR = "jax_compilation_cache"
# Only programs that take a while to compile are worth a file: the train step, prefill and decode take 10-60 s on a
# CPU, while the many small helper programs compile in milliseconds and would only fill the directory. Entry size:
# 0 lets JAX pick a minimum suited to the cache's file system.
_COMPILE_CACHE_SETTINGS = (("jax_persistent_cache_min_compile_time_secs", 1.0),
                           ("jax_persistent_cache_min_entry_size_bytes", 0))
_FALSE, _TRUE = ("0", "false", "no", "off"), ("", "1", "true", "yes", "on")


def configure_compile_cache(enabled: bool) -> pathlib.Path | None:
  """Turns JAX's persistent compilation cache on (under our cache dir) or off; returns its directory or None.

  Must run before the first compilation: JAX decides once per process whether it uses the cache."""
  env = os.environ.get(COMPILE_CACHE_ENV, "").strip().lower()
  if env not in _FALSE + _TRUE:
    raise app.UsageError(f"{COMPILE_CACHE_ENV}={os.environ[COMPILE_CACHE_ENV]!r}: expected 0 or 1 (or false/true)")
  if not enabled or env in _FALSE:
    # Also off when JAX_COMPILATION_CACHE_DIR set a directory of its own: "off" means nothing is written.
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  path = pathlib.Path(os.environ.get("JAX_COMPILATION_CACHE_DIR") or fetch.cache_dir() / COMPILE_CACHE_DIR)
  jax.config.update("jax_compilation_cache_dir", str(path))
  for name, value in _COMPILE_CACHE_SETTINGS:
    if name.upper() in os.environ:  # set by the user for this run
      continue
    try:
      jax.config.update(name, value)
    except AttributeError:  # a JAX that renamed or dropped the option (these names: jax 0.4.26 through 0.10 at least)
      pass
  return path


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every read and write at INFO
  configure_compile_cache(_COMPILE_CACHE.value)  # before anything compiles
  cfg = _CONFIG.value
  parallel.maybe_initialize_distributed(cfg.mesh.distributed)
  config_lib.validate(cfg)
  perf.apply(perf.resolve(cfg.perf, jax.default_backend()))  # before the first big allocation and compilation
  workdir = pathlib.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  with contextlib.ExitStack() as held:
    try:
      # Process 0 speaks for every process of a multi-host run (they share the workdir and start together).
      held.enter_context(workdir_lock.hold(workdir, enabled=jax.process_index() == 0))
    except workdir_lock.WorkdirBusy as e:
      print(f"subl_jax.main: {e}", file=sys.stderr)
      sys.exit(EXIT_WORKDIR_BUSY)
    try:
      jobs.run(cfg, workdir, stage=_STAGE.value)
    except checkpoint.Interrupted as e:
      # A scheduler's stop, not a crash: one line, no traceback, an exit status of its own.
      notes = "".join(f"; {n}" for n in getattr(e, "__notes__", ()))
      print(f"subl_jax.main: job {cfg.job!r} in {workdir} {e}{notes}; re-run the same command to resume",
            file=sys.stderr)
      sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
  app.run(main)
