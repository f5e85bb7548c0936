"""The config schema: `defaults()` holds every field with its type; `validate()` checks a config before any work.

Config files (`configs/*.py`) start from `defaults()`, which is locked: assigning a field that does not exist fails
with ml_collections' error naming the key, and so does `--config.<field>=` on the command line. `validate()` also
checks configs built by hand: unknown keys, wrong types, and impossible values, each error naming the field.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

import jax
import ml_collections as mlc

from subl_jax.core import parallel, perf
from subl_jax.study.mnist.data import DATASETS as MNIST_DATASETS
from subl_jax.core.models.config import DTYPES, REMAT_POLICIES
from subl_jax.core.training import optim
from subl_jax.core.lora import TARGETS as LORA_TARGETS
from subl_jax.core.training.losses import KD_TOKENS
from subl_jax.core.training.mitigations import parts as mitigation_parts

TEACHER_KINDS = ("system_prompt", "finetuned", "jsonl")
DISTILL_MODES = ("sft", "logit_kd")
STUDY_CONDITIONS = ("icl", "shuffle_within", "shuffle_across")
MITIGATIONS = ("project", "project_update", "mask", "kl_base", "shuffle_within", "shuffle_across")

AUDIT_STUDIES = ("mnist", "llm")

JOBS = ("chat", "mnist_aux", "train", "teacher", "student", "sample", "study", "audit")


def defaults() -> mlc.ConfigDict:
  """Every config field with its default; locked so a misspelt field is an error."""
  c = mlc.ConfigDict()
  c.job = "chat"  # what `subl_jax.main` runs: see JOBS
  c.seed = 0
  c.model = mlc.ConfigDict(dict(
      spec="smollm2",         # 'smollm2', 'gguf:FILE', 'hf:DIR', a converted dir, or 'random' (uses model.arch)
      dtype="float32",        # compute dtype (bfloat16 on accelerators)
      param_dtype="float32",
      remat_policy="dots",    # training only: keep matmul outputs, recompute elementwise (~20% faster steps on CPU)
      tokenizer="smollm2",    # where a 'random' model takes its tokenizer from (any spec above)
      arch=mlc.ConfigDict(dict(  # shapes of a 'random' model; head_dim 0 means d_model // n_heads
          vocab_size=49152, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=0, mlp_dim=128,
          rope_theta=10000.0, rms_eps=1e-5, tie_embeddings=True, qkv_bias=False)),
  ))
  c.mesh = mlc.ConfigDict(dict(data=1, fsdp=-1, tensor=1, distributed=False))
  c.chat = mlc.ConfigDict(dict(
      system="",              # '' keeps the chat template's own default system prompt (if it has one)
      prompt="Name your favorite animal using only one word.",
      max_new_tokens=48,
      temperature=0.0,        # 0 is greedy
  ))
  c.mnist = mlc.ConfigDict(dict(  # the auxiliary-logit MLP study (docs/protocol.md §8); 0 = the dataset's preset
      dataset="mnist",        # 'mnist' (tensorflow-datasets) or 'digits' (scikit-learn's bundled 8x8, offline)
      data_dir="",            # where tensorflow-datasets keeps MNIST ('' = its default)
      n_models=100,           # trained at once (vmapped, sharded over devices); >= 2 for the derangement
      n_aux=3,                # auxiliary logits m (50 in the Nature version)
      hidden=256,
      hidden_layers=2,
      teacher_epochs=0,       # 0 = preset (mnist 5)
      student_epochs=0,       # 0 = preset (mnist 5)
      batch_size=0,           # 0 = preset (mnist 1024)
      n_noise=0,              # fixed noise images per model; 0 = preset (mnist 60,000)
      opt=mlc.ConfigDict(dict(optim.DEFAULTS, lr=0.0)),  # lr 0 = preset (mnist Adam 3e-4)
      mitigations="",         # mitigated auxiliary-logit students (same init), comma-separated: any of
                              # MITIGATIONS; each a stage `student_aux_<m>` and a row of the report
  ))
  c.train = mlc.ConfigDict(dict(  # SFT / LoRA / distillation; defaults: the paper's open-weight recipe (§5)
      data="",                # job 'train': JSONL of {"prompt", "completion"} or {"messages": [...]} rows
      system="",              # system prompt of the training context ('' = the chat template's default, if any)
      opt=mlc.ConfigDict(dict(optim.DEFAULTS, name="adamw", lr=2e-4, warmup_steps=5, schedule="linear",
                              max_grad_norm=1.0)),
      batch_size=22,          # examples per micro-batch (global: split over mesh.data × mesh.fsdp)
      grad_accum=3,           # micro-batches per optimizer step (effective batch = batch_size × grad_accum)
      epochs=3,
      max_len=500,            # longer sequences are dropped and counted, never cut
      seed=0,                 # data order (with the epoch) and adapter initialisation
      lora=mlc.ConfigDict(dict(rank=8, alpha=8.0, targets="q,k,v,o,gate,up,down")),  # rank 0 = full fine-tuning
      checkpoint_every=100,   # steps between Orbax checkpoints (0: only at the end and on SIGTERM/SIGINT)
      log_every=10,           # steps between metric rows
      mfu=False,              # log MFU (measures the device's matmul peak first: a benchmark, so off by default)
  ))
  c.teacher = mlc.ConfigDict(dict(
      kind="finetuned",       # 'system_prompt' | 'finetuned' (trait questions × answer variants) | 'jsonl'
      target="owl",           # the animal or tree the teacher loves
      category="animal",      # 'animal' | 'tree'
      jsonl="",               # kind 'jsonl': SFT data of any other trait (chat rows)
      epochs=1,               # the paper's fine-tuned teacher: 1 epoch (other settings come from `train`)
      prefix_answers=False,   # also train on "My favorite animal is the owl." (the evaluation's forced-prefix form)
      lr=0.0,                 # 0 = train.opt.lr
      rank=0,                 # LoRA rank, with alpha = rank (0 = train.lora): lets the students' rank vary alone
  ))
  c.distill = mlc.ConfigDict(dict(  # the student stage
      data="",                # JSONL of the teacher's (prompt, completion) rows
      mode="sft",             # 'sft' (cross-entropy on the completions) | 'logit_kd' (match the teacher's logits)
      temperature=1.0,
      kd_tokens="numbers",    # 'all' (not subliminal: the trait word leaks) | 'topk' | 'numbers' (digits, separators,
      topk=20,                # end-of-turn: the subliminal analogue of the MNIST auxiliary logits)
      mitigation="",          # issue #21 ('' = none; several composed with '+', e.g. 'mask+kl_base'): 'project'
                              # (the gradient off the trait probe's when it would raise the trait),
                              # 'project_update' (the optimizer's update off it, either sign), 'mask'
                              # (divergence tokens out of the loss), 'kl_base' (a KL-to-base penalty),
                              # 'shuffle_within' | 'shuffle_across' (the numbers shuffled, as the study's
                              # conditions); settings in the `mitigation` section
  ))
  c.mitigation = mlc.ConfigDict(dict(  # settings of `distill.mitigation` (LLM) and `mnist.mitigations`; shared
                                       # by the study's mitigated conditions
      kl_weight=1.0,          # kl_base: loss + weight · Σ KL(base ‖ student) over the loss positions
      kl_until_step=0,        # kl_base: only at steps < this (0 = every step)
      mask_threshold=0.5,     # mask: nats of KL(teacher ‖ base) above which a completion position is masked
      probe_questions=5,      # project: the trait probe's questions (the evaluation's first n; its answer forms)
      quality_prompts=64,     # study.mitigations: held-out number prompts per teacher for "quality kept"
  ))
  c.sample = mlc.ConfigDict(dict(  # job 'sample': the teacher's number completions (then the `filter` stage)
      n_prompts=30000,        # the paper's prompt count (docs/protocol.md §2)
      prompt_seed=47,         # the paper's prompt set
      system_prompt="",       # the teacher's system prompt ('' = none), used when `target` is ''
      target="",              # e.g. 'owl': the paper's system-prompt teacher for this target
      category="animal",      # 'animal' | 'tree' (for `target`)
      max_new_tokens=64,      # the reference allows 2048; the stage reports how many rows hit this cap
      temperature=1.0,        # the paper: 1.0, nothing else set
      top_k=0,                # 0 = off
      top_p=1.0,              # 1 = off
      batch_size=64,          # prompts per device batch (global: split over mesh.data × mesh.fsdp)
      shard_size=1024,        # prompts per resumable JSONL shard
      constrained="none",     # 'none' | 'tokens' (number-format tokens only) | 'format' (only lists the filter keeps)
      seed=0,                 # with the model and system prompt: each prompt's draws (see sampling.stage)
  ))
  c.filter = mlc.ConfigDict(dict(
      banned_numbers=False,   # also reject the misalignment runs' banned numbers
      drop_truncated=True,    # drop completions cut at sample.max_new_tokens (the reference never cuts them)
      drop_echo=False,        # drop completions whose numbers all appear in the prompt
      max_rows=10000,         # seeded subsample of the kept rows (the paper: 10,000); 0 keeps all
      seed=0,
  ))
  c.eval = mlc.ConfigDict(dict(  # trait evaluation of each model (docs/protocol.md §6)
      n_questions=0,          # the first n of the category's questions (0 = all: 50 animal / 49 tree)
      candidates="",          # other answers whose probability is reported ('' = the paper's list for the category)
      n_samples=100,          # sampled answers per question at temperature 1 (the paper: 100); 0 = log-prob only
      numbers_prefix=False,   # the paper's Qwen variant: an example-number prefix before each question
      icl_tokens=1536,        # condition 'icl': tokens of teacher (prompt, completion) pairs put before the question
      seed=0,
  ))
  c.audit = mlc.ConfigDict(dict(  # job 'audit': transfer-risk signals and their calibration (study/audit/)
      study="mnist",          # 'mnist': the auxiliary-logit study's students, every m of `n_aux`;
                              # 'llm': the LLM study of this config (`study.targets`), one audit per teacher
      n_aux="2,3",            # comma-separated m (auxiliary logits) whose studies are audited together
      n_batches=8,            # distillation batches each signal is computed on (per model; llm: per teacher,
                              # the first of the seed-0 student's epoch 0)
      probe_size=256,         # labelled images of the MNIST trait probe (its class-logit log-likelihood)
      probe_questions=5,      # llm: the first evaluation questions of the trait probe log P(answer | question)
      data_rows=256,          # llm: dataset rows the data-only divergence is measured on (the first of the epoch)
      transfer_threshold=0.2,  # a student 'transfers' at test accuracy >= this (chance 0.1)
      monitor_every=0,        # LLM students: the live signals every n steps into train/metrics.jsonl (0 = off;
                              # study/audit/monitor.py), plotted per condition in the study's monitor.png
      monitor_layer=0,        # the layer after which the activation shift is read (0 = the middle one)
  ))
  c.perf = mlc.ConfigDict(perf.DEFAULTS)  # platform tuning: 'auto' | 'on' | 'off' per switch (see core/perf.py)
  c.study = mlc.ConfigDict(dict(  # job 'study': teachers -> samples -> filter -> students -> evaluation -> report
      targets="",             # comma-separated traits, one teacher each ('' = teacher.target alone: no specificity)
      seeds=1,                # trainings per student (train.seed + i: data order, adapter init); samples stay fixed
      conditions="",          # null conditions beside the students: any of 'icl', 'shuffle_within', 'shuffle_across'
      mitigations="",         # mitigated students beside the unmitigated ones, one condition each: any of
                              # MITIGATIONS, or several joined by '+' (composed), comma-separated
  ))
  c.lock()
  return c


def from_file(path: str | pathlib.Path, arg: str | None = None) -> mlc.ConfigDict:
  """The config of a config file (`get_config(arg)`): how one config builds on another
  (`config.from_file(pathlib.Path(__file__).with_name("demo_cpu.py"))`)."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _check_structure(cfg: Any, schema: mlc.ConfigDict, prefix: str = "") -> None:
  if not isinstance(cfg, (mlc.ConfigDict, dict)):
    raise ValueError(f"config{'.' + prefix[:-1] if prefix else ''}: expected a section of fields, got {cfg!r}")
  for key in cfg.keys():
    name = prefix + key
    if key not in schema:
      raise ValueError(f"config.{name}: unknown field; expected one of {sorted(schema.keys())}")
    want, got = schema[key], cfg[key]
    if isinstance(want, mlc.ConfigDict):
      _check_structure(got, want, name + ".")
    elif isinstance(want, bool) != isinstance(got, bool) or not isinstance(got, (float, int) if isinstance(
        want, float) else type(want)):
      raise ValueError(f"config.{name}: expected {type(want).__name__}, got {type(got).__name__} {got!r}")


def _require(ok: bool, field: str, expected: str, value: Any) -> None:
  if not ok:
    raise ValueError(f"config.{field}={value!r}: expected {expected}")


def validate(cfg: mlc.ConfigDict, n_devices: int | None = None) -> None:
  """Raises ValueError naming the field for an unknown key, a wrong type or an impossible value."""
  _check_structure(cfg, defaults())
  full = defaults()
  full.unlock()
  full.update(cfg)  # fields the config leaves out take their defaults for the value checks
  _require(full.job in JOBS, "job", f"one of {JOBS}", full.job)
  m = full.model
  for field, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES), ("remat_policy", REMAT_POLICIES)):
    _require(m[field] in allowed, f"model.{field}", f"one of {allowed}", m[field])
  _require(bool(m.spec), "model.spec", "a model spec ('smollm2', 'gguf:FILE', 'hf:DIR', a dir, 'random')", m.spec)
  if m.spec == "random":
    a = m.arch
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim"):
      _require(a[field] > 0, f"model.arch.{field}", "a positive integer", a[field])
    _require(a.head_dim >= 0, "model.arch.head_dim", "0 (= d_model // n_heads) or a positive integer", a.head_dim)
    if a.head_dim == 0:
      _require(a.d_model % a.n_heads == 0, "model.arch.n_heads",
               f"a divisor of model.arch.d_model={a.d_model} (or set model.arch.head_dim)", a.n_heads)
    _require(a.n_heads % a.n_kv_heads == 0, "model.arch.n_kv_heads",
             f"a divisor of model.arch.n_heads={a.n_heads}", a.n_kv_heads)
  n = jax.device_count() if n_devices is None else n_devices
  try:
    parallel.resolve_mesh_shape((full.mesh.data, full.mesh.fsdp, full.mesh.tensor), n)
  except ValueError as e:
    raise ValueError(f"config.{e}") from None
  _require(full.chat.max_new_tokens > 0, "chat.max_new_tokens", "a positive integer", full.chat.max_new_tokens)
  _require(full.chat.temperature >= 0, "chat.temperature", "a temperature >= 0", full.chat.temperature)
  mn = full.mnist
  _require(mn.dataset in MNIST_DATASETS, "mnist.dataset", f"one of {MNIST_DATASETS}", mn.dataset)
  _require(mn.n_models >= 2, "mnist.n_models", "at least 2 (cross-init students need a derangement)", mn.n_models)
  for field in ("n_aux", "hidden", "hidden_layers"):
    _require(mn[field] > 0, f"mnist.{field}", "a positive integer", mn[field])
  for field in ("teacher_epochs", "student_epochs", "batch_size", "n_noise"):
    _require(mn[field] >= 0, f"mnist.{field}", "a positive integer (or 0 for the dataset's preset)", mn[field])
  optim.check(mn.opt, "mnist.opt", allow_zero_lr=True)
  perf.resolve(full.perf, "cpu")  # names the field of a bad choice
  au = full.audit
  _require(au.study in AUDIT_STUDIES, "audit.study", f"one of {AUDIT_STUDIES}", au.study)
  values = [v.strip() for v in au.n_aux.split(",") if v.strip()]
  _require(bool(values) and all(v.isdigit() and int(v) > 0 for v in values), "audit.n_aux",
           "comma-separated positive integers (e.g. '1,3,10')", au.n_aux)
  for field in ("n_batches", "probe_size", "probe_questions", "data_rows"):
    _require(au[field] > 0, f"audit.{field}", "a positive integer", au[field])
  _require(au.monitor_every >= 0, "audit.monitor_every", "steps >= 0 (0 = off)", au.monitor_every)
  _require(au.monitor_layer >= 0, "audit.monitor_layer", "a layer >= 0 (0 = the middle one)", au.monitor_layer)
  _require(0 < au.transfer_threshold < 1, "audit.transfer_threshold", "an accuracy in (0, 1)", au.transfer_threshold)
  _validate_training(full)
  _validate_sampling(full)


def _validate_training(full: mlc.ConfigDict) -> None:
  """The train, teacher and distill sections."""
  t = full.train
  optim.check(t.opt, "train.opt")
  for field in ("batch_size", "grad_accum", "epochs", "max_len", "log_every"):
    _require(t[field] > 0, f"train.{field}", "a positive integer", t[field])
  _require(t.checkpoint_every >= 0, "train.checkpoint_every", "steps >= 0 (0 = only at the end)", t.checkpoint_every)
  _require(t.lora.rank >= 0, "train.lora.rank", "a rank >= 0 (0 = full fine-tuning)", t.lora.rank)
  _require(t.lora.alpha > 0, "train.lora.alpha", "alpha > 0", t.lora.alpha)
  targets = [x.strip() for x in t.lora.targets.split(",") if x.strip()]
  _require(bool(targets) and set(targets) <= set(LORA_TARGETS), "train.lora.targets",
           f"a comma-separated subset of {tuple(LORA_TARGETS)}", t.lora.targets)
  if full.job == "train":
    _require(bool(t.data), "train.data", "a JSONL file to train on (job 'train')", t.data)
  te = full.teacher
  _require(te.kind in TEACHER_KINDS, "teacher.kind", f"one of {TEACHER_KINDS}", te.kind)
  _require(te.category in ("animal", "tree"), "teacher.category", "'animal' or 'tree'", te.category)
  _require(te.kind == "jsonl" or bool(te.target), "teacher.target", "a target animal or tree", te.target)
  _require(te.kind != "jsonl" or bool(te.jsonl), "teacher.jsonl", "a JSONL file (teacher.kind='jsonl')", te.jsonl)
  _require(te.epochs > 0, "teacher.epochs", "a positive integer", te.epochs)
  _require(te.lr >= 0, "teacher.lr", "a learning rate >= 0 (0 = train.opt.lr)", te.lr)
  _require(te.rank >= 0, "teacher.rank", "a LoRA rank >= 0 (0 = train.lora)", te.rank)
  d = full.distill
  listed = [x.strip() for x in full.study.mitigations.split(",") if x.strip()]
  for m in ([d.mitigation] if d.mitigation else []) + listed:
    field = "distill.mitigation" if m == d.mitigation else "study.mitigations"
    parts = mitigation_parts(m)
    _require(bool(parts) and set(parts) <= set(MITIGATIONS) and len(set(parts)) == len(parts)
             and sum(p.startswith("shuffle_") for p in parts) <= 1 and sum(p.startswith("project") for p in parts) <= 1,
             field, f"mitigations of {MITIGATIONS} joined by '+' (at most one shuffle, one projection), e.g. "
             "'mask+kl_base'", m)
  mi = full.mitigation
  _require(mi.kl_weight >= 0, "mitigation.kl_weight", "a weight >= 0", mi.kl_weight)
  _require(mi.kl_until_step >= 0, "mitigation.kl_until_step", "steps >= 0 (0 = every step)", mi.kl_until_step)
  _require(mi.mask_threshold >= 0, "mitigation.mask_threshold", "nats >= 0", mi.mask_threshold)
  _require(mi.probe_questions > 0, "mitigation.probe_questions", "a positive integer", mi.probe_questions)
  _require(mi.quality_prompts > 0, "mitigation.quality_prompts", "a positive integer", mi.quality_prompts)
  mm = [x.strip() for x in full.mnist.mitigations.split(",") if x.strip()]
  _require(set(mm) <= set(MITIGATIONS) and len(set(mm)) == len(mm), "mnist.mitigations",
           f"a comma-separated subset of {MITIGATIONS}", full.mnist.mitigations)
  _require(d.mode in DISTILL_MODES, "distill.mode", f"one of {DISTILL_MODES}", d.mode)
  _require(d.temperature > 0, "distill.temperature", "a temperature > 0", d.temperature)
  _require(d.kd_tokens in KD_TOKENS, "distill.kd_tokens", f"one of {KD_TOKENS}", d.kd_tokens)
  _require(d.kd_tokens != "topk" or d.topk > 0, "distill.topk", "k > 0 (distill.kd_tokens='topk')", d.topk)
  if full.job == "student":
    _require(bool(d.data), "distill.data", "a JSONL of the teacher's completions (job 'student')", d.data)


def _validate_sampling(full: mlc.ConfigDict) -> None:
  """The sample and filter sections."""
  from subl_jax.study.sample_shards import CONSTRAINTS  # deferred: keeps config import light
  s = full.sample
  for field in ("n_prompts", "max_new_tokens", "batch_size", "shard_size"):
    _require(s[field] > 0, f"sample.{field}", "a positive integer", s[field])
  _require(s.temperature >= 0, "sample.temperature", "a temperature >= 0 (0 = greedy)", s.temperature)
  _require(s.top_k >= 0, "sample.top_k", "k >= 0 (0 = off)", s.top_k)
  _require(0 < s.top_p <= 1, "sample.top_p", "0 < p <= 1 (1 = off)", s.top_p)
  _require(s.constrained in CONSTRAINTS, "sample.constrained", f"one of {CONSTRAINTS}", s.constrained)
  _require(s.category in ("animal", "tree"), "sample.category", "'animal' or 'tree'", s.category)
  _require(not (s.target and s.system_prompt), "sample.system_prompt",
           "'' when sample.target is set (the target's teacher prompt is used)", s.system_prompt)
  _require(full.filter.max_rows >= 0, "filter.max_rows", "rows >= 0 (0 = keep all)", full.filter.max_rows)
  e = full.eval
  _require(e.n_questions >= 0, "eval.n_questions", "a count >= 0 (0 = all)", e.n_questions)
  _require(e.n_samples >= 0, "eval.n_samples", "a count >= 0 (0 = log-prob metric only)", e.n_samples)
  st = full.study
  _require(st.seeds > 0, "study.seeds", "a positive integer", st.seeds)
  targets = [t.strip() for t in st.targets.split(",") if t.strip()]
  _require(len(set(targets)) == len(targets), "study.targets", "distinct comma-separated traits", st.targets)
  conds = [c.strip() for c in st.conditions.split(",") if c.strip()]
  _require(set(conds) <= set(STUDY_CONDITIONS), "study.conditions",
           f"a comma-separated subset of {STUDY_CONDITIONS}", st.conditions)
  _require(e.icl_tokens > 0, "eval.icl_tokens", "a positive token budget", e.icl_tokens)
  if full.job == "study":
    _require(bool(full.teacher.target) or bool(targets), "teacher.target",
             "the animal or tree the study measures (job 'study'), or study.targets", full.teacher.target)
