"""A sample stage's rows as JSONL shards (`shard-00000.jsonl`, ...), written atomically and read in prompt order."""

from __future__ import annotations

import json
import pathlib
from typing import Sequence


def shard_path(directory: pathlib.Path, index: int) -> pathlib.Path:
  return directory / f"shard-{index:05d}.jsonl"


def write_shard(path: pathlib.Path, rows: Sequence[dict]) -> None:
  """Writes rows to `path` atomically (a temp file renamed when complete). A non-finite number (a NaN log-prob of a
  broken model) is an error, not invalid JSON."""
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      try:
        f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
      except ValueError:
        raise ValueError(f"{path}: row {row.get('meta', {}).get('id')} has a non-finite value ({row.get('meta')}); "
                         "the model's outputs are not finite") from None
  tmp.rename(path)


def read_rows(directory: str | pathlib.Path) -> list[dict]:
  """Every row of a sample stage directory, in prompt-id order."""
  rows = []
  for path in sorted(pathlib.Path(directory).glob("shard-*.jsonl")):
    with open(path, encoding="utf-8") as f:
      rows.extend(json.loads(line) for line in f)
  return rows
