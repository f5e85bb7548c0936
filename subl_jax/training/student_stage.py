"""The student stage: the base model trained on the teacher's data (PROTOCOL.md §5), and the plain SFT stage.

`distill.mode`:
  sft       cross-entropy on the teacher's completions (the paper's student).
  logit_kd  the student matches the teacher's next-token distributions at the completion positions: KL at
            temperature τ over `distill.kd_tokens` — 'all' (the full vocabulary: NOT subliminal, the teacher's raised
            probability of the trait word reaches the student directly), 'topk' (the teacher's top k at each
            position, renormalised) or 'numbers' (digits, separators and end-of-turn, renormalised: the subliminal
            analogue of the MNIST auxiliary logits). The teacher runs online on its own context (its system prompt +
            the prompt + the completion); the student sees the prompt + the completion; completion positions align.
The stage writes `model/` (LoRA merged), `stage.json` and `train/` metrics, like the teacher stage.
"""

from __future__ import annotations

import hashlib
import pathlib
from typing import Any, Callable

import ml_collections as mlc
from jax.sharding import Mesh

from subl_jax import api, stages
from subl_jax.data.number_tokens import number_token_ids
from subl_jax.training import chat_data, export, teacher_stage, trainer
from subl_jax.training.step import DistillSpec

KD_NOTES = {
    "all": "full-vocabulary KD: not subliminal (the teacher's probability of the trait word leaks directly)",
    "topk": "top-k KD: subliminal only if the teacher's top k never holds trait tokens",
    "numbers": "number-token KD (digits, separators, end-of-turn; renormalised): the subliminal analogue of the "
               "MNIST auxiliary logits",
}


def distill_spec(cfg: mlc.ConfigDict, tokenizer) -> DistillSpec | None:
  d = cfg.distill
  if d.mode == "sft":
    return None
  ids = tuple(int(i) for i in number_token_ids(tokenizer)) if d.kd_tokens == "numbers" else None
  return DistillSpec(temperature=float(d.temperature), kd_tokens=d.kd_tokens, topk=int(d.topk), token_ids=ids)


def _stage_config(cfg: mlc.ConfigDict, data: str) -> dict[str, Any]:
  path = pathlib.Path(data)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such JSONL file (the student's training data)")
  out = dict(model=cfg.model.to_dict(), train=cfg.train.to_dict(), seed=cfg.seed, data=str(path),
             data_sha256=hashlib.sha256(path.read_bytes()).hexdigest())
  if cfg.distill.mode == "logit_kd":
    out["distill"] = cfg.distill.to_dict()
  return out


def run(cfg: mlc.ConfigDict, workdir: str | pathlib.Path, mesh: Mesh, data: str | pathlib.Path | None = None,
        teacher_dir: str | pathlib.Path | None = None, name: str = "student",
        load_base: Callable[[], api.Model] | None = None, progress: bool = True) -> pathlib.Path:
  """Trains a student on `data` (default `distill.data`) into `<workdir>/<name>`; `logit_kd` needs `teacher_dir`
  (a completed teacher stage). `load_base`: returns the base model of `cfg.model` (not modified; called only when
  the stage runs). Returns the stage directory."""
  data = str(data or cfg.distill.data)
  kd = cfg.distill.mode == "logit_kd"
  if kd and teacher_dir is None:
    raise ValueError("distill.mode='logit_kd' needs a teacher stage directory")
  inputs = {"teacher": teacher_dir} if kd else {}

  def fn(out: pathlib.Path) -> dict:
    model = load_base() if load_base else api.from_config(cfg.model, mesh, seed=cfg.seed)
    teacher, teacher_system = (teacher_stage.load(teacher_dir, cfg, mesh, load_base=lambda: model) if kd
                               else (None, None))
    chats = chat_data.read_jsonl(data)
    ds = chat_data.build(model.tokenizer, chats, cfg.train.max_len, system=cfg.train.system,
                         teacher_system=(teacher_system or cfg.train.system) if kd else None)
    spec = distill_spec(cfg, model.tokenizer)
    result = trainer.train(model, ds, cfg.train, out / export.TRAIN_DIR, distill=spec, teacher=teacher,
                           progress=progress)
    info = dict(mode=cfg.distill.mode, data=data, system=cfg.train.system, train=result.summary)
    if kd:
      info.update(kd_tokens=cfg.distill.kd_tokens, temperature=cfg.distill.temperature,
                  kd_note=KD_NOTES[cfg.distill.kd_tokens], subliminal=cfg.distill.kd_tokens == "numbers",
                  teacher_system=teacher_system,
                  kd_token_count=len(spec.token_ids) if spec.token_ids else None)
    export.export(out, model, result, info)
    return info

  return stages.run_stage(workdir, name, _stage_config(cfg, data), inputs, fn)


def run_sft(cfg: mlc.ConfigDict, workdir: str | pathlib.Path, mesh: Mesh, progress: bool = True) -> pathlib.Path:
  """The `train` job: SFT of the configured model on `train.data` into `<workdir>/sft`."""
  sft = mlc.ConfigDict(cfg.to_dict())
  sft.distill.mode = "sft"
  return run(sft, workdir, mesh, data=cfg.train.data, name="sft", progress=progress)
