"""Mitigations on the SmolLM2 CPU demo (issue #21): `configs/demo_cpu.py:1ep` (1 epoch, where they were measured)
plus a mitigated student of every teacher and seed for each of projection off the trait gradient (of the gradient,
one-sided; of the update, two-sided), divergence-token masking, a KL-to-base penalty and the numbers shuffled within
or across responses, each reported beside the plain students. Measured rows and their commands: docs/mitigations.md
(a subset at a time: `--config.study.mitigations=...`; ~1 h per mitigation on 2 cores).

  python -m subl_jax.main --config=configs/mitigate_smollm2.py --workdir=runs/demo_cpu_1ep  # after it: reuses it

Run in the demo's workdir every stage the demo ran is reused (same fields); the mitigated students, the held-out
numbers of each teacher and the quality stages are what is new. The report's mitigation table: per mitigation, the
transfer removed (1 − its mean specificity over the plain students', bootstrap 95 % CI over seeds and questions;
"n/a" when the plain students' specificity is not significant: there is nothing to remove) and the quality kept (the
share of the plain students' drop in held-out number-token KL to the teacher, CI over seeds), and each model's keep
rate of its own unconstrained numbers.
"""

import pathlib

from subl_jax import config as config_lib


def get_config(arg: str | None = None):
  del arg
  c = config_lib.from_file(pathlib.Path(__file__).with_name("demo_cpu.py"), "1ep")
  c.study.mitigations = "project,project_update,mask,kl_base,shuffle_within,shuffle_across"
  return c
