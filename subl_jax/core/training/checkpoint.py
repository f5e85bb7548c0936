"""Train-state checkpoints: Orbax `CheckpointManager`, asynchronous, every N steps, on demand (SIGTERM/SIGINT).

Layout: `<dir>/<step>/state/` (the train state: `step`, `trainable` — all parameters, or only the LoRA adapters —
and `opt`, the optimizer state) and `<dir>/<step>/meta/` (JSON: epoch, step within the epoch, what is trainable).
The data order is a pure function of (seed, epoch), so the step number is all a resumed run needs to continue with
the same batches. The two newest checkpoints are kept.
"""

from __future__ import annotations

import os
import pathlib
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


@jax.jit
def _copy(tree: Any) -> Any:
  return jax.tree.map(jnp.copy, tree)


class Checkpoints:
  """Saves and restores the train state under `directory`."""

  def __init__(self, directory: str | pathlib.Path, every: int, keep: int = 2):
    self.every = every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    self.manager = ocp.CheckpointManager(
        pathlib.Path(directory).absolute(), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts an asynchronous save of `state` at `step`. The state is copied first: the train step donates its
    buffers, and the background write must not read memory the next step reuses."""
    snapshot = _copy(state)
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(snapshot),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state placed as `abstract_state`'s shardings say, meta) of checkpoint `step`."""
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             meta=ocp.args.JsonRestore()))
    return out.state, out.meta

  def saved_shapes(self, step: int) -> Any:
    """The tree of saved array metadata (shapes, dtypes) of checkpoint `step`'s state, without reading arrays."""
    return self.manager.item_metadata(step).state

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class StopRequest:
  """Turns SIGTERM/SIGINT into a flag the training loop checks after each step (then saves and stops).

  Only installed in the main thread (signal handlers cannot be set elsewhere); a second signal while a stop is
  pending falls through to the previous handler, so a stuck run can still be killed: a Python handler is called
  (SIGINT's default raises KeyboardInterrupt), an ignored signal stays ignored, and the OS default (SIGTERM's:
  terminate) is restored and the signal re-raised, so the process dies of it as it would have without us.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.requested is None:
      self.requested = signum
      return
    previous = self._previous.get(signum)
    if callable(previous):
      previous(signum, frame)
    elif previous != signal.SIG_IGN:
      # SIG_DFL, or None (a handler not set from Python): restore the default and deliver the signal again; the
      # process then ends exactly as an unhandled signal ends it (exit status -signum for a parent).
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()


class Interrupted(Exception):
  """Training stopped on a signal after saving a checkpoint; rerunning resumes from it."""
