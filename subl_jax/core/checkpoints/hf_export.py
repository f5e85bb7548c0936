"""Export a model to a Hugging Face directory: `python -m subl_jax.convert --from=SRC --to=hf:OUT`.

SRC is a converted model directory (`store.py`), a teacher/student stage directory (`core/training/export.py`: its
`model/` is exported), or any `api.load` spec (`smollm2`, `gguf:FILE`, `hf:DIR`). OUT gets what transformers loads:
  * `config.json` — `LlamaForCausalLM` (Llama family, SmolLM2) or `Qwen2ForCausalLM` (`qkv_bias`), and
    `generation_config.json` (every stop id as `eos_token_id`, so `generate` stops where our sampler stops);
  * `model.safetensors` — HF names and [out, in] layouts: the import table of `mapping.py` inverted, each tensor
    checked to import back bit-exactly; our [L, ...] stacked layers are written one tensor per layer;
  * `tokenizer.json` + `tokenizer_config.json` (chat template, special tokens; `PreTrainedTokenizerFast`).
For a LoRA stage OUT is the *merged* student (plain `AutoModelForCausalLM` loads it), and `OUT/adapter/` holds the
unmerged adapter in PEFT's LoRA format. That adapter applies to the student's *base* model, which is not copied
here: export it separately (`--from=<base model dir or spec> --to=hf:BASE`) and load
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), OUT / "adapter")`.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import struct
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from subl_jax.core import api, parallel
from subl_jax.core.checkpoints import mapping, store
from subl_jax.core.checkpoints.tokenizer import Tokenizer
from subl_jax.core.models.config import ModelConfig
from subl_jax.core.training import export as stage_export
from subl_jax.core import lora as lora_lib

ADAPTER_DIR = "adapter"
# Our LoRA targets -> the HF module names PEFT's `target_modules` match.
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}

_copy = lambda w: w
_t = lambda w: w.T
# The inverse of each import transform (per layer for stacked rows). Every one flattens the input axes and the
# output axes of our [*in, *out] weight (C order, as the import's reshape) and transposes to [out, in].
INVERSE: dict[str, Callable[[Any], Any]] = {
    "embed": _copy, "final_norm": _copy, "layers/attn_norm": _copy, "layers/mlp_norm": _copy,
    "lm_head": _t, "layers/gate": _t, "layers/up": _t, "layers/down": _t,
    "layers/q": lambda w: w.reshape(w.shape[0], -1).T,  # [D, H, Dh] -> [H*Dh, D]
    "layers/k": lambda w: w.reshape(w.shape[0], -1).T,
    "layers/v": lambda w: w.reshape(w.shape[0], -1).T,
    "layers/q_bias": lambda w: w.reshape(-1), "layers/k_bias": lambda w: w.reshape(-1),
    "layers/v_bias": lambda w: w.reshape(-1),
    "layers/o": lambda w: w.reshape(-1, w.shape[-1]).T,  # [H, Dh, D] -> [D, H*Dh]
}

# (HF name, shape, safetensors dtype, producer of the [out, in] numpy array)
Entry = tuple[str, tuple[int, ...], str, Callable[[], np.ndarray]]


def resolve(source: str) -> tuple[str, pathlib.Path | None]:
  """(the `api.load` spec of the model to export, the stage directory or None) of a `--from` value."""
  path = pathlib.Path(source).expanduser()
  if (path / stage_export.STAGE_FILE).is_file():
    return stage_export.model_spec(path), path  # raises for a system-prompt teacher (it has no model)
  if store.is_converted(path) or source == "smollm2" or source.startswith(("gguf:", "hf:")):
    return str(path) if store.is_converted(path) else source, None
  raise ValueError(f"{path}: nothing to export here: expected a converted model directory ({store.CONFIG_FILE} + "
                   f"{store.PARAMS_DIR}/), a stage directory ({stage_export.STAGE_FILE} + {stage_export.MODEL_DIR}/), "
                   "or a spec gguf:FILE, hf:DIR, smollm2")


def hf_config(cfg: ModelConfig, tok: Tokenizer) -> dict[str, Any]:
  """`config.json` for transformers 5 (`rope_parameters`) that also reads in 4.x (`rope_theta`, `rope_scaling`)."""
  qwen = cfg.qkv_bias  # the only architecture we have with q/k/v biases
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  scaling = None
  if cfg.rope_scaling == "llama3":
    scaling = {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
               "high_freq_factor": cfg.rope_high_freq_factor,
               "original_max_position_embeddings": cfg.rope_original_max_len}
    rope.update(scaling)
  out = {
      "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"], "model_type": "qwen2" if qwen else "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_eps,
      # ModelConfig does not keep the trained context length; the RoPE base length (x the Llama 3 factor) stands in.
      "max_position_embeddings": int(cfg.rope_original_max_len * cfg.rope_factor),
      "rope_theta": cfg.rope_theta, "rope_scaling": scaling, "rope_parameters": rope,
      "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": cfg.param_dtype, "dtype": cfg.param_dtype,
      "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
      "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
  }
  out.update({"use_sliding_window": False, "sliding_window": None} if qwen else
             {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1})
  return out


def _st_dtype(a: jax.Array | jax.ShapeDtypeStruct) -> str:
  name = jnp.dtype(a.dtype).name
  if name not in _ST_DTYPES:
    raise ValueError(f"cannot export parameters of dtype {name}; expected one of {sorted(_ST_DTYPES)}")
  return _ST_DTYPES[name]


def model_entries(cfg: ModelConfig, params: Any) -> list[Entry]:
  """Every HF tensor of the model, produced one at a time (a layer's slice is pulled to host only when written)."""
  forward = {row[0]: row[3] for row in mapping.TABLE}
  entries: list[Entry] = []
  for path, names in mapping.source_names(cfg, "hf").items():
    if path not in INVERSE:
      raise ValueError(f"no export for {path} (a mapping.TABLE row without an inverse in hf_export.INVERSE)")
    leaf = params
    for key in path.split("/"):
      leaf = leaf[key]
    stacked = path.startswith("layers/")
    per_layer = jax.ShapeDtypeStruct(leaf.shape[1:] if stacked else leaf.shape, leaf.dtype)
    shape = tuple(jax.eval_shape(INVERSE[path], per_layer).shape)

    def get(path=path, leaf=leaf, i=None):
      ours = np.asarray(leaf if i is None else leaf[i])
      hf = np.ascontiguousarray(INVERSE[path](ours))
      # Importing the tensor back must give our weight bit for bit: keeps INVERSE honest against mapping.TABLE.
      if not np.array_equal(forward[path](hf, cfg), ours, equal_nan=True):
        raise AssertionError(f"hf_export.INVERSE[{path!r}] does not invert mapping.TABLE")
      return hf

    for i, name in enumerate(names):
      entries.append((name, shape, _st_dtype(leaf), lambda g=get, i=i if stacked else None: g(i=i)))
  return entries


def lora_entries(lora: lora_lib.LoraConfig, adapters: dict) -> list[Entry]:
  """PEFT tensors: lora_A [r, in], lora_B [out, r] per layer and target, so that B_hf·A_hf = INVERSE(A·B).

  Our A [*in, r], B [r, *out] per layer: flattening their input/output axes and transposing is exactly what INVERSE
  does to a weight [*in, *out] (e.g. o's (heads, head_dim) input axes become o_proj's H*Dh columns).
  """
  entries: list[Entry] = []
  r = lora.rank
  for target in lora.targets:
    a_l, b_l = adapters["layers"][target]["a"], adapters["layers"][target]["b"]
    prefix = "base_model.model.model.layers.{i}." + HF_MODULES[target]
    for i in range(a_l.shape[0]):
      n_in, n_out = int(np.prod(a_l.shape[1:-1])), int(np.prod(b_l.shape[2:]))
      entries.append((f"{prefix.format(i=i)}.lora_A.weight", (r, n_in), _st_dtype(a_l),
                      lambda a=a_l, i=i: np.ascontiguousarray(np.asarray(a[i]).reshape(-1, r).T)))
      entries.append((f"{prefix.format(i=i)}.lora_B.weight", (n_out, r), _st_dtype(b_l),
                      lambda b=b_l, i=i: np.ascontiguousarray(np.asarray(b[i]).reshape(r, -1).T)))
  return entries


def peft_config(lora: lora_lib.LoraConfig) -> dict[str, Any]:
  """`adapter_config.json`: plain LoRA with PEFT's scale alpha / r (= ours), no dropout, bias or rsLoRA."""
  alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": alpha,
          "target_modules": [HF_MODULES[t].split(".")[-1] for t in lora.targets], "lora_dropout": 0.0,
          "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
          "init_lora_weights": True, "modules_to_save": None, "base_model_name_or_path": None}


def write_safetensors(path: pathlib.Path, entries: list[Entry]) -> None:
  """A safetensors file written tensor by tensor (the header needs only shapes), so memory holds one at a time."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, shape, dtype, _ in entries:
    size = int(np.prod(shape, dtype=np.int64)) * {"F32": 4, "BF16": 2, "F16": 2}[dtype]
    header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
    offset += size
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as safetensors' own writer does
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for name, shape, _, get in entries:
      array = get()
      if array.shape != shape:
        raise AssertionError(f"{name}: produced {array.shape}, header says {shape}")
      f.write(array.reshape(-1).view(np.uint8).data)  # bytes view: buffers refuse bfloat16


def write_tokenizer(out: pathlib.Path, tok: Tokenizer) -> None:
  """`tokenizer.json` as ours is, and an HF `tokenizer_config.json` (our private `subl_jax` section dropped)."""
  tok.save(out)
  config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
  config.pop("subl_jax")
  # The generic fast tokenizer loads tokenizer.json as it is; a model-specific class could rebuild the pre-tokenizer.
  config.update(tokenizer_class="PreTrainedTokenizerFast", model_input_names=["input_ids", "attention_mask"])
  (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_adapters(stage_dir: pathlib.Path, cfg: ModelConfig) -> tuple[lora_lib.LoraConfig, dict] | None:
  """The stage's unmerged LoRA adapters (`adapters/` from `training.export.save_adapters`), or None if it has none."""
  d = stage_dir / stage_export.ADAPTERS_DIR
  if not d.is_dir():
    return None
  try:
    fields = json.loads((d / stage_export.LORA_FILE).read_text())
    lora = lora_lib.LoraConfig(int(fields["rank"]), float(fields["alpha"]), tuple(fields["targets"]))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{d / stage_export.LORA_FILE}: cannot read the LoRA config ({e})") from None
  shapes = lora_lib.adapter_shapes(cfg, lora)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(cfg.param_dtype), sharding=device), shapes)
  try:
    adapters = ocp.StandardCheckpointer().restore((d / stage_export.ADAPTER_PARAMS_DIR).absolute(), target)
  except Exception as e:  # orbax raises many types for missing/corrupt/mismatched arrays
    raise ValueError(f"{d / stage_export.ADAPTER_PARAMS_DIR}: cannot restore the adapters for {lora} "
                     f"({type(e).__name__}: {str(e)[:500]})") from None
  return lora, adapters


def export(source: str, out: str | pathlib.Path, param_dtype: str | None = None) -> pathlib.Path:
  """Writes the HF directory `out` for `source` (see the module docstring); `param_dtype` casts the weights."""
  if not str(out).strip():
    raise ValueError("hf export: empty output directory (expected --to=hf:OUT)")
  spec, stage_dir = resolve(source)
  final = pathlib.Path(out).expanduser().absolute()
  if final.exists() and any(final.iterdir()) and not (final / "config.json").is_file():
    raise FileExistsError(f"{final}: exists and is not an HF model directory; not overwriting it")
  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  model = api.load(spec, mesh, **({"param_dtype": param_dtype} if param_dtype else {}))
  cfg, tok = model.config, model.tokenizer
  adapters = load_adapters(stage_dir, cfg) if stage_dir is not None else None
  tmp = final.with_name(final.name + ".partial")  # written whole, then renamed: never a half-written OUT
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  (tmp / "config.json").write_text(json.dumps(hf_config(cfg, tok), indent=2) + "\n")
  generation = {"bos_token_id": tok.bos_id, "eos_token_id": tok.stop_ids or tok.eos_id, "pad_token_id": tok.pad_id}
  (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
  write_safetensors(tmp / "model.safetensors", model_entries(cfg, model.params))
  write_tokenizer(tmp, tok)
  if adapters is not None:
    lora, tree = adapters
    (tmp / ADAPTER_DIR).mkdir()
    (tmp / ADAPTER_DIR / "adapter_config.json").write_text(json.dumps(peft_config(lora), indent=2) + "\n")
    write_safetensors(tmp / ADAPTER_DIR / "adapter_model.safetensors", lora_entries(lora, tree))
  if final.exists():
    shutil.rmtree(final)
  tmp.rename(final)
  return final
