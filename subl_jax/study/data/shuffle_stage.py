"""The `shuffle` stage: a teacher's filtered rows with their numbers shuffled (docs/protocol.md §10), written in the
student's training format — the study's shuffled-numbers conditions and the shuffling mitigation read it."""

from __future__ import annotations

import json

from subl_jax.study import stages
from subl_jax.study.data import shuffle

SHUFFLED = "shuffled.jsonl"
MODES = {"within": shuffle.shuffle_within, "across": shuffle.shuffle_across}


def work(job: stages.Job) -> dict:
  """Shuffles the rows of `job.inputs["data"]` (`job.params`: mode 'within' | 'across', seed) into `shuffled.jsonl`."""
  mode, seed = job.params["mode"], int(job.params["seed"])
  if mode not in MODES:
    raise ValueError(f"shuffle mode {mode!r}: expected one of {sorted(MODES)}")
  path = job.inputs["data"]
  rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
  out = MODES[mode](rows, seed)
  with open(job.out / SHUFFLED, "w", encoding="utf-8") as f:
    for row in out:
      f.write(json.dumps({"prompt": row["prompt"], "completion": row["completion"]}, ensure_ascii=False) + "\n")
  changed = sum(a["completion"] != b["completion"] for a, b in zip(rows, out))
  return {"mode": mode, "rows": len(out), "rows_changed": changed}
