"""Sampling throughput: our sampler against `transformers` `generate` on SmolLM2-135M-Instruct, on this machine.

256 of the paper's prompts (seed 47) with the owl teacher's system prompt, up to 48 new tokens at temperature 1, in
batches of 64 and 128 — the same batches (prompts sorted by length) for both. Reports completions/s, new tokens/s,
useful GFLOP/s against the fp32 matmul peak measured in the same run, the filter's keep rate of free and
format-constrained samples, how many completions hit the 48-token cap, and what sharing the prompt prefix saves.

Run: `.venv/bin/python benchmarks/sampling.py` (writes benchmarks/results/sampling.json; `--quick` for a smoke run).

On an accelerator without the GGUF (benchmarks/gpu.sh): `--export_inputs DIR` (here) writes SmolLM2's tokenizer and
model config (no weights) to DIR; there `--random_weights DIR --dtype bfloat16 --batches 256,512,1024
--n_prompts 1024 --peak_n 8192` runs both sides on RANDOM weights of the same architecture (the GGUF is too large to
carry; no step's cost depends on weight values), at a fixed length (stop tokens ignored on both sides: with random
weights a stop token is an arbitrary draw), on the GPU for both (`transformers` gets a random LlamaForCausalLM of the
same config). The matmul peak is then measured in `--dtype` at `--peak_n`; the prefix-sharing A/B and the
constrained runs are skipped (keep rates mean nothing with random weights).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import jax
import numpy as np

import common
from subl_jax.core import api, flops, parallel
from subl_jax.study.data import numbers, protocol
from subl_jax.core.sampling import common_prefix_len, generate
from subl_jax.study.sample_shards import build_constraint, chat_messages


def load_avg() -> float:
  return round(os.getloadavg()[0], 2)


class Work:
  """What one pass computed that it had to: tokens through the model and (query, key) attention pairs."""

  def __init__(self):
    self.tokens = self.prefill_pairs = self.decode_pairs = self.decode_tokens = self.rows = 0

  def add_batch(self, prefix: int, lengths, n_new) -> None:
    """A batch of prompts of `lengths` whose first `prefix` tokens ran once; row r drew n_new[r] tokens."""
    tri = lambda n: n * (n + 1) // 2
    self.rows += len(lengths)
    self.tokens += prefix + sum(n - prefix for n in lengths)
    self.prefill_pairs += tri(prefix) + sum(tri(n) - tri(prefix) for n in lengths)
    for n, k in zip(lengths, n_new):  # every drawn token but a row's last is fed back, attending to all before it
      self.decode_tokens += k - 1
      self.decode_pairs += sum(n + j + 1 for j in range(k - 1))

  def literal_flops(self, params: int) -> float:
    """The brief's "2 x params x tokens actually processed"."""
    return 2.0 * params * (self.tokens + self.decode_tokens)

  def model_flops(self, cfg) -> float:
    """Matmul FLOPs the algorithm needs (subl_jax.core.flops): no padding, logits only where a token is drawn."""
    return (flops.forward_flops(cfg, self.tokens, self.prefill_pairs, n_logits=self.rows)
            + flops.forward_flops(cfg, self.decode_tokens, self.decode_pairs, n_logits=self.decode_tokens))


def summarize(name, tok, order, results, seconds, work, model, peak_now, max_new):
  """Throughput, useful FLOP/s and filter statistics of one pass (results: id -> (tokens, stopped))."""
  n = len(results)
  new_tokens = sum(len(t) + s for t, s in results.values())  # the stop token is drawn too
  params = sum(x.size for x in jax.tree.leaves(model.params))
  literal, algorithmic = work.literal_flops(params) / seconds, work.model_flops(model.config) / seconds
  texts = {i: tok.decode(t, skip_special_tokens=False) for i, (t, _) in results.items()}
  valid = {i for i, c in texts.items() if numbers.is_valid(c)}
  capped = {i for i, (_, s) in results.items() if not s}
  return {
      "name": name, "seconds": round(seconds, 2), "completions_per_s": round(n / seconds, 3),
      "new_tokens_per_s": round(new_tokens / seconds, 1), "new_tokens": new_tokens,
      "prompt_tokens_processed": work.tokens,
      "useful_gflop_per_s": round(literal / 1e9, 1), "model_gflop_per_s": round(algorithmic / 1e9, 1),
      "peak_gflop_per_s_before": round(peak_now / 1e9, 1),
      "useful_fraction_of_peak_before": round(literal / peak_now, 3),
      "keep_rate": round(len(valid) / n, 4), "hit_cap": len(capped), "hit_cap_but_valid": len(valid & capped),
      "max_new_tokens": max_new, "examples": [texts[i] for i in order[:3]],
  }


def _gen(model, ids, batch, max_new, seed, prefix, constraint=None):
  seqs = [ids[i] for i in batch]
  p = min(prefix, common_prefix_len(seqs))
  t0 = time.perf_counter()
  gen = generate(model, seqs, max_new, 1.0, seed, constraint=constraint, row_ids=batch, shared_prefix=p)
  return gen, time.perf_counter() - t0, p


def run_ours(model, ids, batches, max_new, seed, prefix_len, constraint=None, warm=True):
  """One pass over `batches`; each new batch shape is first run once untimed (compilation), if `warm`."""
  seen, warm_s, results, seconds, work = set(), 0.0, {}, 0.0, Work()
  for batch in batches:
    p = min(prefix_len, common_prefix_len([ids[i] for i in batch]))
    shape = (p, -(-max(len(ids[i]) - p for i in batch) // 16), len(batch))
    if warm and shape not in seen:
      seen.add(shape)
      warm_s += _gen(model, ids, batch, max_new, seed + 1000, prefix_len, constraint)[1]
    gen, sec, p = _gen(model, ids, batch, max_new, seed, prefix_len, constraint)
    seconds += sec
    for j, i in enumerate(batch):
      results[i] = (gen.tokens[j], gen.stopped[j])
    work.add_batch(p, [len(ids[i]) for i in batch], [len(t) + s for t, s in zip(gen.tokens, gen.stopped)])
  return results, seconds, work, warm_s


def prefix_ab(model, ids, batches, max_new, prefix_len) -> dict:
  """Seconds per batch with and without the shared prefix, interleaved so machine load hits both alike."""
  with_, without = [], []
  for k, batch in enumerate(batches):
    for p in (prefix_len, 0):  # compile both shapes first
      _gen(model, ids, batch, max_new, 2000 + k, p)
    for p, out in ((prefix_len, with_), (0, without), (0, without), (prefix_len, with_)):
      out.append(_gen(model, ids, batch, max_new, 3000 + k, p)[1])
  return {"seconds_with_sharing": round(sum(with_) / 2, 2), "seconds_without": round(sum(without) / 2, 2),
          "speedup": round(sum(without) / sum(with_), 3)}


def hf_model(args, cfg):
  """transformers' model: the GGUF (as our side loads it), or random weights of `cfg`'s shapes; on the GPU if any."""
  import torch
  import transformers
  device = common.torch_device()
  if args.random_weights:
    return common.hf_random_model(cfg, args.dtype, device).eval(), device
  from subl_jax.core.checkpoints import fetch
  p = fetch.smollm2_gguf_path()
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                         dtype=getattr(torch, args.dtype))
  return hf.to(device).eval(), device


def run_hf(hf, device, ids, batches, max_new, seed, pad_id, stop_ids, fixed_length=False):
  """One pass of `generate` over `batches`; `fixed_length`: no stop token, every row draws max_new tokens."""
  import torch
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  torch.manual_seed(seed)
  kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new, pad_token_id=pad_id)
  if fixed_length:
    stop_ids = ()  # the model's generation config names no eos (common.hf_random_model)
  else:
    kwargs["eos_token_id"] = list(stop_ids)

  def padded(seqs):
    width = max(map(len, seqs))
    inp = torch.full((len(seqs), width), pad_id)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
      inp[r, width - len(s):] = torch.tensor(s)
      att[r, width - len(s):] = 1
    return inp.to(device), att.to(device), width

  with torch.no_grad():  # warm-up
    hf.generate(input_ids=torch.tensor([ids[batches[0][0]]], device=device), max_new_tokens=2, do_sample=True,
                pad_token_id=pad_id)
    if device == "cuda":  # and the largest batch once, so the caching allocator has grown before the timed pass
      inp, att, _ = padded([ids[i] for i in batches[0]])
      hf.generate(input_ids=inp, attention_mask=att, **dict(kwargs, max_new_tokens=2))
  results, seconds, work = {}, 0.0, Work()
  for batch in batches:
    seqs = [ids[i] for i in batch]
    inp, att, width = padded(seqs)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
      out = hf.generate(input_ids=inp, attention_mask=att, **kwargs)
    sync()
    seconds += time.perf_counter() - t0
    out = out.cpu()
    if fixed_length and out.shape[1] != width + max_new:
      raise RuntimeError(f"transformers stopped early: {out.shape[1] - width} of {max_new} new tokens")
    for r, i in enumerate(batch):
      new = out[r, width:].tolist()
      end = next((k for k, t in enumerate(new) if t in stop_ids), None)
      results[i] = (new[:end], True) if end is not None else (new, False)
    work.add_batch(0, list(map(len, seqs)), [len(results[i][0]) + results[i][1] for i in batch])
  return results, seconds, work, torch.get_num_threads()


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--n_prompts", type=int, default=256)
  ap.add_argument("--max_new_tokens", type=int, default=48)
  ap.add_argument("--batches", default="64,128")
  ap.add_argument("--skip_hf", action="store_true")
  ap.add_argument("--quick", action="store_true", help="16 prompts, batch 8, 8 tokens: a smoke run")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                  help="parameters and compute, both sides; also the matmul peak's dtype")
  ap.add_argument("--peak_n", type=int, default=1536, help="matrix size of the matmul peak (8192 on a GPU)")
  ap.add_argument("--export_inputs", metavar="DIR", help="write SmolLM2's tokenizer + model config to DIR and exit")
  ap.add_argument("--random_weights", metavar="DIR",
                  help="random weights of --arch, tokenizer from DIR (--export_inputs); fixed-length generation")
  ap.add_argument("--arch", default="smollm2-135m", choices=("smollm2-135m", *common.ARCHS),
                  help="the random-weight architecture (with --random_weights)")
  ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "sampling.json"))
  args = ap.parse_args()
  if args.export_inputs:
    print(f"wrote {common.export_inputs(args.export_inputs)}")
    return
  if args.quick:
    args.n_prompts, args.batches, args.max_new_tokens = 16, "8", 8
  t_start = time.time()
  numerics = dict(dtype=args.dtype, param_dtype=args.dtype)
  fixed_length = bool(args.random_weights)
  if args.random_weights:
    tok = common.load_tokenizer(args.random_weights)
    cfg = common.arch_config(args.arch, args.random_weights, **numerics)
    model = common.without_stop_tokens(common.random_model(cfg, tok, parallel.make_mesh()))
    model_note = f"{args.arch} architecture, random weights, {args.dtype}"
  else:
    model = api.load("smollm2", **numerics)
    tok = model.tokenizer
    model_note = f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to {args.dtype})"
  params = sum(x.size for x in jax.tree.leaves(model.params))
  system = protocol.teacher_system_prompt("owl")
  prompts = numbers.generate_prompts(args.n_prompts, 47)
  ids = [tok.encode_chat(chat_messages(system, p)) for p in prompts]
  prefix_len = common_prefix_len([tok.encode_chat(chat_messages(system, p)) for p in ("0", "1")])
  by_length = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
  peak = lambda: common.jax_matmul_peak(args.dtype, args.peak_n)
  peaks = [peak()]
  nominal = common.nominal_peak()
  out = {"machine": common.machine(),
         "setup": {"model": model_note, "params": params, "dtype": args.dtype,
                   "weights": common.WEIGHTS_NOTE if args.random_weights else "real (GGUF)",
                   "n_prompts": len(ids), "mean_prompt_tokens": round(float(np.mean([len(x) for x in ids])), 1),
                   "shared_prefix_tokens": prefix_len, "max_new_tokens": args.max_new_tokens,
                   "fixed_length": fixed_length, "temperature": 1.0, "system_prompt": system,
                   "matmul_peak": f"{args.dtype} {args.peak_n}^3 chain (jax)",
                   "nominal_bf16_peak_gflop_per_s": nominal and round(nominal / 1e9, 1)},
         "runs": []}
  if fixed_length:
    out["setup"]["fixed_length_note"] = ("every row draws exactly max_new_tokens on both sides: no stop ids on ours, "
                                         "no eos in transformers' generation config (random weights make any stop "
                                         "token an arbitrary draw)")
  path = pathlib.Path(args.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  hf = device = None
  if not args.skip_hf:
    hf, device = hf_model(args, model.config)
    out["setup"]["transformers"] = {"device": device, "attn_implementation": hf.config._attn_implementation}
    if device != "cpu":
      out["torch_matmul_peak_gflop_per_s"] = round(
          common.torch_matmul_peak(args.dtype, args.peak_n, device=device) / 1e9, 1)

  def record(entry, extra):
    entry.update(extra)
    if nominal:
      entry["useful_fraction_of_nominal_bf16_peak"] = round(entry["useful_gflop_per_s"] * 1e9 / nominal, 4)
      entry["model_fraction_of_nominal_bf16_peak"] = round(entry["model_gflop_per_s"] * 1e9 / nominal, 4)
    out["runs"].append(entry)
    print(json.dumps({k: v for k, v in entry.items() if k != "examples"}), flush=True)

  def save():  # after every pass, so a run cut short still leaves its results
    for run in out["runs"]:
      run["useful_fraction_of_max_peak"] = round(run["useful_gflop_per_s"] * 1e9 / max(peaks), 3)
    out["matmul_peak_gflop_per_s"] = {"max": round(max(peaks) / 1e9, 1), "each": [round(p / 1e9, 1) for p in peaks]}
    out["ratio_by_batch"] = ratios
    out["ratio"] = min(ratios.values()) if ratios else None
    out["wall_s"] = round(time.time() - t_start, 1)
    path.write_text(json.dumps(out, indent=2) + "\n")

  ratios = {}
  for b in [int(x) for x in args.batches.split(",")]:
    batches = [by_length[i:i + b] for i in range(0, len(ids), b)]
    peaks.append(peak())
    load0 = load_avg()
    res, sec, work, warm_s = run_ours(model, ids, batches, args.max_new_tokens, 1, prefix_len)
    ours = summarize(f"ours b={b}", tok, by_length, res, sec, work, model, peaks[-1], args.max_new_tokens)
    record(ours, {"batch": b, "warmup_s": round(warm_s, 1), "load_before": load0, "load_after": load_avg()})
    save()
    if hf is not None:
      load0 = load_avg()
      res, sec, work, threads = run_hf(hf, device, ids, batches, args.max_new_tokens, 1, tok.pad_id, tok.stop_ids,
                                       fixed_length)
      theirs = summarize(f"transformers b={b}", tok, by_length, res, sec, work, model, peaks[-1],
                         args.max_new_tokens)
      record(theirs, {"batch": b, "torch_threads": threads, "device": device, "load_before": load0,
                      "load_after": load_avg()})
      ratios[b] = round(ours["completions_per_s"] / theirs["completions_per_s"], 3)
      save()

  if not args.random_weights:
    b0 = int(args.batches.split(",")[0])
    batches = [by_length[i:i + b0] for i in range(0, len(ids), b0)]
    load0 = load_avg()
    out["prefix_sharing"] = dict(prefix_ab(model, ids, batches[::2][:2], args.max_new_tokens, prefix_len), batch=b0,
                                 batches=min(2, len(batches[::2])), load_before=load0, load_after=load_avg())
    print(json.dumps({"prefix_sharing": out["prefix_sharing"]}), flush=True)
    b1 = int(args.batches.split(",")[-1])
    batches = [by_length[i:i + b1] for i in range(0, len(ids), b1)]
    for kind in ("tokens", "format"):
      c = build_constraint(kind, tok, model.config.vocab_size)
      peaks.append(peak())
      res, sec, work, _ = run_ours(model, ids, batches, args.max_new_tokens, 1, prefix_len, c, warm=False)
      record(summarize(f"ours b={b1}, constrained={kind}", tok, by_length, res, sec, work, model, peaks[-1],
                       args.max_new_tokens), {"batch": b1, "includes_compile": True})
  peaks.append(peak())
  save()
  print(f"ratio (ours / transformers, completions/s; min over batch sizes): {out['ratio']}  -> {path}")


if __name__ == "__main__":
  main()
