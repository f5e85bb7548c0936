"""The quality stage (issue #21): what distillation is for, measured on numbers the student never trained on.

For one model (the base, a student, a mitigated student) and one teacher, on the teacher's completions of held-out
number prompts (`heldout_<t>`: the paper's prompt generator with `sample.prompt_seed + 1`, filtered like the
training data):
  kl_numbers  mean over completion positions of KL(teacher ‖ model) over the number tokens (digits, separators,
              end-of-turn; both renormalised): the number-token distillation objective, held out
  kl_all      the same over the full vocabulary
and the model's own numbers: its completions of the same held-out prompts (temperature 1, no format constraint, no
system prompt, as a student is used) and the share the paper's filter keeps (`keep_rate`).
A mitigation keeps quality when its student's KL to the teacher falls as far as the unmitigated student's does (the
report's "quality kept": (KL_base − KL_mitigated) / (KL_base − KL_unmitigated)) and its keep rate does not drop.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np

from subl_jax.core import sampling
from subl_jax.core.number_tokens import number_token_ids
from subl_jax.core.training import buckets, divergence, losses, step as step_lib
from subl_jax.study import context, stages
from subl_jax.study.data import numbers
from subl_jax.study import student_stage

QUALITY = "quality.json"
HELDOUT_PROMPT_SEED_OFFSET = 1  # held-out prompts: the paper's generator at `sample.prompt_seed` + this


def heldout_config(cfg: Any) -> Any:
  """The sampling config of the held-out prompts: `mitigation.quality_prompts` of them, another prompt seed."""
  c = cfg.copy_and_resolve_references()
  c.sample.n_prompts = cfg.mitigation.quality_prompts
  c.sample.shard_size = min(cfg.sample.shard_size, cfg.mitigation.quality_prompts)
  c.sample.prompt_seed = cfg.sample.prompt_seed + HELDOUT_PROMPT_SEED_OFFSET
  return c


def held_out_kl(model: Any, teacher: Any, ds: Any, batch_size: int = 16) -> dict[str, float]:
  """Mean KL(teacher ‖ model) per completion position of `ds` (with the teacher's view), over the number tokens and
  over the full vocabulary."""
  fn = divergence.logits_fn(model, teacher, ds)  # (teacher logits, `model` logits) at the loss positions
  ids = np.asarray(number_token_ids(model.tokenizer), np.int32)
  kl = jax.jit(lambda t, s, w: (losses.masked_sum(losses.kd_token_loss(s, t, 1.0, "numbers", 0, ids), w)[0],
                                losses.masked_sum(losses.kd_token_loss(s, t, 1.0), w)))
  pad = model.tokenizer.pad_id if model.tokenizer.pad_id is not None else 0
  dp = model.mesh.shape["data"] * model.mesh.shape["fsdp"]
  rows = -(-batch_size // dp) * dp
  order = np.argsort([len(e.tokens) for e in ds.examples], kind="stable")
  tot_n, tot_all, count = 0.0, 0.0, 0.0
  for start in range(0, len(order), rows):
    idx = order[start:start + rows]
    idx = np.r_[idx, np.full(rows - len(idx), -1)]
    mb = jax.tree.map(lambda x: x[0], step_lib.put_batch(buckets.collate_step(ds, idx, 1, pad), model.mesh))
    t_logits, s_logits = fn(model.params, teacher.params, mb)
    k_n, (k_all, c) = kl(t_logits, s_logits, mb["weights"])
    tot_n, tot_all, count = tot_n + float(k_n), tot_all + float(k_all), count + float(c)
  return {"kl_numbers": tot_n / max(count, 1.0), "kl_all": tot_all / max(count, 1.0), "positions": int(count)}


def own_numbers(model: Any, rows: list[dict], max_new_tokens: int, seed: int) -> dict[str, Any]:
  """The model's completions of the rows' prompts (temperature 1, unconstrained) and the filter's keep rate."""
  tok = model.tokenizer
  prompts = [tok.encode_chat([{"role": "user", "content": r["prompt"]}]) for r in rows]
  gen = sampling.generate(model, prompts, max_new_tokens, temperature=1.0, seed=seed)
  texts = [tok.decode(ids) for ids in gen.tokens]
  kept = [not numbers.reject_reasons(t) and stopped for t, stopped in zip(texts, gen.stopped)]
  return {"keep_rate": float(np.mean(kept)), "n": len(texts), "examples": texts[:8]}


def work(job: stages.Job) -> dict:
  """Stage `quality_<model>`: `job.inputs` model (a student or base stage), teacher (its teacher stage) and data
  (the teacher's held-out filtered rows)."""
  cfg, ctx = job.cfg, job.ctx
  mesh = ctx.sample_mesh  # like evaluation: every process computes it all on its own devices
  model, teacher_dir = ctx.model_of(job.inputs["model"], mesh), job.inputs["teacher"]
  ds = student_stage.dataset(cfg, model.tokenizer, job.inputs["data"], context.system_of(teacher_dir))
  out = held_out_kl(model, ctx.model_of(teacher_dir, mesh), ds)
  rows = [json.loads(line) for line in job.inputs["data"].read_text(encoding="utf-8").splitlines() if line.strip()]
  out |= own_numbers(model, rows, cfg.sample.max_new_tokens, cfg.seed)
  if jax.process_index() == 0:
    (job.out / QUALITY).write_text(json.dumps(out, indent=2) + "\n")
  return {k: out[k] for k in ("kl_numbers", "kl_all", "keep_rate")}


def read(stage_dir: Any) -> dict[str, Any]:
  return json.loads((pathlib.Path(stage_dir) / QUALITY).read_text())
