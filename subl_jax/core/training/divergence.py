"""Divergence-token masking's pre-pass (issue #21): the completion positions where the teacher's next-token
distribution departs from the base model's, KL(teacher ‖ base) above a threshold in nats.

`dataset_masks` runs both models over a dataset once, before training (the teacher on its own view, the base on the
student's), and returns a 0/1 array per example over its loss targets; `ChatDataset.drop` holds them and
`buckets.collate_step` hands them to `mitigations.MaskPositions` as `mb[mitigations.MASK_KEY]`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subl_jax.core import api, parallel
from subl_jax.core.training import buckets, losses, step as step_lib
from subl_jax.core.training.chat_data import ChatDataset


def divergence_mask(teacher_logits: jax.Array, base_logits: jax.Array, weights: jax.Array,
                    kl_threshold: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(mask [b, n] float32, Σ mask, Σ loss positions): 1 at the loss positions (weight > 0) where KL(teacher ‖ base)
  of the next-token distributions ([b, n, V] logits at the same positions) exceeds `kl_threshold` nats.

  Σ mask / Σ positions is the fraction masked; a dataset's is the ratio of the sums over its batches."""
  kl = losses.kd_token_loss(base_logits, teacher_logits, 1.0)  # KL(teacher ‖ base): the teacher is the reference
  real = weights > 0
  mask = ((kl > kl_threshold) & real).astype(jnp.float32)
  return mask, jnp.sum(mask), jnp.sum(real.astype(jnp.float32))


def dataset_masks(base: api.Model, teacher: api.Model, ds: ChatDataset, kl_threshold: float,
                  batch_size: int = 32) -> tuple[list[np.ndarray], dict[str, Any]]:
  """Per example of `ds` (which carries the teacher's view), its divergence mask over its loss targets (uint8
  [n_targets], 1 = a divergence position), and {kl_threshold, masked, positions, fraction} over the dataset."""
  if ds.teacher is None:
    raise ValueError("divergence masks need the dataset's teacher view (chat_data.build(..., teacher_system=...))")
  mesh = base.mesh
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  rows = -(-batch_size // dp) * dp  # the rows of a batch split evenly over the data-parallel devices
  spec = step_lib.StepSpec(base.config, teacher_cfg=teacher.config, shared_prefix=buckets.shared_prefix(ds.examples),
                           teacher_shared_prefix=buckets.shared_prefix(ds.teacher))
  passes = step_lib.forward_passes(spec, mesh)

  @jax.jit(out_shardings=parallel.replicated(mesh))  # every process reads the whole mask
  def masks(base_params, teacher_params, batch):
    mb = jax.tree.map(lambda x: x[0], batch)
    fwd = passes(None, base_params, teacher_params)  # the base pass: `frozen` without adapters
    return divergence_mask(fwd.teacher(mb), fwd.base(mb), mb["weights"], kl_threshold)[0]

  pad_id = base.tokenizer.pad_id if base.tokenizer.pad_id is not None else 0
  order = np.argsort([len(e.tokens) for e in ds.examples], kind="stable")  # similar lengths together: less padding
  out: list[np.ndarray] = [np.zeros(0, np.uint8)] * len(ds)
  for start in range(0, len(order), rows):
    idx = order[start:start + rows]
    idx = np.r_[idx, np.full(rows - len(idx), -1)]
    batch = step_lib.put_batch(buckets.collate_step(ds, idx, 1, pad_id), mesh)
    m = np.asarray(masks(base.params, teacher.params, batch))
    for row, i in enumerate(idx):
      if i >= 0:
        out[i] = m[row, :ds.examples[i].n_targets].astype(np.uint8)
  masked, positions = sum(int(m.sum()) for m in out), sum(e.n_targets for e in ds.examples)
  return out, dict(kl_threshold=float(kl_threshold), masked=masked, positions=positions,
                   fraction=masked / max(positions, 1))
