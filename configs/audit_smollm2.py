"""The transfer audit on the CPU demo's LLM study (issue #20): SmolLM2-135M-Instruct, three animal teachers, LoRA
students of three seeds each, 1 epoch (`configs/demo_cpu.py:1ep`, where it was measured).

  python -m subl_jax.main --config=configs/audit_smollm2.py --workdir=runs/demo_cpu_1ep   # after that demo: reuses it

Before any student trains, for each teacher: the predicted Δ log P(answer) of the seed-0 student's first steps
(first-order Adam and SGD through its fresh adapters, on its first `audit.n_batches` batches, against the trait probe
over the first `audit.probe_questions` evaluation questions) for every evaluated animal; the data-only
KL(teacher ‖ base) on `audit.data_rows` of the teacher's numbers; the teacher's activation shift (its norm, and how
distinct it is from the other teachers'). Run in the demo's workdir after its study (same config, so the stages are
shared), `audit.md` calibrates each signal against the realised transfer matrix (3 teachers × 5 answers = 15 cells)
and the 3 targets' specificity, and gives the audit's cost against the students' training, also in training steps;
in a fresh workdir it runs the teachers, sampling and filter and reports the predictions alone.
"""

import pathlib

from subl_jax import config as config_lib


def get_config(arg: str | None = None):
  del arg
  c = config_lib.from_file(pathlib.Path(__file__).with_name("demo_cpu.py"), "1ep")
  c.job = "audit"
  c.audit.update(dict(study="llm", n_batches=4))
  return c
