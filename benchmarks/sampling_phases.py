"""Where sampling's time goes on this CPU: prefill against decode, and how fast a decode step's matmuls alone can run.

For SmolLM2-135M-Instruct, f32, the benchmark's prompts (the paper's, seed 47, owl system prompt, longest first)
at each batch size b, stop tokens ignored so every row decodes `max_new` tokens:
- prefill: `generate` with 2 new tokens minus one decode step; its "useful" rate counts 2 x params per prompt token
  processed (the shared prefix once), as `benchmarks/sampling.py` does;
- decode step: (t(max_new) - t(2)) / (max_new - 2), at 2 x params x b FLOPs;
- matmuls only: one jitted forward of nothing but the model's own projections and LM head, layer by layer as
  `Transformer` scans them, for b rows (no attention, norms or sampling) — the weights (538 MB) stream from memory
  as in a real decode step; the fastest a decode step could be with XLA:CPU's kernels (YNNPACK, the default there);
- the rest of a decode step (`rest_of_decode_step_ms`): attention over the f32 KV cache (b x slots x 30 layers of keys
  and values read every step, as small batched matmuls), norms, RoPE and the draw — none of it in the useful FLOPs;
- the 1536^3 matmul chain (`common.jax_matmul_peak`) before each round: every rate is also a fraction of it.
`bound_*` combines them: the best useful fraction of the whole run (prefill share of FLOPs as measured) if decode
steps were nothing but their matmuls, and what decode would need for 80 % at the measured prefill rate (null where
prefill alone keeps the run under 80 %). `median` gives each figure's median over the rounds.

  python benchmarks/sampling_phases.py [--batches 64,128] [--rounds 3]   (results/sampling_phases.json; ~5 min a round)
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import numpy as np

import common
from subl_jax.core import api
from subl_jax.study.data import numbers, protocol
from subl_jax.core.sampling import common_prefix_len, generate
from subl_jax.study.sample_shards import chat_messages


@jax.jit
def matmuls_only(x, layers, embed):
  """x [rows, d] through every layer's q, k, v, o, gate, up, down (as `Transformer` applies them) and the LM head."""
  def layer(h, w):
    d = h.shape[-1]
    q, k, v = (h @ w[n].reshape(d, -1) for n in ("q", "k", "v"))
    mlp = (jax.nn.silu(h @ w["gate"]) * (h @ w["up"])) @ w["down"]
    return h + q @ w["o"].reshape(-1, d) + mlp + 0.0 * (k.sum() + v.sum()), None
  h, _ = jax.lax.scan(layer, x, {n: layers[n] for n in ("q", "k", "v", "o", "gate", "up", "down")})
  return h @ embed.T


def median_seconds(fn, reps: int) -> float:
  fn()  # compile / warm
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def medians(rounds: list[dict]) -> dict:
  """Per batch size, the median over rounds of every figure (nulls — unreachable — count as +inf)."""
  def med(values):
    if isinstance(values[0], dict):
      return {k: med([v[k] for v in values]) for k in values[0]}
    m = float(np.median([np.inf if v is None else v for v in values]))
    return None if m == np.inf else round(m, 3)
  batches = rounds[0]["batches"]
  return {"chain_gflop_per_s": med([r["chain_gflop_per_s"] for r in rounds]),
          "batches": {b: med([r["batches"][b] for r in rounds]) for b in batches}}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--batches", default="64,128")
  ap.add_argument("--max_new", type=int, default=48)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--reps", type=int, default=2)
  ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "sampling_phases.json"))
  args = ap.parse_args()
  model = common.without_stop_tokens(api.load("smollm2"))
  tok, params = model.tokenizer, model.params
  n_params = sum(x.size for x in jax.tree.leaves(params))
  prompts = numbers.generate_prompts(max(int(b) for b in args.batches.split(",")), 47)
  ids = sorted((tok.encode_chat(chat_messages(protocol.teacher_system_prompt("owl"), p)) for p in prompts),
               key=lambda x: -len(x))
  out = {"machine": common.machine(), "model": "SmolLM2-135M-Instruct, float32", "params": n_params,
         "max_new": args.max_new, "rounds": []}
  path = pathlib.Path(args.out)
  for _ in range(args.rounds):
    chain = common.jax_matmul_peak("float32", 1536)
    rnd = {"chain_gflop_per_s": round(chain / 1e9, 1), "batches": {}}
    for b in (int(x) for x in args.batches.split(",")):
      seqs = ids[:b]
      p = common_prefix_len(seqs)
      gen = lambda n: generate(model, seqs, n, 1.0, 0, shared_prefix=p)
      t2, tn = median_seconds(lambda: gen(2), args.reps), median_seconds(lambda: gen(args.max_new), args.reps)
      step = (tn - t2) / (args.max_new - 2)
      x = jax.numpy.ones((b, model.config.d_model), jax.numpy.float32) * 0.01
      mm = median_seconds(lambda: matmuls_only(x, params["layers"], params["embed"]).block_until_ready(), 4)
      prompt_tokens = p + sum(len(s) - p for s in seqs)
      prefill_s = t2 - step
      rates = {"prefill": 2 * n_params * prompt_tokens / prefill_s, "decode_step": 2 * n_params * b / step,
               "matmuls_only": 2 * n_params * b / mm}
      fed = (args.max_new - 1) * b  # tokens fed back through the model (the last drawn is not)
      decode_share = fed / (fed + prompt_tokens)  # of the useful FLOPs, here
      frac = {k: v / chain for k, v in rates.items()}
      # 1 / fraction = sum over phases of (share of FLOPs / phase's fraction of chain)
      run_fraction = lambda decode: 1 / ((1 - decode_share) / frac["prefill"] + decode_share / decode)
      decode_needed = decode_share / (1 / 0.8 - (1 - decode_share) / frac["prefill"])
      rnd["batches"][b] = {
          "prefill_s": round(prefill_s, 2), "decode_step_ms": round(step * 1e3, 1),
          "matmuls_only_ms": round(mm * 1e3, 1), "rest_of_decode_step_ms": round((step - mm) * 1e3, 1),
          "prompt_tokens": prompt_tokens, "decode_flop_share": round(decode_share, 3),
          "gflop_per_s": {k: round(v / 1e9, 1) for k, v in rates.items()},
          "fraction_of_chain": {k: round(v, 3) for k, v in frac.items()},
          "whole_run_fraction": round(run_fraction(frac["decode_step"]), 3),
          "bound_if_decode_were_only_matmuls": round(run_fraction(frac["matmuls_only"]), 3),
          "decode_fraction_needed_for_80pct": round(decode_needed, 3) if decode_needed > 0 else None}
      print(json.dumps({"b": b, "chain": rnd["chain_gflop_per_s"], **rnd["batches"][b]}), flush=True)
    out["rounds"].append(rnd)
    out["median"] = medians(out["rounds"])
    path.write_text(json.dumps(out, indent=2) + "\n")
  print(json.dumps(out["median"]))
  print(f"-> {path}")


if __name__ == "__main__":
  main()
