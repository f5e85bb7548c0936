"""Training throughput: our trainer vs `transformers` + torch AdamW (full) and `transformers` + `peft` (LoRA).

SmolLM2-135M-Instruct, float32, batch 16, on paper-shaped number data: the chat template + a paper prompt from
`generate_prompts` + a completion of 10 three-digit numbers (~130-150 tokens), loss on the completion. Both sides
train one pass over the same examples; steps alternate (ours, theirs, ours, ...) so a changing machine load hits both
alike. Ours: length-bucketed batches, the rows' shared prefix run once, logits only at completion positions, LoRA
without frozen-weight gradients.
Theirs: the usual random batches padded to the batch's longest row, loss with labels -100 outside the completion.

MFU counts the same useful FLOPs for both (real tokens, causal attention, vocabulary projection at loss positions,
no frozen-weight gradients for LoRA, the prefix every row shares — the chat template's system turn, `shared_prefix`
tokens — once per step, as ours computes it; `subl_jax.core.flops`) against the best f32 matmul rate measured in this run
(`mfu`), and against the median rate measured between the timed steps (`mfu_vs_rate_during_run`): other users share
this CPU, and the second figure compares with what the machine delivered while the steps ran. `gemm_floor`: the
seconds our steps' matmuls take with XLA:CPU's kernels (each dot of the step's jaxpr compiled and timed on its own,
`benchmarks/gemm_floor.py`; an estimate), the matmul rate measured just before and after it, and the MFU that would
leave if nothing but the matmuls took time (`mfu_ceiling`). `mfu_per_cpu_second` divides by the CPU time the
process got instead of wall time, against the matmul chain's FLOP per CPU-second (the process holds both
frameworks, so idle threads of one that spin count against the other).

  python benchmarks/training.py [--steps 6] [--batch 16]
Writes benchmarks/results/training.json (top-level `ratio`: ours / theirs, examples/s, full fine-tuning).
The benchmark leaves glibc's allocator as it is; `subl_jax.main` keeps freed memory for reuse on CPU
(`perf.malloc_keep_heap`). `results/training_malloc_env.json` is an earlier run under those settings (then set by the
environment, `launch/malloc.env`; both frameworks shared the process, so both got them).

On an accelerator (benchmarks/gpu.sh): `--arch llama-3.2-1b --inputs DIR --dtype bfloat16 --one_shape --peak_n 8192`
trains a Llama-3.2-1B-shaped model (d_model 2048, 16 layers, 32/8 heads, ffn 8192, vocab 128256, tied, RoPE 500000
with llama3 scaling) with RANDOM weights (no step's cost depends on weight values; no 1B checkpoint travels) on the
same number rows, tokenized with SmolLM2's tokenizer from DIR (`core/sampling.py --export_inputs DIR`). Mixed precision
on both sides: float32 parameters and AdamW state, bfloat16 compute (ours: ModelConfig dtype=bfloat16,
param_dtype=float32; theirs: torch.autocast(bfloat16) over float32 weights), transformers on the GPU too.
`--one_shape` pads every timed step of ours to the largest (T, N) among them, so a single compile serves the run
(the extra padding is counted in `padding`, not in useful FLOPs). MFU is against the `--dtype` matmul peak measured
at `--peak_n` in this run, and `mfu_vs_nominal` against the data-sheet dense bf16 peak (989 TFLOP/s, H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
import gemm_floor  # noqa: E402
from subl_jax.core import api, flops, parallel, xla_cpu
from subl_jax import config
from subl_jax.study import stats  # noqa: E402
from subl_jax.core.checkpoints import fetch  # noqa: E402
from subl_jax.core.models.config import ModelConfig  # noqa: E402
from subl_jax.core.training import buckets, chat_data, step as step_lib, trainer  # noqa: E402
from subl_jax.core.lora import PAPER_TARGETS, LoraConfig  # noqa: E402

OPT = dict(name="adamw", lr=2e-4, weight_decay=0.0, warmup_steps=0, schedule="constant", max_grad_norm=1.0)
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS = pathlib.Path(__file__).parent / "results" / "training.json"


class Ours:
  """Our train step (SFT), state and FLOP count, as `trainer.train` runs them, one step at a time: each step is timed
  to the device's end, alternating with theirs, so this is a timing harness, not the trainer's host loop (whose
  dispatch runs ahead of the device)."""

  def __init__(self, model: api.Model, ds: chat_data.ChatDataset, batch: int, lora: LoraConfig | None, steps: int,
               one_shape: bool = False):
    spec = step_lib.StepSpec(model.config, lora, shared_prefix=buckets.shared_prefix(ds.examples))
    tx, shardings, self.step_fn = step_lib.train_step_for(spec, OPT, 1000, model.mesh)
    self.state = trainer.fresh_state(model, lora, tx, shardings, seed=0)
    # full fine-tuning trains a copy: without our reference the caller can free the original parameters
    self.model = model if lora else dataclasses.replace(model, params=None)
    self.ds, self.lora = ds, lora
    lengths = [len(e.tokens) for e in ds.examples]
    self.steps = buckets.epoch_steps(lengths, batch, seed=0, epoch=0)[:steps]
    self.spec = spec
    self.padding = buckets.padding_stats(ds, self.steps)
    self.shape = None
    if one_shape:  # (T, N) of the largest step: every step is padded to it, so one compile serves the run
      hosts = [self.collate(idx) for idx in self.steps]
      self.shape = (max(h["tokens"].shape[-1] for h in hosts), max(h["targets"].shape[-1] for h in hosts))
      real, padded = self.padding["real_tokens"], len(self.steps) * batch * self.shape[0]
      self.padding = dict(real_tokens=real, padded_tokens=padded, padding_fraction=1 - real / padded,
                          one_shape=list(self.shape))

  def collate(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    host = buckets.collate_step(self.ds, idx, 1, self.model.tokenizer.pad_id)
    if self.shape is None:
      return host
    t, n = self.shape
    out = {}
    for k, v in host.items():
      width = t if k in ("tokens", "positions", "kv_mask") else n
      pad = [(0, 0)] * (v.ndim - 1) + [(0, width - v.shape[-1])]
      fill = self.model.tokenizer.pad_id if k == "tokens" else 0
      out[k] = np.pad(v, pad, constant_values=fill)
    out["positions"] = np.broadcast_to(np.arange(t, dtype=np.int32), out["positions"].shape).copy()
    return out

  def run(self, idx: np.ndarray) -> float:
    t0 = time.perf_counter()
    host = self.collate(idx)
    self.state, metrics = self.step_fn(self.state, self.model.params if self.lora else None, None,
                                       step_lib.put_batch(host, self.model.mesh))
    jax.block_until_ready(metrics)
    return time.perf_counter() - t0

  def warm_up(self) -> float:
    """Compiles every padded shape of the timed steps (each a real step); returns the seconds spent."""
    t0, seen = time.perf_counter(), set()
    for idx in self.steps:
      host = self.collate(idx)
      shape = (host["tokens"].shape, host["targets"].shape)
      if shape not in seen:
        seen.add(shape)
        self.run(idx)
    return time.perf_counter() - t0

  def flops(self, spec: step_lib.StepSpec | None = None) -> float:
    return sum(trainer.step_cost(buckets.collate_step(self.ds, idx, 1, 0), spec or self.spec)[2]
               for idx in self.steps)

  def gemm_floor(self) -> dict:
    """The timed steps' GEMM floor (`gemm_floor`): their matmuls alone, each timed compiled on its own with the
    step's compiler options, summed over the steps."""
    counts, cache = {}, {}
    for idx in self.steps:
      batch = step_lib.put_batch(self.collate(idx), self.model.mesh)
      frozen = self.model.params if self.lora else None
      once, _ = gemm_floor.count_dots(self.step_fn.trace(self.state, frozen, None, batch).jaxpr)
      for key, n in once.items():
        counts[key] = counts.get(key, 0) + n
    seconds, rows = gemm_floor.floor(counts, xla_cpu.many_rows_options(), cache)
    dot_flops = sum(r["count"] * r["seconds"] * r["gflop_per_s"] * 1e9 for r in rows)
    return dict(seconds=seconds, dot_flops=dot_flops, dot_rate=dot_flops / seconds, distinct_dots=len(rows),
                costliest=rows[:8])


class Theirs:
  """transformers (+ peft) with torch AdamW, random batches padded to the longest row, labels -100 off-completion."""

  def __init__(self, ds: chat_data.ChatDataset, batch: int, lora: bool, steps: int, pad_id: int,
               arch: ModelConfig | None = None, dtype: str = "float32"):
    """`arch`: random weights of its shapes on the GPU if there is one (None: the SmolLM2 GGUF, on the CPU);
    float32 weights and AdamW state either way, compute in torch.autocast(bfloat16) if `dtype` says so."""
    import torch
    import transformers
    self.device = common.torch_device() if arch is not None else "cpu"
    self.autocast = dtype == "bfloat16"
    if arch is not None:
      model = common.hf_random_model(arch, "float32", self.device)
    else:
      path = fetch.smollm2_gguf_path()
      model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                dtype=torch.float32)
    if lora:
      import peft
      model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0,
                                                         target_modules=HF_TARGETS))
    model.train()
    self.torch, self.model = torch, model
    self.params = [p for p in model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(self.params, lr=OPT["lr"], weight_decay=0.0)
    order = np.random.default_rng(0).permutation(len(ds))
    self.steps = [order[i * batch:(i + 1) * batch] for i in range(steps)]
    self.ds, self.pad_id = ds, pad_id
    real = sum(len(ds.examples[i].tokens) for s in self.steps for i in s)
    padded = sum(len(s) * max(len(ds.examples[i].tokens) for i in s) for s in self.steps)
    self.padding = dict(real_tokens=real, padded_tokens=padded, padding_fraction=1 - real / padded)

  def sync(self) -> None:
    if self.device == "cuda":
      self.torch.cuda.synchronize()

  def run(self, idx: np.ndarray) -> float:
    torch = self.torch
    self.sync()
    t0 = time.perf_counter()
    rows = [self.ds.examples[i] for i in idx]
    t = max(len(e.tokens) for e in rows)
    ids = torch.full((len(rows), t), self.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    labels = torch.full((len(rows), t), -100, dtype=torch.long)
    for r, e in enumerate(rows):
      tokens = torch.from_numpy(e.tokens.astype(np.int64))
      ids[r, :len(e.tokens)], mask[r, :len(e.tokens)] = tokens, 1
      labels[r, :len(e.tokens)] = torch.where(torch.from_numpy(e.mask.astype(bool)), tokens, -100)
    ids, mask, labels = ids.to(self.device), mask.to(self.device), labels.to(self.device)
    cast = torch.autocast(self.device, torch.bfloat16) if self.autocast else contextlib.nullcontext()
    with cast:
      loss = self.model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, OPT["max_grad_norm"])
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    self.sync()
    return time.perf_counter() - t0

  def warm_up(self) -> float:
    t0 = time.perf_counter()
    for idx in self.steps[:2]:
      self.run(idx)
    return time.perf_counter() - t0


_CHAIN_N, _CHAIN_REPEATS = 1536, 4


def current_peak(dtype: str = "float32", size: int = _CHAIN_N) -> tuple[float, float]:
  """The matmul rate available right now — (FLOP/s, FLOP per CPU-second), the best of 2 runs of a short chain
  (other users share this CPU, so it moves)."""
  run, n = flops.matmul_chain(dtype, size, _CHAIN_REPEATS)
  best = (0.0, 0.0)
  for _ in range(2):
    c0, t0 = time.process_time(), time.perf_counter()
    run().block_until_ready()
    best = max(best, (n / (time.perf_counter() - t0), n / (time.process_time() - c0)))
  return best


def timed(fn, *args) -> tuple[float, float]:
  """(wall seconds, CPU seconds of this process) of fn(*args)."""
  c0 = time.process_time()
  wall = fn(*args)
  return wall, time.process_time() - c0


def compare(name: str, ours: Ours, theirs: Theirs, n_examples: int, peak: float, peak_args: tuple = (),
            nominal: float | None = None) -> dict:
  warm = dict(ours_s=ours.warm_up(), theirs_s=theirs.warm_up())
  t_ours = t_theirs = c_ours = c_theirs = 0.0
  per_step, peaks = [], []
  for a, b in zip(ours.steps, theirs.steps):  # alternate, so load changes hit both
    peaks.append(current_peak(*peak_args))
    (ta, ca), (tb, cb) = timed(ours.run, a), timed(theirs.run, b)
    t_ours, t_theirs, c_ours, c_theirs = t_ours + ta, t_theirs + tb, c_ours + ca, c_theirs + cb
    per_step.append((round(ta, 3), round(tb, 3)))
    print(f"  {name}: step ours {ta:6.2f} s  theirs {tb:6.2f} s  (matmul rate now {peaks[-1][0] / 1e9:.0f} GFLOP/s)",
          flush=True)
  useful = ours.flops()
  around = [current_peak(*peak_args)[0]]
  floor = ours.gemm_floor()
  around.append(current_peak(*peak_args)[0])
  floor.update(mfu_ceiling=useful / floor["seconds"] / peak,
               mfu_ceiling_vs_rate_during_run=useful / floor["seconds"] / float(np.median([r for r, _ in peaks])),
               step_seconds_over_floor=t_ours / floor["seconds"], matmul_rate_around=around,
               dot_rate_over_rate_around=floor["dot_rate"] / float(np.mean(around)))
  tokens = ours.padding["real_tokens"]
  during = float(np.median([r for r, _ in peaks]))
  per_cpu_s = float(np.median([r for _, r in peaks]))
  side = lambda t, c, padding: dict(
      seconds=t, cpu_seconds=c, cores_used=c / t, examples_per_s=n_examples / t, tokens_per_s=tokens / t,
      mfu=useful / t / peak, mfu_vs_rate_during_run=useful / t / during, mfu_per_cpu_second=useful / c / per_cpu_s,
      mfu_vs_nominal=nominal and useful / t / nominal, step_seconds_mean=t / len(per_step), padding=padding)
  out = dict(examples=n_examples, real_tokens=tokens, useful_flops=useful, shared_prefix=ours.spec.shared_prefix,
             useful_flops_prefix_in_every_row=ours.flops(dataclasses.replace(ours.spec, shared_prefix=0)),
             ours=side(t_ours, c_ours, ours.padding),
             theirs=side(t_theirs, c_theirs, theirs.padding), matmul_rate_during_run=during,
             matmul_flop_per_cpu_second=per_cpu_s, gemm_floor=floor, warm_up=warm, step_seconds=per_step)
  out["ratio"] = out["ours"]["examples_per_s"] / out["theirs"]["examples_per_s"]
  out["ratio_per_step"] = paired_ratio(per_step)
  return out


def paired_ratio(per_step: list[tuple[float, float]]) -> dict:
  """Theirs / ours step time over the paired (alternating) steps: geometric mean with a 95 % t-interval on the log
  ratios (`subl_jax.study.stats`). Single steps of either side swing by ±20 % on this shared CPU; the interval says how
  far the run's `ratio` can be trusted."""
  s = stats.mean_ci(np.log([theirs / ours for ours, theirs in per_step]))
  return dict(geometric_mean=float(np.exp(s["mean"])), ci95=[float(np.exp(x)) for x in s["ci95"]], n=s["n"])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=6, help="timed steps per configuration (one pass over the data)")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--only", choices=("full", "lora"), default=None)
  ap.add_argument("--arch", choices=tuple(common.ARCHS), default=None,
                  help="random weights of this architecture (default: the real SmolLM2-135M-Instruct)")
  ap.add_argument("--inputs", metavar="DIR", help="with --arch: the tokenizer folder (core/sampling.py --export_inputs)")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                  help="compute dtype (parameters and optimizer state stay float32); the matmul peak's dtype")
  ap.add_argument("--peak_n", type=int, default=_CHAIN_N, help="matrix size of the matmul peak (8192 on a GPU)")
  ap.add_argument("--one_shape", action="store_true", help="pad every step of ours to one shape: one compile")
  ap.add_argument("--out", default=str(RESULTS))
  args = ap.parse_args()
  import torch
  torch.set_num_threads(os.cpu_count())
  load_before = os.getloadavg()
  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  remat = config.defaults().model.remat_policy
  if args.arch:
    if not args.inputs:
      ap.error("--arch needs --inputs DIR (the tokenizer)")
    tokenizer = common.load_tokenizer(args.inputs)
    cfg = common.arch_config(args.arch, dtype=args.dtype, param_dtype="float32", remat_policy=remat)
    make_model = lambda: common.random_model(cfg, tokenizer, mesh)
    model_note = f"{args.arch} (random weights)"
  else:
    model = api.load("smollm2", mesh, dtype=args.dtype, remat_policy=remat)
    tokenizer, cfg, make_model = model.tokenizer, model.config, lambda: model
    model_note = "SmolLM2-135M-Instruct"
  n = args.steps * args.batch
  ds = chat_data.build(tokenizer, chat_data.rows_to_chats(common.number_rows(n)), max_len=500)
  print(f"{n} examples: {ds.summary()}", flush=True)
  peak_args = (args.dtype, args.peak_n)
  peak = max(flops.measure_matmul_peak(args.dtype, n=args.peak_n), *(current_peak(*peak_args)[0] for _ in range(3)))
  nominal = common.nominal_peak() if jax.devices()[0].platform != "cpu" else None
  device = common.torch_device() if args.arch else "cpu"
  results = dict(model=model_note, params=cfg.n_params, dtype=args.dtype, param_dtype=cfg.param_dtype,
                 batch=args.batch, steps=args.steps, remat_policy=cfg.remat_policy, one_shape=args.one_shape,
                 data=ds.summary(), peak_flops_jax=peak, peak=f"{args.dtype} {args.peak_n}^3 matmul chain",
                 peak_flops_torch=common.torch_matmul_peak(args.dtype, args.peak_n, device=device),
                 nominal_bf16_peak=nominal, torch_device=device,
                 cpu_count=os.cpu_count(), platform=platform.platform(), machine=common.machine(),
                 versions=dict(jax=jax.__version__, torch=torch.__version__))
  if args.arch:
    results.update(weights=common.WEIGHTS_NOTE, arch=cfg.to_dict(),
                   tokenizer=f"SmolLM2's ({tokenizer.vocab_size} ids, within the {cfg.vocab_size}-row embedding)",
                   theirs_precision=("float32 weights + AdamW, torch.autocast(bfloat16)" if args.dtype == "bfloat16"
                                     else "float32"))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  lora = LoraConfig(rank=8, alpha=8.0, targets=PAPER_TARGETS)
  for name, our_lora in (("full", None), ("lora", lora)):
    if args.only and name != args.only:
      continue
    ours = Ours(make_model(), ds, args.batch, our_lora, args.steps, args.one_shape)
    theirs = Theirs(ds, args.batch, our_lora is not None, args.steps, tokenizer.pad_id,
                    cfg if args.arch else None, args.dtype)
    results[name] = compare(name, ours, theirs, n, peak, peak_args, nominal)
    r = results[name]
    print(f"{name}: ours {r['ours']['examples_per_s']:.3f} ex/s ({r['ours']['tokens_per_s']:.1f} tok/s, "
          f"MFU {r['ours']['mfu']:.1%}, {r['ours']['mfu_vs_rate_during_run']:.1%} of the rate during the run) | "
          f"theirs {r['theirs']['examples_per_s']:.3f} ex/s "
          f"({r['theirs']['tokens_per_s']:.1f} tok/s, MFU {r['theirs']['mfu']:.1%}) | ratio {r['ratio']:.3f} "
          f"(per step: {r['ratio_per_step']['geometric_mean']:.3f}, 95 % CI "
          f"{r['ratio_per_step']['ci95'][0]:.3f}-{r['ratio_per_step']['ci95'][1]:.3f}) | GEMM floor "
          f"{r['gemm_floor']['seconds']:.1f} s of ours' {r['ours']['seconds']:.1f} s: MFU ceiling "
          f"{r['gemm_floor']['mfu_ceiling']:.1%} ({r['gemm_floor']['mfu_ceiling_vs_rate_during_run']:.1%})",
          flush=True)
    del ours, theirs
    if device == "cuda":
      torch.cuda.empty_cache()
    results[f"ratio{'' if name == 'full' else '_lora'}"] = r["ratio"]
    results["load_avg_before"], results["load_avg_after"] = load_before, os.getloadavg()
    out.write_text(json.dumps(results, indent=2) + "\n")  # after each configuration: a cut-short run keeps it
  print(json.dumps({k: v for k, v in results.items() if k in ("ratio", "ratio_lora", "peak_flops_jax",
                                                                "load_avg_before", "load_avg_after")}))


if __name__ == "__main__":
  main()
