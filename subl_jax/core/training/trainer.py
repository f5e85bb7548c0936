"""The LLM trainer: one function for every objective (`objectives.py`), full or LoRA, resumable bit for bit.

`train(model, dataset, train_cfg, run_dir, objective=...)` trains for `epochs` over `dataset` and returns the trained
tree (all parameters, or the LoRA adapters). It is the host loop (`loop.py`) with the hooks of `hooks.py`: host work
(collating the next batch) overlaps the device step, since nothing waits on the device except at log and checkpoint
points. In `run_dir`: `checkpoints/` (Orbax, see `checkpoint.py`), `metrics.jsonl`, `tensorboard/`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from subl_jax.core import api, flops
from subl_jax.core.training import batching, buckets, checkpoint, loop, metrics_log, objectives, optim
from subl_jax.core.training import hooks as hooks_lib, step as step_lib
from subl_jax.core.training.chat_data import ChatDataset
from subl_jax.core.lora import LoraConfig, init_adapters

CHECKPOINT_DIR = "checkpoints"


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


def step_cost(batch: dict[str, np.ndarray], spec: step_lib.StepSpec) -> tuple[int, int, float]:
  """(real input tokens, examples, analytic FLOPs) of a host batch; the FLOPs count what the step computes (a shared
  prefix once per micro-batch), the objective's extra forward passes included."""
  lengths = batch["kv_mask"].sum(-1)
  n_logits = int(batch["weights"].sum())
  lora = spec.lora
  cost = flops.train_flops(spec.model_cfg, *_computed(lengths, spec.shared_prefix), n_logits,
                           lora.rank if lora else 0, lora.targets if lora else ())
  forward = {  # forward only: nothing flows back into these
      "teacher": lambda: flops.forward_flops(spec.teacher_cfg or spec.model_cfg,
                                             *_computed(batch["teacher_kv_mask"].sum(-1), spec.teacher_shared_prefix),
                                             n_logits),
      # counted at every step, also past a `KLToBase.until_step` where it no longer runs
      "base": lambda: flops.forward_flops(spec.model_cfg, *_computed(lengths, spec.shared_prefix), n_logits)}
  cost += sum(forward[name]() for name in spec.objective.forwards)
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
          objective: objectives.Objective = objectives.SFT(), teacher: api.Model | None = None,
          probe: ChatDataset | None = None, project: str = "gradient", hooks: Sequence[loop.Hook] = (),
          peak_flops: float | None = None, progress: bool = True,
          monitor: tuple[int, Any] | None = None) -> TrainResult:
  """Trains `model` on `ds` for `objective` as `train_cfg` (the config's `train` section) says; resumes from
  `run_dir`'s newest checkpoint if there is one. An objective that needs a teacher (`LogitKD`) gets `teacher` (a model
  sharing the vocabulary), and `ds` must carry the teacher's view. With `probe` (the trait's examples: prompts
  answered with the trait) every step is projected off ∇ log P(probe completions) as `project` says ('gradient':
  the gradient, when the step would raise the trait; 'update': the optimizer's update, whatever its sign;
  `StepSpec.project`); without a probe, `project` is ignored. `hooks` run after the trainer's own, before the stop on
  a signal (`hooks.py`); the loop's state is `{"step", "trainable", "opt"}`. `monitor` = (every, signals): `hooks.Monitor` rows in `metrics.jsonl`.
  The model's parameters are not modified (full fine-tuning trains a copy; they are the base of a `base` pass)."""
  run_dir = pathlib.Path(run_dir)
  mesh, cfg = model.mesh, train_cfg
  kd = objective.needs_teacher
  if kd and (teacher is None or ds.teacher is None):
    raise ValueError(f"{type(objective).__name__} needs a teacher model and a dataset with the teacher's view")
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if cfg.batch_size % dp:
    raise ValueError(f"config.train.batch_size={cfg.batch_size}: must be a multiple of the data-parallel size "
                     f"mesh.data × mesh.fsdp = {dp}")
  lora = lora_config(cfg)
  spec = step_lib.StepSpec(model.config, lora, objective, teacher.config if kd else None,
                           buckets.shared_prefix(ds.examples), buckets.shared_prefix(ds.teacher) if kd else 0,
                           project=project if probe is not None else "")
  global_batch = cfg.batch_size * cfg.grad_accum
  spe = batching.steps_per_epoch(len(ds), global_batch)
  total = spe * cfg.epochs
  tx, shardings, step_fn = step_lib.train_step_for(spec, cfg.opt, total, mesh)
  schedule = optim.make_schedule(cfg.opt, total)

  ckpt_dir = run_dir / CHECKPOINT_DIR
  ckpts = checkpoint.Checkpoints(ckpt_dir, cfg.checkpoint_every)
  start = ckpts.latest_step() or 0
  if start:
    state, _ = ckpts.restore(start, step_lib.abstract_state(spec, tx, shardings))
  else:
    state = fresh_state(model, lora, tx, shardings, cfg.seed)
  frozen = model.params if lora is not None or "base" in objective.forwards else None
  teacher_params = teacher.params if kd else None
  pad_id = model.tokenizer.pad_id if model.tokenizer.pad_id is not None else 0
  probe_batch = None
  if probe is not None:  # one micro-batch of every probe example, its rows padded to a multiple of the data split
    rows = -(-len(probe) // dp) * dp
    idx = np.r_[np.arange(len(probe)), np.full(rows - len(probe), -1)]
    probe_batch = step_lib.put_batch(buckets.collate_step(probe, idx, 1, pad_id), mesh)
  lengths = [len(e.tokens) for e in ds.examples]
  if peak_flops is None and cfg.mfu:  # a matmul benchmark: only when asked
    peak_flops = flops.measure_matmul_peak(model.config.dtype) * mesh.size
  orders: dict[int, list[np.ndarray]] = {}  # the current epoch's steps (a pure function of seed and epoch)

  def one_step(s: int, current: dict) -> tuple[dict, dict]:
    epoch, k = divmod(s, spe)
    if epoch not in orders:
      orders.clear()
      orders[epoch] = buckets.epoch_steps(lengths, global_batch, cfg.seed, epoch)
    host = buckets.collate_step(ds, orders[epoch][k], cfg.grad_accum, pad_id)
    new, metrics = step_fn(current, frozen, teacher_params, step_lib.put_batch(host, mesh), probe_batch)
    tokens, examples, cost = step_cost(host, spec)  # while the device runs the step
    return new, metrics | dict(tokens=tokens, examples=examples, flops=cost)

  def divergence_context(step: int) -> str:
    last = ckpts.latest_step()
    return (f" (lr {float(schedule(step - 1)):.3g}); the last finite checkpoint is "
            f"{f'step {last} in {ckpt_dir}' if last else f'none in {ckpt_dir} (no checkpoint was due yet)'}")

  meta = lambda s: dict(step=s, epoch=s // spe, step_in_epoch=s % spe, lora=dataclasses.asdict(lora) if lora else None)
  log = metrics_log.MetricsLog(run_dir, resume_step=start)
  main = jax.process_index() == 0
  done = loop.run_loop(state, start, total, one_step, [
      hooks_lib.FiniteGuard(divergence_context),
      hooks_lib.MetricsLogger(log, cfg.log_every, spe, lambda s: float(schedule(s)), peak_flops),
      hooks_lib.Checkpointing(ckpts, meta),
      hooks_lib.Progress(progress and main),
      *([hooks_lib.Monitor(log, *monitor)] if monitor else []),
      *hooks,
      hooks_lib.StopOnSignal(f"; checkpoint saved in {ckpt_dir}")])
  rows = [r for r in metrics_log.read(run_dir) if "loss" in r] if main else []
  summary = dict(steps=total, steps_per_epoch=spe, epochs=cfg.epochs, resumed_from=start,
                 examples=len(ds), global_batch=global_batch, shared_prefix=spec.shared_prefix,
                 lora=dataclasses.asdict(lora) if lora else None, objective=objective.describe(),
                 project=spec.project,
                 final_loss=rows[-1]["loss"] if rows else None, first_loss=rows[0]["loss"] if rows else None,
                 data=ds.summary())
  return TrainResult(done.state["trainable"], lora, summary)
