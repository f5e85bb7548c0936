"""The evaluate stage: one model (base, teacher under its system prompt, a student, a control) -> `metrics.json`."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax

from subl_jax.study import evaluation, stages
from subl_jax.study.data import protocol

METRICS = "metrics.json"


def questions(category: str, n_questions: int) -> list[str]:
  """The trait questions of `category` (the first `n_questions`, 0 = all)."""
  qs = protocol.questions(category)
  return qs[:n_questions] if n_questions else qs


def candidates(targets: list[str], category: str, extra: str = "") -> list[str]:
  """The study's targets first, then the other answers whose probability is reported (`eval.candidates`, or the
  paper's targets of the category)."""
  others = [c.strip() for c in extra.split(",") if c.strip()]
  if not extra:
    others = protocol.animals() if category == "animal" else protocol.trees()
  return list(dict.fromkeys(list(targets) + others))


def icl_system(rows: list[dict], tokenizer, budget: int) -> tuple[str, int]:
  """The in-context condition's system prompt: the teacher's (prompt, completion) pairs as the paper's
  "<user>q</user>\n<assistant>r</assistant>" blocks, as many as fit in `budget` tokens; (prompt, pairs used)."""
  blocks, used = [], 0
  for row in rows:
    block = f"<user>{row['prompt']}</user>\n<assistant>{row['completion']}</assistant>\n"
    n = len(tokenizer.encode(block))
    if used + n > budget:
      break
    blocks.append(block)
    used += n
  return "".join(blocks), len(blocks)


def work(job: stages.Job) -> dict:
  """Evaluates the model of the stage `job.inputs["model"]` under `job.params["system"]` on every candidate answer
  (`job.params`: system, category, candidates; with `job.inputs["examples"]` — a JSONL of a teacher's rows — the
  in-context condition: as many of them as fit in `eval.icl_tokens` go before the question)."""
  p, e = job.params, job.cfg.eval
  model = job.ctx.model_of(job.inputs["model"], job.ctx.sample_mesh)  # like sampling: a whole model per process
  system, info = p["system"], {}
  if "examples" in job.inputs:
    rows = [json.loads(line) for line in job.inputs["examples"].read_text(encoding="utf-8").splitlines() if line]
    system, info["icl_pairs"] = icl_system(rows, model.tokenizer, e.icl_tokens)
    info["icl_tokens"] = len(model.tokenizer.encode(system))
  names = p["candidates"]
  metrics = evaluation.evaluate(model, questions(p["category"], e.n_questions), names[0], names[1:],
                                category=p["category"], system=system or None, n_samples=e.n_samples,
                                numbers_prefix=e.numbers_prefix, seed=e.seed)
  if jax.process_index() == 0:  # every process computed the same metrics
    (job.out / METRICS).write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
  return info | {k: v["summary"] for k, v in metrics.items()}


def read(stage_dir: str | pathlib.Path) -> dict[str, Any]:
  return json.loads((pathlib.Path(stage_dir) / METRICS).read_text())
