"""The `sample` stage: a model (+ optional system prompt) continues N user prompts; JSONL shards of
`{"prompt", "completion", "meta"}` rows, resumable.

Prompts are split into shards of `shard_size` consecutive ids; shard i is written to `shard-<i>.jsonl.tmp` and
renamed to `shard-<i>.jsonl` when complete, so a killed run restarted in the same `.partial` directory keeps every
finished shard and redoes only the rest — no duplicates, nothing lost. With several processes, process p samples
the shards i with i % process_count == p.

Each row's random stream is named by its prompt id (see `sampling.draw`), so a completion does not depend on the
batch, shard order, process count or resume point: a resumed run writes exactly the rows an uninterrupted one
would. Within a shard, prompts are batched in order of length, which keeps left padding small.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Sequence

import jax
import numpy as np
from tqdm import tqdm

from subl_jax.study.data.shards import read_rows, shard_path, write_shard  # noqa: F401 (the stage's readers)
from subl_jax.core.sampling import constraint as constraint_lib
from subl_jax.core.sampling.generation import common_prefix_len, generate

CONSTRAINTS = ("none", "tokens", "format")


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """How to sample (the `sample` config section, minus where prompts come from)."""
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  batch_size: int = 64
  shard_size: int = 1024
  constrained: str = "none"  # one of CONSTRAINTS
  seed: int = 0


def chat_messages(system: str, prompt: str) -> list[dict[str, str]]:
  return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def build_constraint(kind: str, tokenizer: Any, vocab: int) -> constraint_lib.Constraint | None:
  if kind not in CONSTRAINTS:
    raise ValueError(f"constrained={kind!r}: expected one of {CONSTRAINTS}")
  if kind == "none":
    return None
  build = constraint_lib.token_constraint if kind == "tokens" else constraint_lib.format_constraint
  return build(tokenizer, vocab)


def _sample_shard(model, ids: Sequence[int], prompts: Sequence[str], system: str, settings: SampleSettings,
                  constraint, prefix_len: int, bar) -> list[dict]:
  tok = model.tokenizer
  encoded = {i: tok.encode_chat(chat_messages(system, prompts[i])) for i in ids}
  order = sorted(ids, key=lambda i: -len(encoded[i]))  # similar lengths batched together: little padding
  results = {}
  for start in range(0, len(order), settings.batch_size):
    batch = order[start:start + settings.batch_size]
    filler = [batch[-1]] * (settings.batch_size - len(batch))  # every batch the same shape: one compile
    seqs = [encoded[i] for i in batch + filler]
    gen = generate(model, seqs, settings.max_new_tokens, settings.temperature, settings.seed,
                   top_k=settings.top_k, top_p=settings.top_p, constraint=constraint, row_ids=batch + filler,
                   shared_prefix=min(prefix_len, common_prefix_len(seqs)))
    for j, i in enumerate(batch):
      results[i] = (gen.tokens[j], gen.logprobs[j], gen.stopped[j], len(encoded[i]))
    bar.update(len(batch), sum(len(gen.tokens[j]) + gen.stopped[j] for j in range(len(batch))))
  rows = []
  for i in ids:
    tokens, logprobs, stopped, n_prompt = results[i]
    rows.append({"prompt": prompts[i], "completion": tok.decode(tokens, skip_special_tokens=False),
                 "meta": {"id": i, "n_prompt_tokens": n_prompt, "n_tokens": len(tokens), "stopped": stopped,
                          "logprob": float(np.sum(logprobs, dtype=np.float64))}})
  return rows


class _Progress:
  """A tqdm bar over prompts that also shows new tokens per second."""

  def __init__(self, total: int, done: int, enabled: bool):
    self.bar = tqdm(total=total, initial=done, unit="prompt", disable=not enabled, dynamic_ncols=True)
    self.t0, self.tokens = time.time(), 0

  def update(self, n_prompts: int, n_tokens: int) -> None:
    self.tokens += n_tokens
    self.bar.update(n_prompts)
    self.bar.set_postfix(tokens_per_s=f"{self.tokens / max(time.time() - self.t0, 1e-9):.0f}")

  def close(self) -> None:
    self.bar.close()


def sample_stage(out_dir: str | pathlib.Path, model: Any, prompts: Sequence[str], system: str,
                 settings: SampleSettings, progress: bool = True) -> dict:
  """Samples one completion per prompt into `out_dir`'s shards (keeping finished ones); returns a summary."""
  out_dir = pathlib.Path(out_dir)
  tok = model.tokenizer
  constraint = build_constraint(settings.constrained, tok, model.config.vocab_size)
  # The tokens every prompt shares: the chat template and system prompt up to the user's text.
  prefix_len = common_prefix_len([tok.encode_chat(chat_messages(system, p)) for p in ("0", "1")])
  n = len(prompts)
  n_shards = -(-n // settings.shard_size)
  mine = [s for s in range(n_shards) if s % jax.process_count() == jax.process_index()]
  todo = [s for s in mine if not shard_path(out_dir, s).exists()]
  size = lambda s: min(n, (s + 1) * settings.shard_size) - s * settings.shard_size
  bar = _Progress(sum(size(s) for s in mine), sum(size(s) for s in mine if s not in todo),
                  progress and jax.process_index() == 0)
  t0 = time.time()
  for s in todo:
    ids = list(range(s * settings.shard_size, s * settings.shard_size + size(s)))
    write_shard(shard_path(out_dir, s), _sample_shard(model, ids, prompts, system, settings, constraint,
                                                      prefix_len, bar))
  bar.close()
  wall = time.time() - t0
  if jax.process_count() > 1:  # the summary counts every process's shards
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("sample:shards")
  rows = read_rows(out_dir)
  if sorted(r["meta"]["id"] for r in rows) != list(range(n)):
    raise RuntimeError(f"{out_dir}: the shards do not hold exactly prompts 0..{n - 1}")
  new_tokens = sum(r["meta"]["n_tokens"] + r["meta"]["stopped"] for r in rows)
  return {"n_rows": len(rows), "n_shards": n_shards, "shards_sampled_now": len(todo),
          "new_tokens": new_tokens, "hit_max_new_tokens": sum(not r["meta"]["stopped"] for r in rows),
          "sampling_s": round(wall, 2), "shared_prefix_tokens": prefix_len}
