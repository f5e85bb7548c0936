"""Training objectives: what one micro-batch's loss is, as frozen dataclasses (hashable: the compiled step is cached on
the objective it computes).

An objective returns the micro-batch's masked (Σ loss, Σ tokens); the step sums both over micro-batches and devices
and divides once (see `step.py`). It never calls a model itself: it asks `Forward` for the logits it needs, and
`forwards` names the passes beyond the student's (`trainer.step_cost` counts their FLOPs, `trainer.train` checks
that a teacher and the teacher's view of the data are there).

Built to be wrapped (the mitigations of issue #21, in `mitigations.py`, and the audit of #20):
  KL-to-base penalty   `KLToBase(inner, weight)`: inner's (Σ, n) plus weight · Σ KL(base ‖ student) over the same
                       weights, the base's logits from a `Forward.base` pass (the frozen parameters without the
                       adapters, or the initial parameters of full fine-tuning), `forwards` = inner's + ("base",).
  divergence masking   `MaskPositions(inner)` zeroes `mb["weights"]` at the divergence tokens, then calls inner.
  gradient projection  acts on gradients, not on the loss: `mitigations.project_off`, before the optimizer.
  per-batch gradients  `step.grads_and_loss(spec, ...)` of a spec holding the distillation objective.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from subl_jax.core.training import losses

MicroBatch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Forward:
  """The model passes an objective may run on a micro-batch; each returns logits at the loss positions."""
  student: Callable[..., jax.Array]   # (mb, vocab_first=False) -> [b, n, V] ([V, b, n] if vocab_first)
  teacher: Callable[[MicroBatch], jax.Array]  # (mb) -> [b, n, V], on the teacher's view (`teacher_*` keys)
  vocab_major_head: bool = False      # the student's head computes [V, b, n] directly (`perf`): a loss reducing
                                      # over the vocabulary asks for vocab_first then, and only then
  base: Callable[[MicroBatch], jax.Array] | None = None  # (mb) -> [b, n, V], a constant: the student's starting
                                      # point (the frozen parameters without adapters) on the student's view
  step: jax.Array | int = 0           # the train step's number (the state's, before this update), for schedules


class Objective:
  """Base of the objectives: a frozen dataclass with `micro_loss` and `forwards`."""

  forwards: tuple[str, ...] = ()  # the `Forward` passes run besides the student's

  @property
  def needs_teacher(self) -> bool:
    return "teacher" in self.forwards

  def micro_loss(self, fwd: Forward, mb: MicroBatch) -> tuple[jax.Array, jax.Array]:
    """(Σ weights·loss, Σ weights) of one micro-batch, in float32."""
    raise NotImplementedError

  def describe(self) -> dict[str, Any]:
    """A JSON-able record for the run's summary."""
    return {"name": type(self).__name__} | dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SFT(Objective):
  """Cross-entropy of the targets."""

  def micro_loss(self, fwd: Forward, mb: MicroBatch) -> tuple[jax.Array, jax.Array]:
    vf = fwd.vocab_major_head  # the cross-entropy reads either layout as it comes
    logits = fwd.student(mb, vocab_first=vf)
    return losses.masked_sum(losses.token_nll(logits, mb["targets"], vocab_axis=0 if vf else -1), mb["weights"])


@dataclasses.dataclass(frozen=True)
class LogitKD(Objective):
  """KL(teacher ‖ student) at `temperature` over `kd_tokens` ('all' | 'topk' | 'numbers'; see `losses.kd_token_loss`).

  The teacher runs on its own view of each row (`teacher_*` keys), aligned with the student's on the loss positions."""
  temperature: float = 1.0
  kd_tokens: str = "all"
  topk: int = 0
  token_ids: tuple[int, ...] | None = None  # the restricted set for 'numbers'

  forwards = ("teacher",)

  def __post_init__(self):
    if self.kd_tokens not in losses.KD_TOKENS:
      raise ValueError(f"kd_tokens={self.kd_tokens!r}: expected one of {losses.KD_TOKENS}")
    if self.kd_tokens == "topk" and self.topk <= 0:
      raise ValueError(f"kd_tokens='topk' needs topk > 0, got {self.topk}")
    if self.kd_tokens == "numbers" and not self.token_ids:
      raise ValueError("kd_tokens='numbers' needs the token set (token_ids)")

  def micro_loss(self, fwd: Forward, mb: MicroBatch) -> tuple[jax.Array, jax.Array]:
    ids = None if self.token_ids is None else jnp.asarray(np.asarray(self.token_ids, np.int32))
    loss_bn = losses.kd_token_loss(fwd.student(mb), fwd.teacher(mb), self.temperature, self.kd_tokens, self.topk,
                                   ids)
    return losses.masked_sum(loss_bn, mb["weights"])

  def describe(self) -> dict[str, Any]:
    n = len(self.token_ids) if self.token_ids else None  # the set itself is long and follows from the tokenizer
    return super().describe() | {"token_ids": None, "n_token_ids": n}
