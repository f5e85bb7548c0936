"""Trained models as converted model directories (`api.load` reads them), and the trained-stage layout.

A teacher or student stage writes `model/` — the full parameters, with LoRA adapters merged into the base
(W + alpha/r · A·B) — so every consumer loads a trained model exactly like a base model, and `stage.json` saying what
the model is (a system-prompt teacher has no `model/`: its `stage.json` says `"model": "base"` and holds the system
prompt). The Orbax train checkpoints (adapters only, for LoRA) live in `train/checkpoints/` while a stage runs and
are deleted once the stage is committed (`TRAIN_CHECKPOINTS`, the stage table's `cleanup`): a merged model is all
later stages need, and a crash before the commit still resumes from them. A LoRA stage also keeps its unmerged
adapters in `adapters/` (Orbax `params/` + `lora.json`, the LoraConfig), for exporting the student as a PEFT adapter
(`subl_jax.core.checkpoints.hf_export`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from subl_jax.core import api
from subl_jax.core.checkpoints import store
from subl_jax.core.models import transformer
from subl_jax.core import lora as lora_lib
from subl_jax.core.training.trainer import CHECKPOINT_DIR, TrainResult

MODEL_DIR, STAGE_FILE, TRAIN_DIR = "model", "stage.json", "train"
TRAIN_CHECKPOINTS = f"{TRAIN_DIR}/{CHECKPOINT_DIR}"
ADAPTERS_DIR, ADAPTER_PARAMS_DIR, LORA_FILE = "adapters", "params", "lora.json"


def trained_params(model: api.Model, result: TrainResult) -> Any:
  """The full parameters after training: the trained copy, or the base with the adapters merged in."""
  if result.lora is None:
    return result.trainable
  shardings = transformer.param_shardings(model.config, model.mesh)
  merge = jax.jit(lambda p, a: lora_lib.merge(p, a, result.lora), out_shardings=shardings)
  return merge(model.params, result.trainable)


def export(stage_dir: str | pathlib.Path, model: api.Model, result: TrainResult, info: dict[str, Any]) -> None:
  """Writes `model/` (merged parameters) and `stage.json` (info + `model` spec) into a stage directory, then drops
  the train checkpoints."""
  stage_dir = pathlib.Path(stage_dir)
  store.save(stage_dir / MODEL_DIR, model.config, trained_params(model, result), model.tokenizer,
             source={"trained": info})
  if result.lora is not None:
    save_adapters(stage_dir, result)
  write_info(stage_dir, dict(info, model=MODEL_DIR))


def save_adapters(stage_dir: str | pathlib.Path, result: TrainResult) -> None:
  """`adapters/params` (Orbax: the unmerged A, B, unscaled) and `adapters/lora.json` (rank, alpha, targets)."""
  d = pathlib.Path(stage_dir).absolute() / ADAPTERS_DIR
  d.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(d / ADAPTER_PARAMS_DIR, result.trainable, force=True)  # force: a resumed stage may have one
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    (d / LORA_FILE).write_text(json.dumps(dataclasses.asdict(result.lora), indent=2) + "\n")


def write_info(stage_dir: str | pathlib.Path, info: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    (pathlib.Path(stage_dir) / STAGE_FILE).write_text(json.dumps(info, indent=2) + "\n")


def read_info(stage_dir: str | pathlib.Path) -> dict[str, Any]:
  return json.loads((pathlib.Path(stage_dir) / STAGE_FILE).read_text())


def model_spec(stage_dir: str | pathlib.Path) -> str:
  """The `api.load` spec of a stage's trained model (its `model/` directory). A system-prompt teacher has none — it
  is the base model (`study.context.Context.model_of` handles both)."""
  info = read_info(stage_dir)
  if info["model"] != MODEL_DIR:
    raise ValueError(f"{stage_dir}: no trained model here (model={info['model']!r}); load the base model instead")
  return str(pathlib.Path(stage_dir).absolute() / MODEL_DIR)
