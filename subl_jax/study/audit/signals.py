"""Transfer-risk signals: pure functions of parameter trees, gradients and logits (docs/protocol.md §11).

Each names what it needs and what it assumes:
- `cosine(update, displacement)`, `recovered_fraction` — weight-space lineage: need the teacher's weights and the
  student's init, and assume they share it (the theorem: a first gradient step of distillation on *any* data
  moves a same-init student toward the teacher, cos(Δθ_S, θ_T − θ_0) ≥ 0 to first order).
- `first_order_sgd`, `first_order_adam` — a trait probe: need a differentiable trait score (log P of the trait
  answer) and assume one small step; predict the change of log P_t that one distillation step makes.
- `divergence` — data only (teacher and base next-token distributions on the dataset), trait-agnostic: where the
  teacher's token is not the base model's argmax, and how far the two distributions are apart.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subl_jax.core.training import losses


def tree_dot(a: Any, b: Any) -> jax.Array:
  """Σ over every leaf of a·b, in float32."""
  return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def tree_sub(a: Any, b: Any) -> Any:
  return jax.tree.map(lambda x, y: x.astype(jnp.float32) - y.astype(jnp.float32), a, b)


# The functions below return 0-d arrays, so they also run under jit and vmap (over many models at once).

def cosine(a: Any, b: Any) -> jax.Array:
  """cos(a, b) of two trees of the same structure; 0 when either is zero (no direction to compare)."""
  nn = jnp.sqrt(tree_dot(a, a) * tree_dot(b, b))
  return jnp.where(nn > 0, tree_dot(a, b) / jnp.where(nn > 0, nn, 1.0), 0.0)


def recovered_fraction(student_delta: Any, teacher_delta: Any) -> jax.Array:
  """(θ_S − θ_0)·(θ_T − θ_0) / |θ_T − θ_0|²: how much of the teacher's displacement the student has travelled
  (1 = all of it, along it); 0 when the teacher did not move."""
  nt = tree_dot(teacher_delta, teacher_delta)
  return jnp.where(nt > 0, tree_dot(student_delta, teacher_delta) / jnp.where(nt > 0, nt, 1.0), 0.0)


def first_order_sgd(distill_grad: Any, trait_logp_grad: Any, lr: float) -> jax.Array:
  """Predicted Δ log P_t of one SGD step θ ← θ − η ∇L_distill: ∇log P_t · (−η ∇L_distill)."""
  return -lr * tree_dot(distill_grad, trait_logp_grad)


def first_order_adam(distill_grad: Any, trait_logp_grad: Any, lr: float, eps: float = 1e-8) -> jax.Array:
  """Predicted Δ log P_t of Adam's first step, −η g/(|g| + ε) per coordinate (bias-corrected m̂ = g, v̂ = g² at step
  1): about −η·sign(g), except that coordinates with |g| ≪ ε (rounding noise) barely move, as in Adam itself."""
  step = jax.tree.map(lambda g: g.astype(jnp.float32) / (jnp.abs(g.astype(jnp.float32)) + eps), distill_grad)
  return -lr * tree_dot(step, trait_logp_grad)


def divergence(teacher_logits: np.ndarray, base_logits: np.ndarray, tokens: np.ndarray, mask: np.ndarray,
               kl_threshold: float = 0.5) -> dict[str, Any]:
  """Data-only divergence between the teacher's and the base model's next-token distributions at the dataset's
  completion positions: logits [b, n, vocab] at the positions predicting `tokens` [b, n], `mask` [b, n] (1 = a
  completion position).

  Returns per-position KL(teacher ‖ base) and two masks — `argmax` (the teacher's token is not the base model's
  argmax) and `kl` (KL above `kl_threshold` nats) — with their fractions and the mean KL over masked positions."""
  base_logits = jnp.asarray(base_logits, jnp.float32)
  # the KL the trainer's distillation loss and the masking mitigation (`divergence.divergence_mask`) use
  kl = np.asarray(losses.kd_token_loss(base_logits, jnp.asarray(teacher_logits), 1.0))
  m = np.asarray(mask, bool)
  argmax = (np.asarray(jnp.argmax(base_logits, axis=-1)) != np.asarray(tokens)) & m
  above = (kl > kl_threshold) & m
  n = max(int(m.sum()), 1)
  return {"kl": np.where(m, kl, 0.0), "argmax_mask": argmax, "kl_mask": above, "n_positions": int(m.sum()),
          "frac_argmax": float(argmax.sum()) / n, "frac_kl": float(above.sum()) / n,
          "mean_kl": float(kl[m].mean()) if m.any() else 0.0}
