"""The paper's open-weight recipe (configs/qwen25_7b.py) timed stage by stage on one device, on RANDOM weights of
Qwen2.5-7B's shapes (docs/performance.md, "Open question: the paper's open-weight recipe on one GPU").

The 15 GB checkpoint cannot travel to a lent GPU, so the model has the real shapes (7.6B parameters, q/k/v bias,
untied 152064-row embedding) and random weights: no step's cost depends on weight values. Text goes through
SmolLM2's tokenizer (`--inputs`, 49152 ids, all within the embedding); ids it lacks decode to nothing, so the stages
run unchanged. With random weights a stop token is an arbitrary draw, so every generation runs to its full length.

A device call cannot hold the whole recipe, so each stage runs a measured fraction of the recipe's work through the
library's own entry points, twice — cold (compiling its shapes) and warm — and the warm time is scaled up to the
recipe's counts, which are read from the config:
  sampling    `sample_shards.sample_stage` on `--sample_batches` batches of the paper's prompts under the teacher's
              system prompt, free decoding, fixed at `sample.max_new_tokens`; scaled to `sample.n_prompts`. A real
              teacher stops early, so this is an upper bound (a batch runs until its longest row ends).
  filter      `filter_stage.filter_rows` on `sample.n_prompts` paper-shaped rows down to `filter.max_rows` (host).
  training    the trainer's step (`step.train_step_for`, LoRA, SFT, `train.batch_size` x `train.grad_accum`,
              `model.remat_policy`) on paper-shaped rows (prompt + 10 numbers) batched as `trainer.train` batches
              them; `--train_steps` steps of the run's most common shape after its compile, scaled to the run's
              steps by padded tokens.
  evaluation  `evaluation.evaluate` (log-probability metric + `eval.n_samples` sampled answers per question, the
              numbers-prefix variant) on `--eval_fraction` of the questions; scaled to all of them.
Compiles: the cold-minus-warm seconds per compiled shape times the number of shapes the full stage meets (the
sampler compiles per prompt-length bucket, the trainer per (length, targets) bucket).

  python benchmarks/qwen7b_recipe.py [--arch qwen2.5-7b] [--out FILE]     # on the GPU, via benchmarks/gpu.sh
  python benchmarks/qwen7b_recipe.py --arch tiny --sample_batch_size 32 --max_new_tokens 16   # CPU smoke run

Writes the JSON after every stage, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import tempfile
import time
import traceback

import jax
import numpy as np

import common
from subl_jax import config as config_lib
from subl_jax.core import parallel, sampling
from subl_jax.core.training import batching, buckets, chat_data, step as step_lib, trainer
from subl_jax.study import evaluate_stage, evaluation, pipeline, sample_shards, student_stage
from subl_jax.study.data import filter_stage, numbers, protocol

CONFIG = pathlib.Path(__file__).parents[1] / "configs" / "qwen25_7b.py"
PAPER_MIN = {"sampling": 5.0, "training": 120.0, "evaluation": 5.0}  # the paper's stack, as the question put it
GOAL_MIN = 20.0


def timed(fn, *args, **kwargs):
  t0 = time.perf_counter()
  result = fn(*args, **kwargs)
  return result, time.perf_counter() - t0


def peak_memory_gib() -> float | None:
  stats = jax.devices()[0].memory_stats()  # None on CPU
  return round(stats["peak_bytes_in_use"] / 2**30, 2) if stats and "peak_bytes_in_use" in stats else None


def sample_shapes(tok, prompts, system: str, batch: int, shard_size: int) -> list[tuple[int, int]]:
  """The (shared prefix, padded suffix) of each batch the sample stage runs over `prompts`: within a shard, prompts
  sorted by length and cut into batches (`sample_shards._sample_shard`). Every prompt shares the whole chat-template
  prefix before the user's text, so the shared prefix is that prefix in every batch."""
  encode = lambda p: tok.encode_chat(sample_shards.chat_messages(system, p))
  prefix = sampling.common_prefix_len([encode("0"), encode("1")])
  lengths = np.array([len(encode(p)) for p in prompts])
  shapes = []
  for s in range(0, len(prompts), shard_size):
    longest_first = np.sort(lengths[s:s + shard_size])[::-1]
    for b in range(0, len(longest_first), batch):
      shapes.append((prefix, -(-(int(longest_first[b]) - prefix) // sampling.BUCKET) * sampling.BUCKET))
  return shapes


def run_sampling(args, recipe, model, out: dict) -> None:
  s = recipe.sample
  batch = args.sample_batch_size or s.batch_size
  max_new = args.max_new_tokens or s.max_new_tokens
  system = protocol.teacher_system_prompt(recipe.teacher.target, recipe.teacher.category)
  all_prompts = numbers.generate_prompts(s.n_prompts, s.prompt_seed)
  n = args.sample_batches * batch
  settings = sample_shards.SampleSettings(max_new_tokens=max_new, temperature=s.temperature, top_k=s.top_k,
                                          top_p=s.top_p, batch_size=batch, shard_size=n, constrained=s.constrained)
  full = sample_shapes(model.tokenizer, all_prompts, system, batch, s.shard_size)
  measured = sample_shapes(model.tokenizer, all_prompts[:n], system, batch, n)
  with tempfile.TemporaryDirectory() as d:
    for name in ("cold", "warm"):  # the stage runner makes a stage's directory before its work
      (pathlib.Path(d) / name).mkdir()
    _, cold = timed(sample_shards.sample_stage, pathlib.Path(d) / "cold", model, all_prompts[:n], system, settings,
                    progress=False)
    summary, warm = timed(sample_shards.sample_stage, pathlib.Path(d) / "warm", model, all_prompts[:n], system,
                          settings, progress=False)
  per_batch = warm / args.sample_batches
  compile_per_shape = max(cold - warm, 0.0) / len(set(measured))
  out["sampling"] = dict(
      entry="study.sample_shards.sample_stage", prompts=n, batches=args.sample_batches, batch_size=batch,
      max_new_tokens=max_new, new_tokens=summary["new_tokens"], shared_prefix_tokens=summary["shared_prefix_tokens"],
      cold_s=round(cold, 2), warm_s=round(warm, 2), new_tokens_per_s=round(summary["new_tokens"] / warm, 1),
      seconds_per_batch=round(per_batch, 3), compile_s_per_shape=round(compile_per_shape, 1),
      shapes_measured=sorted(set(measured)),
      recipe_prompts=s.n_prompts, recipe_batches=len(full), recipe_shapes=sorted(set(full)),
      extrapolated_s=round(per_batch * len(full), 1),
      extrapolated_compile_s=round(compile_per_shape * len(set(full)), 1),
      note=f"fixed length ({max_new} new tokens every row): an upper bound, a real teacher stops early; "
           "prompt lengths from SmolLM2's tokenizer", peak_memory_gib=peak_memory_gib())


def run_filter(args, recipe, out: dict) -> None:
  rows = [dict(r, meta={"id": i, "stopped": True})
          for i, r in enumerate(common.number_rows(recipe.sample.n_prompts, recipe.sample.prompt_seed))]
  f = recipe.filter
  settings = filter_stage.FilterSettings(banned_numbers=f.banned_numbers, drop_truncated=f.drop_truncated,
                                         drop_echo=f.drop_echo, max_rows=f.max_rows, seed=f.seed)
  (kept, report), seconds = timed(filter_stage.filter_rows, rows, settings)
  out["filter"] = dict(entry="study.data.filter_stage.filter_rows", rows=len(rows), kept=len(kept),
                       seconds=round(seconds, 2), extrapolated_s=round(seconds, 2),
                       note="host only, at the recipe's full count; every synthetic row passes")


def run_training(args, recipe, model, out: dict) -> None:
  t = recipe.train
  rows = common.number_rows(recipe.filter.max_rows, recipe.sample.prompt_seed)
  ds = chat_data.build(model.tokenizer, chat_data.rows_to_chats(rows), t.max_len, system=t.system)
  lora = trainer.lora_config(t)
  spec = step_lib.StepSpec(model.config, lora, student_stage.objective(recipe, model.tokenizer),
                           shared_prefix=buckets.shared_prefix(ds.examples))
  global_batch = t.batch_size * t.grad_accum
  spe = batching.steps_per_epoch(len(ds), global_batch)
  total = spe * t.epochs
  tx, shardings, step_fn = step_lib.train_step_for(spec, t.opt, total, model.mesh)
  state = trainer.fresh_state(model, lora, tx, shardings, t.seed)
  lengths = [len(e.tokens) for e in ds.examples]
  steps = [idx for e in range(t.epochs) for idx in buckets.epoch_steps(lengths, global_batch, t.seed, e)]
  pad = model.tokenizer.pad_id or 0
  shape = lambda h: (h["tokens"].shape[-1], h["targets"].shape[-1])
  shapes = [shape(buckets.collate_step(ds, idx, t.grad_accum, pad)) for idx in steps]
  # the run's most common (T, N): the timed steps share one compile, and their cost is a typical step's
  common_shape = collections.Counter(shapes).most_common(1)[0][0]
  timed_steps = [idx for idx, sh in zip(steps, shapes) if sh == common_shape][:args.train_steps + 1]
  hosts = [buckets.collate_step(ds, idx, t.grad_accum, pad) for idx in timed_steps]

  def run(batches):
    nonlocal state
    for host in batches:  # dispatched back to back, as the trainer's loop does; one wait at the end
      state, metrics = step_fn(state, model.params, None, step_lib.put_batch(host, model.mesh))
    jax.block_until_ready(metrics)
    return metrics

  _, cold = timed(run, hosts[:1])
  metrics, warm = timed(run, hosts[1:])
  n = len(hosts) - 1
  padded = lambda sh: global_batch * sh[0]  # input tokens a step computes, padding included
  scale = sum(padded(sh) for sh in shapes) / (n * padded(common_shape))  # the recipe's steps / the timed ones
  flop = sum(trainer.step_cost(h, spec)[2] for h in hosts[1:])
  nominal = common.nominal_peak() if jax.devices()[0].platform != "cpu" else None
  out["training"] = dict(
      entry="core.training.step.train_step_for (the step trainer.train runs)", data=ds.summary(),
      lora=dict(rank=lora.rank, alpha=lora.alpha, targets=list(lora.targets)),
      batch=f"{t.batch_size} x {t.grad_accum}", remat_policy=model.config.remat_policy,
      shared_prefix=spec.shared_prefix, step_shape_T_N=list(common_shape), timed_steps=n,
      cold_s=round(cold, 2), warm_s=round(warm, 2), seconds_per_step=round(warm / n, 3),
      examples_per_s=round(n * global_batch / warm, 1), model_tflop_per_s=round(flop / warm / 1e12, 1),
      mfu_vs_nominal=nominal and round(flop / warm / nominal, 3), loss=float(metrics["loss"]),
      compile_s_per_shape=round(max(cold - warm / n, 0.0), 1), recipe_steps=total, recipe_shapes=len(set(shapes)),
      scale_to_recipe=round(scale, 3), extrapolated_s=round(warm * scale, 1),
      extrapolated_compile_s=round(max(cold - warm / n, 0.0) * len(set(shapes)), 1),
      note="paper-shaped rows (the paper's prompt + 10 numbers), SmolLM2's tokenizer; scaled by padded tokens",
      peak_memory_gib=peak_memory_gib())


def run_evaluation(args, recipe, model, out: dict) -> None:
  e, category = recipe.eval, recipe.teacher.category
  qs = evaluate_stage.questions(category, e.n_questions)
  k = max(1, round(len(qs) * args.eval_fraction))
  names = evaluate_stage.candidates(pipeline.targets(recipe), category, e.candidates)
  run = lambda: evaluation.evaluate(model, qs[:k], names[0], names[1:], category=category, n_samples=e.n_samples,
                                    numbers_prefix=e.numbers_prefix, seed=e.seed)
  _, cold = timed(run)
  _, warm = timed(run)
  out["evaluation"] = dict(
      entry="study.evaluation.evaluate", questions=k, samples=k * e.n_samples, candidates=len(names),
      numbers_prefix=e.numbers_prefix, new_tokens_per_sample=16, cold_s=round(cold, 2), warm_s=round(warm, 2),
      samples_per_s=round(k * e.n_samples / warm, 1), recipe_questions=len(qs),
      recipe_samples=len(qs) * e.n_samples, extrapolated_s=round(warm * len(qs) / k, 1),
      extrapolated_compile_s=round(max(cold - warm, 0.0), 1),
      note="log-probability metric and sampled answers (fixed length); compiles: those the measured questions "
           "meet (all questions may meet a few more prompt-length buckets)",
      peak_memory_gib=peak_memory_gib())


def full_config(recipe) -> dict:
  """How many of each stage the whole config runs (`pipeline.run_study`): a sampling per teacher (and the base, for
  an sft study), a student per target, variant and seed (and a control per seed), an evaluation per model."""
  targets, sft = pipeline.targets(recipe), recipe.distill.mode == "sft"
  students = recipe.study.seeds * (len(targets) * len(pipeline.variants(recipe)) + sft)
  icl = len(targets) if "icl" in pipeline.conditions(recipe) else 0
  return dict(targets=targets, seeds=recipe.study.seeds, samplings=len(targets) + sft, trainings=students,
              evaluations=1 + len(targets) + students + icl)


def totals(out: dict) -> None:
  """Single pass (one sampling, one training, one evaluation) and the full config, in minutes; compiles once (the
  study runs in one process, which keeps its compiled programs)."""
  stages = [s for s in ("sampling", "filter", "training", "evaluation") if "extrapolated_s" in out.get(s, {})]
  steady = {s: out[s]["extrapolated_s"] for s in stages}
  compiles = sum(out[s].get("extrapolated_compile_s", 0.0) for s in stages)
  single = sum(steady.values()) + compiles
  out["single_pass"] = dict(stages=stages, complete=len(stages) == 4,
                            minutes={s: round(v / 60, 2) for s, v in steady.items()},
                            compile_minutes=round(compiles / 60, 2), total_minutes=round(single / 60, 2),
                            paper_minutes=PAPER_MIN, paper_total_minutes=sum(PAPER_MIN.values()),
                            goal_minutes=GOAL_MIN, within_goal=len(stages) == 4 and single / 60 <= GOAL_MIN,
                            not_counted="loading the real checkpoint (~15 GB) and writing the merged student")
  f = out["full_config"]
  counts = {"sampling": f["samplings"], "filter": f["samplings"], "training": f["trainings"],
            "evaluation": f["evaluations"]}
  full = sum(counts[s] * v for s, v in steady.items()) + compiles
  out["full_config"]["total_minutes"] = round(full / 60, 1)


def table(out: dict) -> str:
  lines = [f"{'stage':<11} {'measured':<34} {'cold s':>7} {'warm s':>7} {'recipe':<18} {'est. min':>8} "
           f"{'compile min':>11} {'paper min':>9}"]
  for s, what, recipe in (("sampling", "{prompts} prompts x {max_new_tokens} tok", "{recipe_prompts} prompts"),
                          ("filter", "{rows} rows", "{rows} rows"),
                          ("training", "{timed_steps} steps ({batch})", "{recipe_steps} steps"),
                          ("evaluation", "{samples} samples", "{recipe_samples} samples")):
    r = out.get(s)
    if not r or "extrapolated_s" not in r:
      lines.append(f"{s:<11} {'(failed: ' + r['error'][:60] + ')' if r else '(not run)'}")
      continue
    lines.append(f"{s:<11} {what.format(**r):<34} {r.get('cold_s', r.get('seconds')):>7} "
                 f"{r.get('warm_s', r.get('seconds')):>7} {recipe.format(**r):<18} "
                 f"{r['extrapolated_s'] / 60:>8.2f} {r.get('extrapolated_compile_s', 0) / 60:>11.2f} "
                 f"{PAPER_MIN.get(s, 0):>9}")
  p = out.get("single_pass")
  if p:
    lines.append(f"single pass: {p['total_minutes']} min (compiles {p['compile_minutes']}) vs the paper's "
                 f"{p['paper_total_minutes']} min; goal {p['goal_minutes']} min: "
                 f"{'met' if p['within_goal'] else 'not met' if p['complete'] else 'incomplete'}")
    f = out["full_config"]
    lines.append(f"full config ({f['samplings']} samplings, {f['trainings']} trainings, {f['evaluations']} "
                 f"evaluations): {f['total_minutes']} min")
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--arch", choices=tuple(common.ARCHS), default="qwen2.5-7b")
  ap.add_argument("--inputs", default=".gpu_inputs/smollm2", help="the tokenizer folder (sampling.py --export_inputs)")
  ap.add_argument("--config", default=str(CONFIG), help="the recipe whose counts are timed")
  ap.add_argument("--sample_batches", type=int, default=4, help="sampling batches timed (cold, then warm)")
  ap.add_argument("--train_steps", type=int, default=20, help="optimizer steps timed after the compiling one")
  ap.add_argument("--eval_fraction", type=float, default=0.2, help="fraction of the questions evaluated (twice)")
  ap.add_argument("--sample_batch_size", type=int, default=0, help="override sample.batch_size (smoke runs)")
  ap.add_argument("--max_new_tokens", type=int, default=0, help="override sample.max_new_tokens (smoke runs)")
  ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "qwen7b_recipe.json"))
  args = ap.parse_args()
  t_start = time.perf_counter()
  recipe = config_lib.from_file(args.config, "/nonexistent-model")  # only the counts are read; nothing loads it
  dtype = recipe.model.dtype
  cfg = common.arch_config(args.arch, dtype=dtype, param_dtype=recipe.model.param_dtype,
                           remat_policy=recipe.model.remat_policy)
  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  tokenizer = common.load_tokenizer(args.inputs)
  t0 = time.perf_counter()
  model = common.random_model(cfg, tokenizer, mesh)
  jax.block_until_ready(model.params)
  init_s = time.perf_counter() - t0
  # generation at a fixed length (a stop token of random weights is an arbitrary draw); training needs the stop ids
  # (the chat data checks each assistant turn ends on one)
  fixed = common.without_stop_tokens(model)
  out = dict(machine=common.machine(), device=jax.devices()[0].device_kind, jax=jax.__version__,
             arch=args.arch, params=cfg.n_params, model=cfg.to_dict(), weights="random",
             weights_note="the ~15 GB checkpoint cannot travel; no step's cost depends on weight values",
             fixed_length=True, tokenizer=f"SmolLM2's ({tokenizer.vocab_size} ids)", config=args.config,
             random_init_s=round(init_s, 1), compilation_cache=os.environ.get("JAX_COMPILATION_CACHE_DIR"),
             paper_minutes=PAPER_MIN, goal_minutes=GOAL_MIN,
             full_config=full_config(recipe), args=vars(args))
  path = pathlib.Path(args.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  # the costliest stage of the paper's stack first, the host-only filter last: a run cut short keeps what matters
  stages = (("training", lambda: run_training(args, recipe, model, out)),
            ("sampling", lambda: run_sampling(args, recipe, fixed, out)),
            ("evaluation", lambda: run_evaluation(args, recipe, fixed, out)),
            ("filter", lambda: run_filter(args, recipe, out)))
  for name, run in stages:
    t0 = time.perf_counter()
    print(f"== {name} ({t0 - t_start:.0f} s)", flush=True)
    try:
      run()
    except Exception as e:  # noqa: BLE001 — a failed stage (e.g. out of memory) must not cost the others
      traceback.print_exc()
      out[name] = dict(error=f"{type(e).__name__}: {e}"[:2000])
    out[name]["stage_wall_s"] = round(time.perf_counter() - t0, 1)
    totals(out)
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    path.write_text(json.dumps(out, indent=2) + "\n")  # after every stage: a run cut short keeps it
    print(json.dumps({name: out[name]}), flush=True)
  print(table(out))
  print(f"-> {path}")


if __name__ == "__main__":
  main()
