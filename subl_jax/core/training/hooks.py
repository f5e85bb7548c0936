"""The LLM trainer's hooks (`loop.Hook`): finite-loss guard, metrics, checkpoints, progress bar, stop on signal.

`trainer.train` runs them in this order, and the order is part of the guarantees:
  FiniteGuard     first: it sees every fetched metric before any other hook does, so a non-finite loss stops the
                  run before it is logged (MetricsLogger fetches, then writes) or its state saved (Checkpointing
                  fetches, then saves).
  MetricsLogger, Checkpointing, Progress, Monitor (when asked), then the caller's hooks,
  StopOnSignal    last: a signal that arrives during any hook's work at step k stops the run after step k.
Steps' metrics are the train step's (`loss`, `loss_tokens`, `grad_norm`: device arrays) plus host numbers of the batch
(`tokens`, `examples`, `flops`), so throughput is counted without waiting on the device.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from subl_jax.core.training import checkpoint, metrics_log
from subl_jax.core.training.loop import Hook, Loop, Metrics


class NonFiniteLoss(RuntimeError):
  """The loss or gradient norm became NaN/inf: the run stops, no non-finite state is ever checkpointed."""


class FiniteGuard(Hook):
  """Raises `NonFiniteLoss` at the first fetched step whose loss or gradient norm is not finite; `context(step)` adds
  to the message (the learning rate, the last good checkpoint)."""

  def __init__(self, context: Callable[[int], str] = lambda step: ""):
    self.context = context

  def on_metrics(self, loop: Loop, rows: list[tuple[int, Metrics]]) -> None:
    for step, m in rows:
      loss, norm = float(m["loss"]), float(m["grad_norm"])
      if not (np.isfinite(loss) and np.isfinite(norm)):
        raise NonFiniteLoss(f"training diverged at step {step} of {loop.total}: loss {loss}, gradient norm {norm}"
                            f"{self.context(step)}")


# Metrics MetricsLogger writes under names of its own; any other a step returns is logged as its mean over the row's
# steps (gradient projection's `projected`, 1 when the step was projected: the share of projected steps).
_LOGGED = frozenset({"loss", "loss_tokens", "grad_norm", "tokens", "examples", "flops"})


def _other_metrics(rows: list[Metrics]) -> dict[str, float]:
  return {k: float(np.mean([float(m[k]) for m in rows])) for k in rows[0] if k not in _LOGGED} if rows else {}


class MetricsLogger(Hook):
  """A row every `every` steps (and at the last): the token-weighted mean loss, mean gradient norm, learning rate,
  throughput, and MFU against `peak_flops` when given. The loop's first step is a row of its own (`first_step_s`):
  it includes compilation, so it stays out of the throughput."""

  def __init__(self, log: metrics_log.MetricsLog, every: int, steps_per_epoch: int, lr: Callable[[int], float],
               peak_flops: float | None = None):
    self.log, self.every, self.spe, self.lr, self.peak_flops = log, every, steps_per_epoch, lr, peak_flops
    self.rows: list[Metrics] = []  # fetched since the last row
    self.interval = dict(tokens=0, examples=0, flops=0.0)
    self.t_mark = time.perf_counter()

  def on_start(self, loop: Loop) -> None:
    self.t_mark = time.perf_counter()

  def on_metrics(self, loop: Loop, rows: list[tuple[int, Metrics]]) -> None:
    self.rows += [m for _, m in rows]

  def on_step(self, loop: Loop, step: int, metrics: Metrics) -> None:
    if step == loop.start + 1:
      loop.fetch()  # waits for the step: its time is the compile's and the step's
      m = self.rows[-1]
      self.log.write(dict(step=step, epoch=(step - 1) // self.spe, lr=self.lr(step - 1), loss=float(m["loss"]),
                          grad_norm=float(m["grad_norm"]), loss_tokens=int(m["loss_tokens"]),
                          first_step_s=time.perf_counter() - self.t_mark, **_other_metrics([m])))
      self._reset()
      return
    for k in self.interval:
      self.interval[k] += metrics[k]
    if step % self.every == 0 or step == loop.total:
      self._flush(loop, step)

  def on_end(self, loop: Loop) -> None:
    if self.rows:  # a stop between log points: the steps since the last row
      self._flush(loop, loop.step)

  def _flush(self, loop: Loop, step: int) -> None:
    loop.fetch()
    dt = time.perf_counter() - self.t_mark
    tok = sum(float(m["loss_tokens"]) for m in self.rows)
    row = dict(step=step, epoch=(step - 1) // self.spe, lr=self.lr(step - 1),
               loss=sum(float(m["loss"]) * float(m["loss_tokens"]) for m in self.rows) / max(tok, 1.0),
               grad_norm=float(np.mean([float(m["grad_norm"]) for m in self.rows])), loss_tokens=int(tok),
               interval_s=dt, tokens_per_s=self.interval["tokens"] / dt,
               examples_per_s=self.interval["examples"] / dt)
    if self.peak_flops:
      row["mfu"] = self.interval["flops"] / dt / self.peak_flops
    self.log.write(row | _other_metrics(self.rows))
    self._reset()

  def _reset(self) -> None:
    self.rows = []
    self.interval = dict(tokens=0, examples=0, flops=0.0)
    self.t_mark = time.perf_counter()

  def close(self) -> None:
    self.log.close()


class Checkpointing(Hook):
  """The state every `ckpts.every` steps and at the end (the last step, or a stop); `meta(step)` is saved beside it."""

  def __init__(self, ckpts: checkpoint.Checkpoints, meta: Callable[[int], dict[str, Any]]):
    self.ckpts, self.meta, self.saved = ckpts, meta, None

  def _save(self, loop: Loop) -> None:
    loop.fetch()  # the guard checks the metrics of this state before it is saved (a run would resume from it)
    self.ckpts.save(loop.step, loop.state, self.meta(loop.step))
    self.saved = loop.step

  def on_step(self, loop: Loop, step: int, metrics: Metrics) -> None:
    if self.ckpts.every > 0 and step % self.ckpts.every == 0:
      self._save(loop)

  def on_end(self, loop: Loop) -> None:
    if loop.step not in (self.saved, self.ckpts.latest_step()):
      self._save(loop)
    self.ckpts.wait()

  def close(self) -> None:
    self.ckpts.close()


class Progress(Hook):
  """A tqdm bar of the steps, showing the last fetched loss."""

  def __init__(self, enabled: bool = True):
    self.enabled, self.bar = enabled, None

  def on_start(self, loop: Loop) -> None:
    self.bar = tqdm(total=loop.total, initial=loop.start, desc="train", disable=not self.enabled)

  def on_step(self, loop: Loop, step: int, metrics: Metrics) -> None:
    self.bar.update(1)

  def on_metrics(self, loop: Loop, rows: list[tuple[int, Metrics]]) -> None:
    self.bar.set_postfix(loss=f"{float(rows[-1][1]['loss']):.4f}")

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


class Monitor(Hook):
  """Every `every` steps, at the start and at the end: `signals(trainable) -> {name: float}` of the loop's state, as
  a metrics row of its own (`{"step", **signals}`). It reads the state and never changes it (issue #20's live
  audit signals, `study/audit/monitor.py`); it waits for the step it reads."""

  def __init__(self, log: metrics_log.MetricsLog, every: int, signals: Callable[[Any], dict[str, float]]):
    self.log, self.every, self.signals, self.last = log, every, signals, None

  def _row(self, loop: Loop, step: int) -> None:
    self.log.write({"step": step, **self.signals(loop.state["trainable"])})
    self.last = step

  def on_start(self, loop: Loop) -> None:
    if loop.start == 0:
      self._row(loop, 0)
    else:  # a resumed run has its row of this step already; the signals still see the state (a stateful monitor)
      self.signals(loop.state["trainable"])
      self.last = loop.start

  def on_step(self, loop: Loop, step: int, metrics: Metrics) -> None:
    if step % self.every == 0 or step == loop.total:
      self._row(loop, step)

  def on_end(self, loop: Loop) -> None:
    if loop.step != self.last:  # a stop between monitor points
      self._row(loop, loop.step)


class StopOnSignal(Hook):
  """SIGTERM/SIGINT (`checkpoint.StopRequest`) end the loop after the current step (the other hooks' `on_end`: the
  metrics logged, the state saved) and raise `checkpoint.Interrupted`; `note` ends its message.

  The raise is in `on_end`, which runs last of all hooks' (this hook is last), so a signal that comes during the last
  step or the other hooks' final work (the last checkpoint) stops the job too, instead of being spent while the job
  goes on to its next stage.
  """

  def __init__(self, note: str = ""):
    self.note, self.stop = note, None

  def on_start(self, loop: Loop) -> None:
    self.stop = checkpoint.StopRequest().__enter__()

  def on_step(self, loop: Loop, step: int, metrics: Metrics) -> None:
    if self.stop.requested is not None:
      loop.end()  # raises, from `on_end`

  def on_end(self, loop: Loop) -> None:
    if self.stop.requested is not None:
      where = (f"the last step ({loop.step} of {loop.total})" if loop.step == loop.total
               else f"step {loop.step} of {loop.total}")
      raise checkpoint.Interrupted(f"stopped by signal {self.stop.requested} after {where}{self.note}")

  def close(self) -> None:
    if self.stop is not None:
      self.stop.__exit__(None, None, None)
