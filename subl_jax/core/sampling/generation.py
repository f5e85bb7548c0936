"""Batched generation from token-id prompts: padding, bucketing, prefix sharing, sharding and unpacking results."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from subl_jax.core import parallel
from subl_jax.core.models import transformer
from subl_jax.core.models.config import Perf
from subl_jax.core.sampling import loop
from subl_jax.core.sampling.constraint import Constraint
from subl_jax.core.sampling.draw import Knobs

BUCKET = 16  # prompt (suffix) lengths are rounded up to a multiple of this, so a run compiles a handful of shapes
MIN_SHARED_PREFIX = 16  # a common prefix shorter than this is not worth a separate batch-1 prefill


class Generation(NamedTuple):
  tokens: list[list[int]]       # new tokens per row, without the stop token
  logprobs: list[list[float]]   # the model's log-probability of each new token (at temperature 1)
  stopped: list[bool]           # True where the row ended on a stop token, False where it hit max_new_tokens


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int = BUCKET) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [b, p], mask [b, p]) with each prompt right-aligned and p rounded up to `bucket`."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("left_pad: every prompt needs at least one token")
  p = -(-max(len(x) for x in prompts) // bucket) * bucket
  tokens = np.full((len(prompts), p), pad_id, np.int32)
  mask = np.zeros((len(prompts), p), np.int32)
  for i, x in enumerate(prompts):
    tokens[i, p - len(x):] = x
    mask[i, p - len(x):] = 1
  return tokens, mask


def common_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
  """Length of the longest token prefix all prompts share, leaving every prompt at least one token of its own."""
  first, n = prompts[0], min(len(p) for p in prompts) - 1
  for p in prompts[1:]:
    n = min(n, next((i for i in range(n) if p[i] != first[i]), n))
  return max(n, 0)


def _per_row(value: Any, b: int, dtype) -> np.ndarray:
  arr = np.asarray(value, dtype)
  if arr.ndim not in (0, 1) or (arr.ndim == 1 and arr.shape[0] != b):
    raise ValueError(f"expected a scalar or one value per prompt ({b}), got shape {arr.shape}")
  return np.broadcast_to(arr, (b,)).copy()


def generate(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float | Sequence[float] = 0.0, seed: int = 0, *,
             top_k: int | Sequence[int] = 0, top_p: float | Sequence[float] = 1.0,
             constraint: Constraint | None = None, row_ids: Sequence[int] | None = None,
             shared_prefix: int | None = None, bucket: int = BUCKET, perf: Perf | None = None) -> Generation:
  """Continues each prompt (token ids) until a stop token of the model's tokenizer or `max_new_tokens`.

  temperature (0 = greedy), top_k (0 = off) and top_p (1 = off) are scalars or one value per prompt.
  `constraint`: which tokens may be drawn (format-constrained decoding, see `sampling.constraint`); the returned
  log-probabilities stay the model's own. `row_ids` (default 0..b-1) name each row's random stream:
  a prompt with the same (seed, row id) gets the same draws in any batch. `shared_prefix`: how many leading tokens
  all prompts share and are run once (None: the common prefix, rounded down to a multiple of `bucket`, if at
  least MIN_SHARED_PREFIX; 0: off). `perf`: the model's layouts (default `transformer.default_perf()`; sampling
  reads logits per row, so only its kv_layout is used).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  tok, cfg = model.tokenizer, model.config
  b = len(prompts)
  if b == 0:
    return Generation([], [], [])
  if shared_prefix is None:
    shared_prefix = common_prefix_len(prompts) // bucket * bucket
    shared_prefix = shared_prefix if shared_prefix >= MIN_SHARED_PREFIX else 0
  elif not 0 <= shared_prefix <= common_prefix_len(prompts):
    raise ValueError(f"shared_prefix={shared_prefix}: the prompts share only {common_prefix_len(prompts)} leading "
                     "tokens (and each needs one of its own)")
  prefix = np.asarray(prompts[0][:shared_prefix], np.int32)
  suffixes = [p[shared_prefix:] for p in prompts]
  ids = np.arange(b) if row_ids is None else np.asarray(row_ids)
  if ids.shape != (b,):
    raise ValueError(f"row_ids: expected {b} ids, got shape {ids.shape}")
  knobs = [_per_row(temperature, b, np.float32), _per_row(top_k, b, np.int32), _per_row(top_p, b, np.float32)]
  if (knobs[0] < 0).any() or (knobs[1] < 0).any() or ((knobs[2] <= 0) | (knobs[2] > 1)).any():
    raise ValueError("expected temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
  if constraint is not None and np.shape(constraint.index) != (cfg.vocab_size,):
    raise ValueError(f"constraint: built for a vocabulary of {np.shape(constraint.index)[0]}, the model has "
                     f"{cfg.vocab_size}")
  stop_ids = np.asarray(sorted(tok.stop_ids), np.int32)

  # Pad the batch to a multiple of the devices it is split over (extra rows repeat row 0 and are dropped).
  mesh = model.mesh
  split = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
  extra = -b % split
  suffixes = list(suffixes) + [suffixes[0]] * extra
  ids = np.concatenate([ids, np.repeat(ids[:1], extra)]).astype(np.int32)
  knobs = [np.concatenate([k, np.repeat(k[:1], extra)]) for k in knobs]
  tokens, mask = left_pad(suffixes, tok.pad_id if tok.pad_id is not None else 0, bucket)

  batch = parallel.named_sharding(mesh, ("batch", "length"), tokens.shape)
  per_row = parallel.named_sharding(mesh, ("batch",), (tokens.shape[0],))
  rep = parallel.replicated(mesh)
  rows = loop.Rows(jax.device_put(ids, per_row), Knobs(*(jax.device_put(k, per_row) for k in knobs)),
                   None if constraint is None else Constraint(*(jax.device_put(x, rep) for x in constraint)),
                   jax.device_put(stop_ids, rep),
                   jax.device_put(jax.random.key(seed), rep))
  perf = (transformer.default_perf() if perf is None else perf).replace(vocab_major_head=False)
  module = transformer.Transformer(cfg, mesh=mesh, perf=perf)
  state = loop.prefill(module, model.params, jax.device_put(prefix, rep), jax.device_put(tokens, batch),
                       jax.device_put(mask, batch), rows, max_new_tokens)
  state = loop.decode(module, model.params, state, rows)
  out, logprobs, n_new, done = (np.asarray(x)[:b] for x in (state.out, state.logprobs, state.n_new, state.done))
  lengths = n_new - done  # without the stop token
  return Generation([row[:n].tolist() for row, n in zip(out, lengths)],
                    [row[:n].tolist() for row, n in zip(logprobs, lengths)], [bool(d) for d in done])
