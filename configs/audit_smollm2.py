"""The transfer audit on the quickstart's LLM study (issue #20): SmolLM2-135M-Instruct, owl and dolphin system-prompt
teachers, LoRA students distilled by number-token KD (`configs/quickstart.py`).

  python -m subl_jax.main --config=configs/audit_smollm2.py --workdir=runs/quickstart

Before any student trains, for each teacher: the predicted Δ log P(answer) of the seed-0 student's first steps
(first-order Adam and SGD through its fresh adapters, on the first `audit.n_batches` batches, against the trait
probe over the first `audit.probe_questions` evaluation questions) for every evaluated animal, and the data-only
KL(teacher ‖ base) over the teacher's numbers. Run in the quickstart's workdir after its study (same config, so the
stages are shared), `audit.md` calibrates the predictions against the realised transfer matrix and specificity, and
gives the audit's cost against the students' training; in a fresh workdir it runs the teachers, sampling and filter
(about 5 minutes on 2 CPU cores) and reports the predictions alone. 2 teachers × 5 answers = 10 cells, 2 targets:
enough to see whether the cells rank, too few to calibrate specificity.
"""

import importlib.util
import pathlib


def get_config(arg: str | None = None):
  del arg
  spec = importlib.util.spec_from_file_location("quickstart", pathlib.Path(__file__).with_name("quickstart.py"))
  quickstart = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(quickstart)
  c = quickstart.get_config()
  c.job = "audit"
  c.audit.update(dict(study="llm", n_batches=8, probe_questions=10))
  return c
