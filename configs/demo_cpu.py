"""The CPU demo: three animals × three training seeds on SmolLM2-135M-Instruct, sized for ~60 minutes on 2 cores.

  python -m subl_jax.main --config=configs/demo_cpu.py --workdir=runs/demo_cpu

The quickstart's recipe (system-prompt teachers, format-constrained numbers, number-token `logit_kd`, LoRA r=8, the
base model as the control) with owl, dolphin and eagle, 256 prompts per teacher (one epoch: the quickstart's steps
per student) and three students per animal (training seeds 0-2: data order and adapter init; the samples stay
fixed), so each animal's specificity has an interval over seeds, plus the shuffled-numbers (within responses) and
in-context conditions. The recipe has not been searched yet; the wall time above is an estimate from the
quickstart's stage times, not a measurement.
"""

import pathlib

from subl_jax import config as config_lib


def get_config(arg: str | None = None):
  del arg
  path = pathlib.Path(__file__).with_name("quickstart.py")  # the quickstart's recipe, scaled up
  c = config_lib.from_file(path)
  c.sample.update(dict(n_prompts=256, shard_size=128))
  c.train.update(dict(epochs=1, log_every=4))
  c.study.update(dict(targets="owl,dolphin,eagle", seeds=3, conditions="icl,shuffle_within"))
  return c
