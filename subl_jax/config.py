"""The config schema: `defaults()` holds every field with its type; `validate()` checks a config before any work.

Config files (`configs/*.py`) start from `defaults()`, which is locked: assigning a field that does not exist fails
with ml_collections' error naming the key, and so does `--config.<field>=` on the command line. `validate()` also
checks configs built by hand: unknown keys, wrong types, and impossible values, each error naming the field.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections as mlc

from subl_jax import parallel
from subl_jax.mnist.data import DATASETS as MNIST_DATASETS
from subl_jax.models.config import DTYPES, REMAT_POLICIES
from subl_jax.training import optim

JOBS = ("chat", "mnist_aux")


def defaults() -> mlc.ConfigDict:
  """Every config field with its default; locked so a misspelt field is an error."""
  c = mlc.ConfigDict()
  c.job = "chat"  # what `subl_jax.main` runs: see JOBS
  c.seed = 0
  c.model = mlc.ConfigDict(dict(
      spec="smollm2",         # 'smollm2', 'gguf:FILE', 'hf:DIR', a converted dir, or 'random' (uses model.arch)
      dtype="float32",        # compute dtype (bfloat16 on accelerators)
      param_dtype="float32",
      remat_policy="none",
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
  c.mnist = mlc.ConfigDict(dict(  # the auxiliary-logit MLP study (PROTOCOL.md §8); 0 = the dataset's preset
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
  ))
  c.lock()
  return c


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
