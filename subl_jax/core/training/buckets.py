"""Deterministic, length-bucketed batches: each (seed, epoch) gives the same steps, so a resumed run sees the same data.

An epoch is a permutation of the examples (numpy PCG64 seeded with (seed, epoch)), cut into windows of
`WINDOW` steps; inside a window examples are sorted by length and cut into steps, and the steps of the epoch are then
shuffled. So a step holds examples of similar length (little padding) while the order stays random. A step's arrays
are padded only to its own longest sequence, rounded up to a multiple of `LENGTH_BUCKET` (a handful of compiled
shapes per run). The last step of an epoch is filled with empty rows (weight 0) so every step has the same batch size.

Arrays of a step ([accum, micro, ...], right-padded):
  tokens, positions, kv_mask  [A, M, T]  inputs (the sequence without its last token), key mask (1 = real token)
  logit_idx, targets, weights [A, M, N]  the input positions whose next token is a target, that token, and 1/0
With a teacher view (distillation) the same keys prefixed `teacher_`, aligned on the N axis; with per-example
loss masks (`ChatDataset.drop`) also `mitigation_mask` [A, M, N] (1 = leave the position out, `MaskPositions`).

Rows that all begin with the same tokens (the chat template's system turn: 24 of SmolLM2's ~150-token number
examples) have that prefix run once per step (`shared_prefix`, the model's `shared_prefix`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from subl_jax.core.sampling.generation import common_prefix_len
from subl_jax.core.training.chat_data import ChatDataset, Example
from subl_jax.core.training.mitigations import MASK_KEY

WINDOW = 32          # steps per sort window
LENGTH_BUCKET = 8    # T and N are rounded up to a multiple of this


def _round_up(x: int, k: int) -> int:
  return max(k, -(-x // k) * k)


def epoch_steps(lengths: Sequence[int], global_batch: int, seed: int, epoch: int) -> list[np.ndarray]:
  """The example indices of every step of `epoch` ([global_batch] each; -1 marks an empty filler row)."""
  lengths = np.asarray(lengths)
  rng = np.random.default_rng([seed, epoch])
  perm = rng.permutation(len(lengths))
  steps = []
  for start in range(0, len(perm), WINDOW * global_batch):
    chunk = perm[start:start + WINDOW * global_batch]
    chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
    steps += [chunk[i:i + global_batch] for i in range(0, len(chunk), global_batch)]
  steps = [steps[i] for i in rng.permutation(len(steps))]
  return [np.pad(s, (0, global_batch - len(s)), constant_values=-1) for s in steps]


def shared_prefix(examples: Sequence[Example]) -> int:
  """Leading input tokens every example shares before its first loss position: the prefix a step runs once.

  0 when shorter than one length bucket (it would save less than a step's padding)."""
  if not examples:
    return 0
  first_logit = min(int(np.argmax(e.mask[1:])) for e in examples)  # input j predicts token j + 1
  p = min(common_prefix_len([e.tokens[:-1] for e in examples]), first_logit)
  return p if p >= LENGTH_BUCKET else 0


def _collate(examples: Sequence[Example | None], n: int, pad_id: int) -> dict[str, np.ndarray]:
  """Right-padded arrays of examples (None = an empty row); N is given so teacher and student views align."""
  b = len(examples)
  t = _round_up(max((len(e.tokens) - 1 for e in examples if e is not None), default=1), LENGTH_BUCKET)
  out = dict(tokens=np.full((b, t), pad_id, np.int32), positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)),
             kv_mask=np.zeros((b, t), np.int32), logit_idx=np.zeros((b, n), np.int32),
             targets=np.zeros((b, n), np.int32), weights=np.zeros((b, n), np.float32))
  for i, e in enumerate(examples):
    if e is None:
      continue
    inputs = e.tokens[:-1]
    out["tokens"][i, :len(inputs)] = inputs
    out["kv_mask"][i, :len(inputs)] = 1
    idx = np.nonzero(e.mask[1:])[0]  # input position j predicts token j + 1
    out["logit_idx"][i, :len(idx)] = idx
    out["targets"][i, :len(idx)] = e.tokens[idx + 1]
    out["weights"][i, :len(idx)] = 1.0
  return out


def collate_step(ds: ChatDataset, idx: np.ndarray, accum: int, pad_id: int) -> dict[str, np.ndarray]:
  """The arrays of one step ([accum, global_batch // accum, ...]) for example indices `idx` (-1 = empty row)."""
  pick = lambda pool: [pool[i] if i >= 0 else None for i in idx]
  student = pick(ds.examples)
  n = _round_up(max((e.n_targets for e in student if e is not None), default=1), LENGTH_BUCKET)
  arrays = _collate(student, n, pad_id)
  if ds.teacher is not None:
    arrays.update({f"teacher_{k}": v for k, v in _collate(pick(ds.teacher), n, pad_id).items()})
  if ds.drop is not None:
    drop = np.zeros((len(idx), n), np.float32)
    for row, d in enumerate(pick(ds.drop)):
      if d is not None:
        drop[row, :len(d)] = d
    arrays[MASK_KEY] = drop
  return {k: v.reshape((accum, len(idx) // accum) + v.shape[1:]) for k, v in arrays.items()}


def padding_stats(ds: ChatDataset, steps: Sequence[np.ndarray]) -> dict[str, float]:
  """Real and padded input tokens over `steps` (how much compute padding costs)."""
  real = padded = 0
  for idx in steps:
    lens = [len(ds.examples[i].tokens) - 1 for i in idx if i >= 0]
    real += sum(lens)
    padded += len(idx) * _round_up(max(lens, default=1), LENGTH_BUCKET)
  return dict(real_tokens=real, padded_tokens=padded, padding_fraction=1 - real / max(padded, 1))
