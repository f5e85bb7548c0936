"""Mitigations of subliminal transfer (issue #21), as student-stage options composable with any objective.

  KLToBase(inner, weight, until_step)  inner's loss plus weight · Σ_w KL(base ‖ student) at the loss positions: the
                                       base is the student's starting point (`Forward.base`: the frozen parameters
                                       without adapters for LoRA, the initial parameters for full fine-tuning).
  MaskPositions(inner)                 inner's loss without the positions `mb[MASK_KEY]` marks (1 = drop): the
                                       divergence tokens, found before training (`divergence.py`: teacher vs base,
                                       KL above a threshold).
  project_off(grads, direction)        the gradient without its component along the trait direction d
                                       (∇ log P(trait)) when the descent step −g would raise the trait; the step
                                       applies it to the gradient entering the optimizer (`StepSpec.project`
                                       'gradient'), `project_off_transform` is the same as an optax transform.
  project_update_off(updates, d)       the optimizer's update without its component along d, whatever its sign
                                       (`StepSpec.project` 'update'): the step leaves log P(trait) unchanged to
                                       first order, neither raised nor lowered.

Shuffling the numbers (within or across responses) is a data stage: `subl_jax/study/data/shuffle.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from subl_jax.core.training import losses
from subl_jax.core.training.objectives import Forward, MicroBatch, Objective

def parts(spec: str) -> list[str]:
  """The mitigations composed in one config value, joined by '+' ('mask+kl_base' -> ['mask', 'kl_base'])."""
  return [p.strip() for p in spec.split("+") if p.strip()]


MASK_KEY = "mitigation_mask"  # [b, n] in a micro-batch: 1 = drop this loss position (`MaskPositions`)


@dataclasses.dataclass(frozen=True)
class KLToBase(Objective):
  """inner's (Σ loss, Σ tokens) plus weight · Σ_w KL(base ‖ student) over the same loss weights (full vocabulary,
  temperature 1); `until_step` > 0 applies the penalty only at steps < until_step (`Forward.step`).

  The penalty reuses the student's logits of inner's pass (one student forward either way). Weight 0 runs no base
  pass and is the inner objective exactly. The weights are the micro-batch's as this wrapper gets it: inside
  `MaskPositions` the masked positions leave the penalty too, outside it they stay in it."""
  inner: Objective
  weight: float
  until_step: int = 0

  def __post_init__(self):
    if self.weight < 0:
      raise ValueError(f"KLToBase weight={self.weight}: expected a weight >= 0")
    if self.until_step < 0:
      raise ValueError(f"KLToBase until_step={self.until_step}: expected >= 0 (0 = every step)")

  @property
  def forwards(self) -> tuple[str, ...]:
    return self.inner.forwards + (("base",) if self.weight else ())

  def micro_loss(self, fwd: Forward, mb: MicroBatch) -> tuple[jax.Array, jax.Array]:
    if not self.weight:
      return self.inner.micro_loss(fwd, mb)
    seen: dict[bool, jax.Array] = {}  # the student's logits inner asked for, by layout

    def student(mb, vocab_first=False):
      # the logits depend on the input keys only, which no wrapper changes (MaskPositions changes the weights)
      if vocab_first not in seen:
        seen[vocab_first] = fwd.student(mb, vocab_first=vocab_first)
      return seen[vocab_first]

    total, count = self.inner.micro_loss(dataclasses.replace(fwd, student=student), mb)
    logits = seen[False] if False in seen else jnp.moveaxis(seen[True], 0, -1) if True in seen else student(mb)

    def penalty():
      return losses.masked_sum(losses.kd_token_loss(logits, fwd.base(mb), 1.0), mb["weights"])[0]

    if self.until_step:  # past the schedule the base pass does not run at all
      kl = jax.lax.cond(fwd.step < self.until_step, penalty, lambda: jnp.zeros((), jnp.float32))
    else:
      kl = penalty()
    return total + self.weight * kl, count

  def describe(self) -> dict[str, Any]:
    return dict(name="KLToBase", weight=self.weight, until_step=self.until_step, inner=self.inner.describe())


@dataclasses.dataclass(frozen=True)
class MaskPositions(Objective):
  """inner's (Σ loss, Σ tokens) with the loss weights zeroed where `mb[MASK_KEY]` is 1 (divergence-token masking)."""
  inner: Objective

  @property
  def forwards(self) -> tuple[str, ...]:
    return self.inner.forwards

  def micro_loss(self, fwd: Forward, mb: MicroBatch) -> tuple[jax.Array, jax.Array]:
    keep = 1.0 - mb[MASK_KEY].astype(jnp.float32)
    return self.inner.micro_loss(fwd, {**mb, "weights": mb["weights"] * keep})

  def describe(self) -> dict[str, Any]:
    return dict(name="MaskPositions", inner=self.inner.describe())


def tree_dot(a: Any, b: Any) -> jax.Array:
  """Σ over the leaves of two same-shaped pytrees of their elementwise products, in float32."""
  return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def project_off(grads: Any, direction: Any) -> tuple[Any, jax.Array]:
  """(grads', projected): when the descent step −g raises the trait (−g·d > 0, d = ∇ log P(trait)), g' =
  g − (g·d / |d|²) d, so the step is orthogonal to d; otherwise g itself (bitwise). A zero d projects nothing."""
  gd = tree_dot(grads, direction)
  # gd < 0 is also false for d = 0 (gd = 0)
  return _remove_component(grads, direction, gd, tree_dot(direction, direction), gd < 0)


def project_update_off(updates: Any, direction: Any) -> tuple[Any, jax.Array]:
  """(updates', projected): u' = u − (u·d / |d|²) d for the parameter update u (the optimizer's output, added to the
  parameters) whatever the sign of u·d, so u'·d = 0; `projected` is false only for a zero d (u returned bitwise)."""
  dd = tree_dot(direction, direction)
  return _remove_component(updates, direction, tree_dot(updates, direction), dd, dd > 0)


def _remove_component(x: Any, direction: Any, xd: jax.Array, dd: jax.Array,
                      where: jax.Array) -> tuple[Any, jax.Array]:
  """(x − (x·d / |d|²) d where `where`, else x bitwise; `where`). `xd` = x·d, `dd` = |d|²."""
  coef = xd / jnp.where(dd > 0, dd, 1.0)
  return jax.tree.map(lambda v, d: jnp.where(where, (v - coef * d).astype(v.dtype), v), x, direction), where


def project_off_transform() -> optax.GradientTransformationExtraArgs:
  """`project_off` as an optax transform to chain before an optimizer; its `update` takes the trait direction as
  the extra argument `direction`: `optax.chain(project_off_transform(), optax.adam(lr)).update(g, s, p,
  direction=d)`."""

  def update(updates, state, params=None, *, direction, **extra):
    del params, extra
    return project_off(updates, direction)[0], state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)
