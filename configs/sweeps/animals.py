"""Sweep: the study for each of the paper's animals × training seeds (docs/protocol.md §7: all five shift), optionally
× learning rate or LoRA rank (replications found both decisive for small models).

  launch/local.sh configs/sweeps/animals.py runs/animals                 # one run after another, here
  launch/local.sh configs/sweeps/animals.py:lr runs/animals_lr           # × lr in {1e-4, 2e-4, 5e-4}
  launch/gpu_slurm.sbatch configs/sweeps/animals.py:rank runs/animals_r  # × LoRA rank in {4, 8, 16}

The base run is `configs/owl_smollm2.py` (one GPU each); `arg` 'quick' uses `configs/quickstart.py` instead (CPU).
Each run trains one student and one control (`study.seeds=1`) with its own `train.seed` and `sample.seed`, so runs
are independent replicates: aggregate them by seed.
"""

import importlib.util
import pathlib

ANIMALS = ("owl", "dolphin", "eagle", "elephant", "wolf")  # docs/protocol.md §7, GPT-4.1 nano's main animals
SEEDS = (0, 1, 2)
EXTRA = {"lr": ("train.opt.lr", (1e-4, 2e-4, 5e-4)), "rank": ("train.lora.rank", (4, 8, 16))}


def _options(arg):
  opts = [a for a in (arg or "").split(",") if a]
  bad = [a for a in opts if a not in (*EXTRA, "quick")]
  if bad:
    raise ValueError(f"configs/sweeps/animals.py: unknown arg {bad}; expected any of {sorted(EXTRA)} and 'quick'")
  return opts


def get_config(arg=None):
  base = "quickstart.py" if "quick" in _options(arg) else "owl_smollm2.py"
  path = pathlib.Path(__file__).resolve().parents[1] / base
  spec = importlib.util.spec_from_file_location(f"_base_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(None)
  c.study.seeds = 1
  return c


def get_sweep(arg=None):
  runs = [{"teacher.target": a, "train.seed": s, "sample.seed": s} for a in ANIMALS for s in SEEDS]
  for opt in _options(arg):
    if opt in EXTRA:
      field, values = EXTRA[opt]
      runs = [dict(r, **{field: v}) for r in runs for v in values]
  return runs
