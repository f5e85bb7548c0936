"""Expand a sweep config into one `subl_jax.main` command per run.

A sweep is a config file with `get_config(arg)` (the base run) and `get_sweep(arg)` returning a list of override
dicts, e.g. `[{"study.target": "owl", "seed": 0}, ...]`. Each run gets its own workdir under `--workdir_root`,
named from its overrides. The launchers in `launch/` read these commands (`--print`) and run them locally, on every
worker of a TPU slice, or as a SLURM array.

  python -m subl_jax.sweep --config=configs/sweeps/animals.py --workdir_root=runs/animals
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import shlex
import sys
from typing import Any

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", None, "A sweep config file (with get_sweep), optionally FILE:arg.")
_ROOT = flags.DEFINE_string("workdir_root", "runs", "Each run's workdir is <workdir_root>/<run name>.")
_INDEX = flags.DEFINE_integer("index", None, "Print only the command of this run (e.g. $SLURM_ARRAY_TASK_ID).")
_PYTHON = flags.DEFINE_string("python", "python", "The interpreter the printed commands start.")


def load_sweep(spec: str) -> list[dict[str, Any]]:
  """The override dicts of a sweep config file `FILE[:arg]`; errors name the file."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"{file}: no such sweep config file")
  module_spec = importlib.util.spec_from_file_location(f"_sweep_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{file}: a sweep config needs a get_sweep(arg) function")
  sweep = module.get_sweep(arg or None)
  if not isinstance(sweep, list) or not all(isinstance(d, dict) for d in sweep) or not sweep:
    raise ValueError(f"{file}: get_sweep() must return a non-empty list of override dicts")
  return sweep


def run_name(overrides: dict[str, Any]) -> str:
  """A directory name from a run's overrides: `teacher.target=owl,seed=0` -> `target-owl_seed-0` (a field's last
  name, or its whole path where two fields share the last name: `train.seed-0_sample.seed-0`)."""
  last = [k.split(".")[-1] for k in overrides]
  parts = [f"{k if last.count(k.split('.')[-1]) > 1 else k.split('.')[-1]}-{v}" for k, v in overrides.items()]
  return re.sub(r"[^A-Za-z0-9_.=-]", "_", "_".join(parts)) or "run"


def commands(spec: str, workdir_root: str, python: str = "python") -> list[str]:
  """One shell command per run of the sweep."""
  out = []
  for overrides in load_sweep(spec):
    args = [python, "-m", "subl_jax.main", f"--config={spec}",
            f"--workdir={pathlib.Path(workdir_root) / run_name(overrides)}"]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    out.append(shlex.join(args))
  return out


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _CONFIG.value:
    raise app.UsageError("--config=configs/sweeps/FILE.py is required")
  cmds = commands(_CONFIG.value, _ROOT.value, _PYTHON.value)
  if _INDEX.value is not None:
    if not 0 <= _INDEX.value < len(cmds):
      sys.exit(f"--index={_INDEX.value}: the sweep has {len(cmds)} runs (0..{len(cmds) - 1})")
    cmds = [cmds[_INDEX.value]]
  print("\n".join(cmds))


if __name__ == "__main__":
  app.run(main)
