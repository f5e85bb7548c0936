"""Sweep: the multi-animal study (every animal and seed inside each run, so specificity is measured in every run)
× learning rate or LoRA rank (replications found both decisive for small models, docs/protocol.md §5, §11).

  launch/local.sh configs/sweeps/animals.py:lr runs/animals_lr           # × lr in {1e-4, 2e-4, 5e-4}
  launch/gpu_slurm.sbatch configs/sweeps/animals.py:rank runs/animals_r  # × LoRA rank in {4, 8, 16}
  launch/local.sh configs/sweeps/animals.py:lr,rank,quick runs/a         # the grid on the quickstart's study (CPU)

The base run is `configs/animals_smollm2.py` (one GPU each); `arg` 'quick' uses `configs/quickstart.py` instead.
"""

import pathlib

from subl_jax import config as config_lib

EXTRA = {"lr": ("train.opt.lr", (1e-4, 2e-4, 5e-4)), "rank": ("train.lora.rank", (4, 8, 16))}


def _options(arg):
  opts = [a for a in (arg or "").split(",") if a]
  bad = [a for a in opts if a not in (*EXTRA, "quick")]
  if bad:
    raise ValueError(f"configs/sweeps/animals.py: unknown arg {bad}; expected any of {sorted(EXTRA)} and 'quick'")
  return opts


def get_config(arg=None):
  base = "quickstart.py" if "quick" in _options(arg) else "animals_smollm2.py"
  path = pathlib.Path(__file__).resolve().parents[1] / base
  return config_lib.from_file(path)


def get_sweep(arg=None):
  runs = [{}]
  for opt in _options(arg):
    if opt in EXTRA:
      field, values = EXTRA[opt]
      runs = [dict(r, **{field: v}) for r in runs for v in values]
  return runs
