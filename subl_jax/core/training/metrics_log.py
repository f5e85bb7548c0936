"""Training metrics as JSONL (`metrics.jsonl`) and TensorBoard event files (`tensorboard/`) in a run directory."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax

METRICS_FILE, TENSORBOARD_DIR = "metrics.jsonl", "tensorboard"


class MetricsLog:
  """Appends one JSON row per logged interval and mirrors the numbers to TensorBoard (process 0 only).

  On resume from step k, rows after k (written before the interruption, then recomputed) are dropped first, so the
  file reads as one uninterrupted run.
  """

  def __init__(self, directory: str | pathlib.Path, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = pathlib.Path(directory) / METRICS_FILE
    self._writer = None
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self.path.exists():
      rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
      kept = [r for r in rows if r.get("step", 0) <= resume_step]
      self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    from tensorboardX import SummaryWriter  # deferred: only a training run needs it
    self._writer = SummaryWriter(str(pathlib.Path(directory) / TENSORBOARD_DIR), purge_step=resume_step + 1)

  def write(self, row: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    step = int(row["step"])
    for key, value in row.items():
      if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
        self._writer.add_scalar(f"train/{key}", value, step)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.flush()
      self._writer.close()
      self._writer = None


def read(directory: str | pathlib.Path) -> list[dict[str, Any]]:
  """The rows of a run's `metrics.jsonl`."""
  path = pathlib.Path(directory) / METRICS_FILE
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
