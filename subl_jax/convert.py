"""Convert a checkpoint into a model directory that every stage loads, or export one to Hugging Face.

  python -m subl_jax.convert --from=gguf:FILE --to=DIR
  python -m subl_jax.convert --from=hf:DIR --to=DIR [--param_dtype=bfloat16]
  python -m subl_jax.convert --from=smollm2 --to=DIR   # the embedded default model
  python -m subl_jax.convert --from=MODEL_OR_STAGE_DIR --to=hf:OUT [--param_dtype=bfloat16]

Import (`--to=DIR`) writes DIR/model_config.json, DIR/params (Orbax), DIR/tokenizer.json, DIR/tokenizer_config.json,
DIR/source.json. Export (`--to=hf:OUT`) takes a converted directory, a teacher/student stage directory (its trained
`model/`) or any of the sources above, and writes OUT/config.json, OUT/generation_config.json, OUT/model.safetensors
and the tokenizer files, which `transformers.AutoModelForCausalLM` / `AutoTokenizer` load; for a LoRA stage also
OUT/adapter/ (a PEFT adapter on the student's base model, which is exported separately). See
`subl_jax.core.checkpoints.hf_export`. Without `--param_dtype` an export keeps the stored dtype.
"""

from __future__ import annotations

import jax
from absl import app, flags, logging

from subl_jax.core import api, parallel
from subl_jax.core.checkpoints import fetch, hf_export, store

_FROM = flags.DEFINE_string("from", None, "Source: gguf:FILE, hf:DIR, smollm2, or (export) a converted or stage dir.")
_TO = flags.DEFINE_string("to", None, "Output directory (written atomically); hf:OUT exports to Hugging Face.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16", "float16"],
                                 "Storage dtype of the converted parameters.")
flags.mark_flags_as_required(["from", "to"])


def convert(source: str, target: str, param_dtype: str = "float32") -> None:
  """Imports `source` (gguf:FILE, hf:DIR or smollm2) and writes a converted model directory at `target`."""
  if source == "smollm2":
    source = f"gguf:{fetch.smollm2_gguf_path()}"
  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  cfg, params, tokenizer, description = api.import_checkpoint(source, mesh, param_dtype=param_dtype)
  out = store.save(target, cfg, params, tokenizer, description)
  print(f"wrote {out}: {cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}, "
        f"{cfg.n_params / 1e6:.1f}M parameters ({param_dtype})")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if _TO.value.startswith("hf:"):
    out = hf_export.export(_FROM.value, _TO.value[3:], _PARAM_DTYPE.value if _PARAM_DTYPE.present else None)
    adapter = out / hf_export.ADAPTER_DIR
    print(f"wrote {out} (transformers){f' and the PEFT adapter {adapter}' if adapter.is_dir() else ''}")
    return
  convert(_FROM.value, _TO.value, _PARAM_DTYPE.value)


if __name__ == "__main__":
  app.run(main)
