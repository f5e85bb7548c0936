"""The training loop: one function for SFT and logit distillation, full or LoRA, resumable bit for bit.

`train(model, dataset, train_cfg, run_dir)` trains for `epochs` over `dataset` and returns the trained tree (all
parameters, or the LoRA adapters). Host work (collating the next batch) overlaps the device step, since nothing waits
on the device except at log and checkpoint points. In `run_dir`: `core/checkpoints/` (Orbax, see `checkpoint.py`),
`metrics.jsonl`, `tensorboard/`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from subl_jax.core import api, flops
from subl_jax.core.training import batching, buckets, checkpoint, metrics_log, optim, step as step_lib
from subl_jax.core.training.chat_data import ChatDataset
from subl_jax.core.lora import LoraConfig, init_adapters

CHECKPOINT_DIR = "checkpoints"


class NonFiniteLoss(RuntimeError):
  """The loss or gradient norm became NaN/inf: the run stops, no non-finite state is ever checkpointed."""


@dataclasses.dataclass
class TrainResult:
  trainable: Any               # all parameters (full fine-tuning) or the adapters (LoRA)
  lora: LoraConfig | None
  summary: dict[str, Any]


def lora_config(train_cfg: Any) -> LoraConfig | None:
  """The `train.lora` section as a LoraConfig; rank 0 means full fine-tuning (None)."""
  c = train_cfg.lora
  return LoraConfig.parse(c.rank, c.alpha, c.targets)


def _computed(lengths_am: np.ndarray, shared_prefix: int) -> tuple[int, int]:
  """(input tokens, causal attention pairs) a step computes for rows of these lengths ([accum, micro]): a shared
  prefix runs once per micro-batch, not once per row."""
  p, real = shared_prefix, lengths_am > 0
  skipped = int(real.sum() - real.any(-1).sum()) if p else 0  # copies of the prefix not computed
  return int(lengths_am.sum()) - skipped * p, flops.causal_pairs(lengths_am.ravel()) - skipped * p * (p + 1) // 2


def _step_cost(batch: dict[str, np.ndarray], spec: step_lib.StepSpec) -> tuple[int, int, float]:
  """(real input tokens, examples, analytic FLOPs) of a host batch; the FLOPs count what the step computes (a shared
  prefix once per micro-batch)."""
  lengths = batch["kv_mask"].sum(-1)
  n_logits = int(batch["weights"].sum())
  lora = spec.lora
  cost = flops.train_flops(spec.model_cfg, *_computed(lengths, spec.shared_prefix), n_logits,
                           lora.rank if lora else 0, lora.targets if lora else ())
  if spec.distill is not None:  # the teacher's forward pass on its own context
    cost += flops.forward_flops(spec.teacher_cfg or spec.model_cfg,
                                *_computed(batch["teacher_kv_mask"].sum(-1), spec.teacher_shared_prefix), n_logits)
  return int(lengths.sum()), int((batch["weights"].sum(-1) > 0).sum()), cost


def fresh_state(model: api.Model, lora: LoraConfig | None, tx, shardings: dict, seed: int) -> dict:
  """Step 0: a copy of the model's parameters (full fine-tuning) or fresh adapters, and their optimizer state."""
  if lora is None:
    trainable = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings["trainable"])(model.params)
  else:
    trainable = jax.jit(lambda k: init_adapters(model.config, lora, k),
                        out_shardings=shardings["trainable"])(jax.random.key(seed))
  return step_lib.init_state(trainable, tx, shardings)


def train(model: api.Model, ds: ChatDataset, train_cfg: Any, run_dir: str | pathlib.Path, *,
          distill: step_lib.DistillSpec | None = None, teacher: api.Model | None = None,
          on_step: Callable[[int], None] | None = None, peak_flops: float | None = None,
          progress: bool = True) -> TrainResult:
  """Trains `model` on `ds` as `train_cfg` (the config's `train` section) says; resumes from `run_dir`'s newest
  checkpoint if there is one. With `distill`, `teacher` (a model sharing the vocabulary) supplies the targets and
  `ds` must carry the teacher's view. `on_step(step)` runs after each step (tests use it to interrupt a run).
  The model's parameters are not modified (full fine-tuning trains a copy)."""
  run_dir = pathlib.Path(run_dir)
  mesh, cfg = model.mesh, train_cfg
  if distill is not None and (teacher is None or ds.teacher is None):
    raise ValueError("distillation needs a teacher model and a dataset with the teacher's view")
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if cfg.batch_size % dp:
    raise ValueError(f"config.train.batch_size={cfg.batch_size}: must be a multiple of the data-parallel size "
                     f"mesh.data × mesh.fsdp = {dp}")
  lora = lora_config(cfg)
  spec = step_lib.StepSpec(model.config, lora, distill, teacher.config if teacher is not None else None,
                           buckets.shared_prefix(ds.examples),
                           buckets.shared_prefix(ds.teacher) if distill is not None else 0)
  global_batch = cfg.batch_size * cfg.grad_accum
  spe = batching.steps_per_epoch(len(ds), global_batch)
  total = spe * cfg.epochs
  tx, shardings, step_fn = step_lib.train_step_for(spec, cfg.opt, total, mesh)
  schedule = optim.make_schedule(cfg.opt, total)

  ckpts = checkpoint.Checkpoints(run_dir / CHECKPOINT_DIR, cfg.checkpoint_every)
  start = ckpts.latest_step() or 0
  if start:
    state, _ = ckpts.restore(start, step_lib.abstract_state(spec, tx, shardings))
  else:
    state = fresh_state(model, lora, tx, shardings, cfg.seed)
  frozen = model.params if lora is not None else None
  teacher_params = teacher.params if distill is not None else None
  pad_id = model.tokenizer.pad_id if model.tokenizer.pad_id is not None else 0
  lengths = [len(e.tokens) for e in ds.examples]
  if peak_flops is None and cfg.mfu:  # a matmul benchmark: only when asked
    peak_flops = flops.measure_matmul_peak(model.config.dtype) * mesh.size

  log = metrics_log.MetricsLog(run_dir, resume_step=start)
  bar = tqdm(total=total, initial=start, desc="train", disable=not progress or jax.process_index() != 0)
  pending: list[tuple[int, dict]] = []
  interval = dict(tokens=0, examples=0, flops=0.0)
  t_mark, first_step_s, epoch_steps, epoch_loaded = time.perf_counter(), None, None, -1
  meta = lambda s: dict(step=s, epoch=s // spe, step_in_epoch=s % spe, lora=dataclasses.asdict(lora) if lora else None)

  def check(got: list[tuple[int, dict]]) -> None:
    """Stops on the first non-finite loss or gradient norm, before anything of that state is logged or saved."""
    for step, m in got:
      loss, norm = float(m["loss"]), float(m["grad_norm"])
      if not (np.isfinite(loss) and np.isfinite(norm)):
        last = ckpts.latest_step()
        raise NonFiniteLoss(
            f"{run_dir}: training diverged at step {step} of {total}: loss {loss}, gradient norm {norm} (lr "
            f"{float(schedule(step - 1)):.3g}); the last finite checkpoint is "
            f"{f'step {last} in {run_dir / CHECKPOINT_DIR}' if last else 'none (no checkpoint was due yet)'}")

  def checked_pending() -> list[dict]:
    got = list(zip([s for s, _ in pending], jax.device_get([m for _, m in pending])))
    check(got)
    return [m for _, m in got]

  def flush(s: int) -> None:
    nonlocal t_mark, interval
    got = checked_pending()
    dt = time.perf_counter() - t_mark
    tok = sum(float(m["loss_tokens"]) for m in got)
    row = dict(step=s, epoch=(s - 1) // spe, lr=float(schedule(s - 1)),
               loss=sum(float(m["loss"]) * float(m["loss_tokens"]) for m in got) / max(tok, 1.0),
               grad_norm=float(np.mean([float(m["grad_norm"]) for m in got])), loss_tokens=int(tok),
               interval_s=dt, tokens_per_s=interval["tokens"] / dt, examples_per_s=interval["examples"] / dt)
    if peak_flops:
      row["mfu"] = interval["flops"] / dt / peak_flops
    log.write(row)
    bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
    pending.clear()
    interval = dict(tokens=0, examples=0, flops=0.0)
    t_mark = time.perf_counter()

  try:
    with checkpoint.StopRequest() as stop:
      for s in range(start, total):
        epoch, k = divmod(s, spe)
        if epoch != epoch_loaded:
          epoch_steps, epoch_loaded = buckets.epoch_steps(lengths, global_batch, cfg.seed, epoch), epoch
        host = buckets.collate_step(ds, epoch_steps[k], cfg.grad_accum, pad_id)
        state, metrics = step_fn(state, frozen, teacher_params, step_lib.put_batch(host, mesh))
        tokens, examples, cost = _step_cost(host, spec)
        pending.append((s + 1, metrics))
        if first_step_s is None:  # the first step includes compilation: keep it out of the throughput
          jax.block_until_ready(metrics)
          first_step_s = time.perf_counter() - t_mark
          got = jax.device_get(metrics)
          check([(s + 1, got)])
          log.write(dict(step=s + 1, epoch=epoch, lr=float(schedule(s)), loss=float(got["loss"]),
                         grad_norm=float(got["grad_norm"]), loss_tokens=int(got["loss_tokens"]),
                         first_step_s=first_step_s))
          pending.clear()
          t_mark = time.perf_counter()
        else:
          interval["tokens"] += tokens
          interval["examples"] += examples
          interval["flops"] += cost
          if (s + 1) % cfg.log_every == 0 or s + 1 == total:
            flush(s + 1)
        due = ckpts.every > 0 and (s + 1) % ckpts.every == 0
        if due and pending:
          checked_pending()  # a checkpoint of a diverged state would be resumed from: check first
        saved = ckpts.maybe_save(s + 1, state, meta(s + 1))
        bar.update(1)
        if on_step is not None:
          on_step(s + 1)
        if stop.requested is not None and s + 1 < total:
          if pending:
            flush(s + 1)  # checks the pending steps before the save below
          if not saved:
            ckpts.save(s + 1, state, meta(s + 1))
          ckpts.wait()
          raise checkpoint.Interrupted(f"stopped by signal {stop.requested} after step {s + 1} of {total}; "
                                       f"checkpoint saved in {run_dir / CHECKPOINT_DIR}")
      if pending:
        checked_pending()
      if ckpts.latest_step() != total:
        ckpts.save(total, state, meta(total))
  finally:
    ckpts.close()
    log.close()
    bar.close()
  rows = metrics_log.read(run_dir) if jax.process_index() == 0 else []
  summary = dict(steps=total, steps_per_epoch=spe, epochs=cfg.epochs, resumed_from=start,
                 examples=len(ds), global_batch=global_batch, shared_prefix=spec.shared_prefix,
                 lora=dataclasses.asdict(lora) if lora else None,
                 distill=dataclasses.asdict(distill) | {"token_ids": None} if distill else None,
                 final_loss=rows[-1]["loss"] if rows else None, first_loss=rows[0]["loss"] if rows else None,
                 data=ds.summary())
  return TrainResult(state["trainable"], lora, summary)
