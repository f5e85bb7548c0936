"""The host loop every training run uses: steps, and hooks around them (the LLM trainer's in `hooks.py`).

`run_loop(state, start, total, step_fn, hooks)` calls `state, metrics = step_fn(step, state)` for steps
start..total-1. Nothing waits on the device unless a hook asks: `loop.fetch()` brings the metrics of every step
since the last fetch to the host and hands them to each hook's `on_metrics` in hook order, so a check placed first
(the finite-loss guard) raises before a later hook logs them, and a hook that fetches before it writes (metrics,
checkpoints) never writes what the check refused.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

Metrics = dict[str, Any]  # one step's metrics: device arrays, and host numbers the step function adds


class Hook:
  """Callbacks of a loop; every one is optional. Hooks run in list order."""

  def on_start(self, loop: "Loop") -> None:
    """Before the first step."""

  def on_step(self, loop: "Loop", step: int, metrics: Metrics) -> None:
    """After step `step` (1-based: the number of steps done) was dispatched; `loop.state` is its state. Reading a
    device array here waits for the device: use `loop.fetch()` only where the hook writes something."""

  def on_metrics(self, loop: "Loop", rows: list[tuple[int, Metrics]]) -> None:
    """The (step, host metrics) of the steps fetched since the last fetch, in step order."""

  def on_end(self, loop: "Loop") -> None:
    """After the last step, or at a stop (`Loop.end`): every metric is fetched already."""

  def close(self) -> None:
    """Always, last, in reverse order (also when a step or a hook raised): release files and threads."""


class Loop:
  """What hooks see of a running loop."""

  def __init__(self, state: Any, start: int, total: int, hooks: Sequence[Hook]):
    self.state, self.start, self.step, self.total = state, start, start, total
    self.hooks = list(hooks)
    self.metrics: Metrics | None = None  # the last step's
    self._unfetched: list[tuple[int, Metrics]] = []
    self._ended = False

  def fetch(self) -> None:
    """Brings the unfetched steps' metrics to the host (this waits for them) and hands them to every hook."""
    if not self._unfetched:
      return
    got, self._unfetched = self._unfetched, []
    rows = list(zip([s for s, _ in got], jax.device_get([m for _, m in got])))
    for hook in self.hooks:
      hook.on_metrics(self, rows)

  def end(self) -> None:
    """Fetches what is left and runs every hook's `on_end` (once): at the last step, or before a hook stops the
    loop early by raising."""
    if self._ended:
      return
    self._ended = True
    self.fetch()
    for hook in self.hooks:
      hook.on_end(self)


def run_loop(state: Any, start: int, total: int, step_fn: Callable[[int, Any], tuple[Any, Metrics]],
             hooks: Sequence[Hook] = ()) -> Loop:
  """Runs steps start..total-1 under `hooks`; returns the loop (`.state`: the final state, `.metrics`: the last
  step's)."""
  loop = Loop(state, start, total, hooks)
  try:
    for hook in loop.hooks:
      hook.on_start(loop)
    for s in range(start, total):
      loop.state, loop.metrics = step_fn(s, loop.state)
      loop.step = s + 1
      loop._unfetched.append((s + 1, loop.metrics))
      for hook in loop.hooks:
        hook.on_step(loop, s + 1, loop.metrics)
    loop.end()
  finally:
    for hook in reversed(loop.hooks):
      hook.close()
  return loop
