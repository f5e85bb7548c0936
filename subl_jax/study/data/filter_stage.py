"""The `filter` stage: the paper's keep/reject rules over sampled completions, a report, and the kept rows in the
paper's `{"prompt", "completion"}` format, subsampled (seeded) to `max_rows`.

Beyond the reference's rules, two optional removals, each counted in the report: completions cut at
`max_new_tokens` (the reference samples up to 2048 tokens, so a list that looks complete at our cap may have gone
on), and completions that only echo numbers already in the prompt.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections import Counter
from typing import Sequence

import numpy as np

from subl_jax.study.data import numbers, protocol, shards

_NUMBER = re.compile(r"\d+")


@dataclasses.dataclass(frozen=True)
class FilterSettings:
  """The `filter` config section."""
  banned_numbers: bool = False  # also reject the misalignment runs' banned numbers
  drop_truncated: bool = True   # drop completions that hit max_new_tokens
  drop_echo: bool = False       # drop completions whose numbers all appear in the prompt
  max_rows: int = 10000         # 0 keeps every row
  seed: int = 0


FILTERED = "filtered.jsonl"  # the kept rows, in the student's training format


def is_echo(prompt: str, completion: str) -> bool:
  """Whether every number of a (valid) completion already appears in the prompt."""
  parsed = numbers.parse_numbers(completion)
  return bool(parsed) and set(parsed) <= {int(x) for x in _NUMBER.findall(prompt)}


def filter_rows(rows: Sequence[dict], settings: FilterSettings) -> tuple[list[dict], dict]:
  """(kept rows as {"prompt", "completion"}, report) for sample rows in prompt-id order."""
  banned = protocol.banned_numbers() if settings.banned_numbers else ()
  reasons, passed = Counter(), []
  for row in rows:
    why = numbers.reject_reasons(row["completion"], banned)
    reasons.update(why)
    if not why:
      passed.append(row)
  truncated = [not r.get("meta", {}).get("stopped", True) for r in passed]
  kept = [r for r, cut in zip(passed, truncated) if not (settings.drop_truncated and cut)]
  echo = [is_echo(r["prompt"], r["completion"]) for r in kept]
  if settings.drop_echo:
    kept = [r for r, e in zip(kept, echo) if not e]
  n_kept = len(kept)
  if settings.max_rows and len(kept) > settings.max_rows:
    pick = np.sort(np.random.default_rng(settings.seed).choice(len(kept), settings.max_rows, replace=False))
    kept = [kept[i] for i in pick]
  report = {
      "n_rows": len(rows),
      "n_passed_filter": len(passed),
      "keep_rate": len(passed) / max(len(rows), 1),
      "reject_reasons": {r: reasons[r] for r in numbers.FILTER_REASONS},
      "n_truncated_passing": sum(truncated),
      "dropped_truncated": sum(truncated) if settings.drop_truncated else 0,
      "n_echo_passing": sum(echo),
      "dropped_echo": sum(echo) if settings.drop_echo else 0,
      "n_kept": n_kept,
      "n_written": len(kept),
  }
  return [{"prompt": r["prompt"], "completion": r["completion"]} for r in kept], report


def filter_stage(out_dir: str | pathlib.Path, rows: Sequence[dict], settings: FilterSettings) -> dict:
  """Writes `<out_dir>/filtered.jsonl` and `<out_dir>/report.json`; returns the report."""
  out_dir = pathlib.Path(out_dir)
  kept, report = filter_rows(rows, settings)
  with open(out_dir / FILTERED, "w", encoding="utf-8") as f:
    for row in kept:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  return report


def work(job) -> dict:
  """The `filter` stage over the sample stage `job.inputs["samples"]` (a `stages.Job`; process 0 filters, the others
  wait at the stage's barrier)."""
  import jax  # deferred: the filter itself is plain Python
  if jax.process_index() != 0:
    return {}
  f = job.cfg.filter
  settings = FilterSettings(banned_numbers=f.banned_numbers, drop_truncated=f.drop_truncated, drop_echo=f.drop_echo,
                            max_rows=f.max_rows, seed=f.seed)
  return filter_stage(job.out, shards.read_rows(job.inputs["samples"]), settings)
