"""Divergence-token masking's pre-pass (issue #21): the completion positions where the teacher's next-token
distribution departs from the base model's, KL(teacher ‖ base) above a threshold in nats.

`dataset_masks` runs both models over a dataset once, before training (the teacher on its own view, the base on the
student's), and returns a 0/1 array per example over its loss targets; `ChatDataset.drop` holds them and
`buckets.collate_step` hands them to `mitigations.MaskPositions` as `mb[mitigations.MASK_KEY]`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

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


@functools.lru_cache(maxsize=4)
def _logits(spec: step_lib.StepSpec, mesh: Mesh) -> Callable:
  passes = step_lib.forward_passes(spec, mesh)

  def fn(base_params, teacher_params, mb):
    fwd = passes(None, base_params, teacher_params)  # the base pass: `frozen` without adapters
    return fwd.teacher(mb), fwd.base(mb)

  return jax.jit(fn, out_shardings=parallel.replicated(mesh))  # every process reads them whole


def logits_fn(base: api.Model, teacher: api.Model, ds: ChatDataset) -> Callable:
  """jit: (base params, teacher params, micro-batch of `ds`) -> (teacher logits, base logits) [b, n, V] at the loss
  positions, the teacher on its own view; one compile per dataset shape, shared by every caller."""
  if ds.teacher is None:
    raise ValueError("divergence needs the dataset's teacher view (chat_data.build(..., teacher_system=...))")
  spec = step_lib.StepSpec(base.config, teacher_cfg=teacher.config, shared_prefix=buckets.shared_prefix(ds.examples),
                           teacher_shared_prefix=buckets.shared_prefix(ds.teacher))
  return _logits(spec, base.mesh)


def dataset_masks(base: api.Model, teacher: api.Model, ds: ChatDataset, kl_threshold: float,
                  batch_size: int = 32) -> tuple[list[np.ndarray], dict[str, Any]]:
  """Per example of `ds` (which carries the teacher's view), its divergence mask over its loss targets (uint8
  [n_targets], 1 = a divergence position), and {kl_threshold, masked, positions, fraction} over the dataset."""
  logits = logits_fn(base, teacher, ds)
  mesh = base.mesh
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  rows = -(-batch_size // dp) * dp  # the rows of a batch split evenly over the data-parallel devices

  @jax.jit
  def masks(base_params, teacher_params, batch):
    mb = jax.tree.map(lambda x: x[0], batch)
    return divergence_mask(*logits(base_params, teacher_params, mb), mb["weights"], kl_threshold)[0]

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
