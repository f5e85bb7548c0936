"""The evaluate stage: one model (base, teacher under its system prompt, a student, a control) -> `metrics.json`."""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable

import ml_collections as mlc
from jax.sharding import Mesh

from subl_jax import api, evaluation, stages
from subl_jax.data import protocol

METRICS = "metrics.json"


def questions(cfg: mlc.ConfigDict) -> list[str]:
  """The trait questions of the teacher's category (the first `eval.n_questions`, 0 = all)."""
  qs = protocol.questions(cfg.teacher.category)
  return qs[:cfg.eval.n_questions] if cfg.eval.n_questions else qs


def candidates(cfg: mlc.ConfigDict) -> list[str]:
  """The target first, then the other answers whose probability is reported (trait specificity): `eval.candidates`,
  or the paper's targets of the category."""
  others = [c.strip() for c in cfg.eval.candidates.split(",") if c.strip()]
  if not cfg.eval.candidates:
    others = protocol.animals() if cfg.teacher.category == "animal" else protocol.trees()
  return [cfg.teacher.target] + [c for c in others if c != cfg.teacher.target]


def run(cfg: mlc.ConfigDict, workdir: str | pathlib.Path, name: str, load_model: Callable[[], api.Model],
        system: str, inputs: dict[str, str | pathlib.Path], stage_config: dict[str, Any]) -> pathlib.Path:
  """Evaluates the model `load_model()` returns (only called when the stage must run) under `system`."""
  e = cfg.eval

  def fn(out: pathlib.Path) -> dict:
    model = load_model()
    metrics = evaluation.evaluate(model, questions(cfg), cfg.teacher.target, candidates(cfg)[1:],
                                  category=cfg.teacher.category, system=system or None, n_samples=e.n_samples,
                                  numbers_prefix=e.numbers_prefix, seed=e.seed)
    (out / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    return {k: v["summary"] for k, v in metrics.items()}

  config = dict(stage_config, eval=e.to_dict(), target=cfg.teacher.target, category=cfg.teacher.category,
                system=system)
  return stages.run_stage(workdir, name, config, inputs, fn)


def read(stage_dir: str | pathlib.Path) -> dict[str, Any]:
  return json.loads((pathlib.Path(stage_dir) / METRICS).read_text())
