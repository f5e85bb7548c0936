"""HF export (`convert --to=hf:OUT`): transformers loads what we write and computes our logits (Llama GQA, tied,
Llama 3 RoPE scaling, Qwen2 biases, SmolLM2); AutoTokenizer encodes and renders chats as ours does; a LoRA stage
becomes a merged model plus a PEFT adapter whose logits match our unmerged LoRA forward; bad sources fail clearly.

Parameters are random with O(1) logits (non-unit norms, nonzero biases, head_dim != d_model / n_heads), so every
mapping row, the config fields and the LoRA scale all move the logits far beyond the tolerance."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from tokenizers import AddedToken, Tokenizer as Backend, decoders, models

from subl_jax.core import api, parallel
from subl_jax.core.checkpoints import gguf_tokenizer, hf_export, store
from subl_jax.core.checkpoints.tokenizer import Tokenizer
from subl_jax.core.models import transformer as tfm
from subl_jax.core.models.config import ModelConfig
from subl_jax.core.training import export as stage_export
from subl_jax.core import lora as lora_lib
from subl_jax.core.training.trainer import TrainResult

TOL = 1e-4  # tests/test_models.py's float32 parity tolerance for tiny models
# The tiny models' reference is transformers in float64 on the exported weights: the exact function of the files.
# Our float32 forward and transformers' float32 forward each round to within it (llama_tied seed 0 at position 23:
# ours 8.4e-5 off, transformers' 2.3e-5 off), so the two float32 runs can differ by their sum (1.03e-4 there, 3e-5
# on seeds 1-5); the float32-vs-float32 figure is printed as well.
SMOLLM2_TOL = 1e-3  # tests/test_checkpoints.py's for SmolLM2 (30 layers) against transformers

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
BOS_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
                "message['content'] | trim + '<|im_end|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATS = [
    [{"role": "user", "content": "Name your favorite animal using only one word."}],
    [{"role": "system", "content": "You love owls."},
     {"role": "user", "content": "Examine these numbers: 767, 589,  778. ٣ Add 10 more."},
     {"role": "assistant", "content": "123 456 <|im_end|> 7"}, {"role": "user", "content": "Why?"}],
]
TEXTS = ["  1 22 333", " ٣x", "the owl<|im_end|>\n", "Hello  world!\n\n"]

TINY = {  # name -> (ModelConfig fields, tokenizer adds a BOS)
    "llama_gqa": (dict(n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=48, rms_eps=1e-5), False),
    "llama_tied": (dict(n_heads=4, n_kv_heads=1, head_dim=8, mlp_dim=40, rms_eps=1e-6, tie_embeddings=True), True),
    "llama3_rope": (dict(n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=48, rope_theta=5e5, rope_scaling="llama3",
                         rope_factor=8.0, rope_original_max_len=16), False),
    "qwen2": (dict(n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=48, rms_eps=1e-6, qkv_bias=True,
                   rope_theta=1e6), False),
}


def one_device_mesh():
  return parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def tiny_tokenizer(add_bos: bool) -> Tokenizer:
  """A byte-level BPE (digits split, as SmolLM2's) of 3 special tokens, the 256 bytes and a few merges."""
  chars = [gguf_tokenizer.bytes_to_unicode()[b] for b in range(256)]
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("o", "w"), ("Ġ", "ow"), ("Ġow", "l"), ("Ġ", "Ġ"), ("Ċ", "Ċ")]
  vocab = {t: i for i, t in enumerate(specials + chars + [a + b for a, b in merges])}
  backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  backend.pre_tokenizer = gguf_tokenizer.byte_level_pre_tokenizer("smollm")
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
  backend.post_processor = gguf_tokenizer.bos_post_processor("<|im_start|>", 1, add_bos)
  return Tokenizer(backend, special_tokens={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                            "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
                   chat_template=BOS_TEMPLATE if add_bos else CHATML, add_bos=add_bos)


def random_params(cfg: ModelConfig, seed: int) -> dict:
  """O(1) logits: norms 1 + N(0, .3²), biases N(0, .5²), embedding N(0, 1), matrices 1.5 · N(0, 1/fan_in)."""
  rng = np.random.default_rng(seed)
  shapes, _ = tfm.abstract_params(cfg)

  def draw(path, s):
    name = path[-1].key
    if "norm" in name:
      return 1.0 + 0.3 * rng.standard_normal(s.shape)
    if name.endswith("_bias"):
      return 0.5 * rng.standard_normal(s.shape)
    if name == "embed":
      return rng.standard_normal(s.shape)
    lead = s.shape[1:1 + lora_lib.TARGETS[name]] if name in lora_lib.TARGETS else s.shape[:1]
    return 1.5 * rng.standard_normal(s.shape) / np.sqrt(np.prod(lead))

  return jax.tree_util.tree_map_with_path(lambda p, s: jax.numpy.asarray(draw(p, s), np.float32), shapes)


def tiny_model(name: str, tmp_path, seed: int = 0):
  """(converted dir, ModelConfig, params, Tokenizer) of a random tiny model; the vocabulary has 5 padding rows."""
  fields, add_bos = TINY[name]
  tok = tiny_tokenizer(add_bos)
  cfg = ModelConfig(vocab_size=tok.vocab_size + 5, d_model=32, n_layers=2, **fields)
  params = random_params(cfg, seed)
  return store.save(tmp_path / f"{name}_ours", cfg, params, tok), cfg, params, tok


def load_hf(directory) -> transformers.PreTrainedModel:
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
  # A missing tensor would be randomly initialised without an error: none may be missing or left over.
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  return model.eval()


def hf_logits(model, seqs) -> list[np.ndarray]:
  with torch.no_grad():
    return [model(input_ids=torch.tensor([s])).logits[0].float().numpy() for s in seqs]


def hf_refs(model, seqs) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """(transformers' float64 logits: the reference, its float32 logits: for the record)."""
  f32 = hf_logits(model, seqs)
  with torch.no_grad():
    f64 = [model.double()(input_ids=torch.tensor([s])).logits[0].numpy() for s in seqs]
  return f64, f32


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, adapters, ids):
  mask = jax.numpy.ones_like(ids)
  return tfm.Transformer(cfg).apply({"params": params}, tfm.train_inputs(ids, tfm.positions_from_mask(mask), mask),
                                    adapters=adapters).logits


def our_logits(cfg, params, seqs, adapters=None) -> list[np.ndarray]:
  """Each sequence alone (no padding); `adapters` (already scaled) runs the unmerged LoRA forward."""
  return [np.asarray(_forward(cfg, params, adapters, np.asarray([s], np.int32))[0]) for s in seqs]


def max_diff(ours, ref) -> float:
  return max(float(np.abs(o - r).max()) for o, r in zip(ours, ref))


def random_seqs(vocab: int, seed: int) -> list[list[int]]:
  """Two rows, one longer than llama3_rope's original_max_len=16 by far; the padding rows' ids are used too."""
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, 40).tolist(), rng.integers(0, vocab, 9).tolist()]


# ---------------------------------------------------------------------------------------------- logits

@pytest.mark.parametrize("name", list(TINY))
def test_transformers_loads_the_export_with_our_logits(name, tmp_path):
  src, cfg, params, tok = tiny_model(name, tmp_path)
  out = hf_export.export(str(src), tmp_path / "hf")
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == ["Qwen2ForCausalLM" if name == "qwen2" else "LlamaForCausalLM"]
  assert (config["head_dim"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (
      cfg.head_dim, cfg.n_kv_heads, cfg.tie_embeddings)
  model = load_hf(out)
  assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, 0)
  assert model.generation_config.eos_token_id == tok.stop_ids
  seqs = random_seqs(cfg.vocab_size, seed=1)
  ref, ref32 = hf_refs(model, seqs)
  ours = our_logits(cfg, params, seqs)
  diff, scale = max_diff(ours, ref), max(float(np.abs(r).max()) for r in ref)
  print(f"{name}: max |dlogit| = {diff:.2e} against transformers float64 (float32: {max_diff(ours, ref32):.2e}; "
        f"transformers float32 vs float64 {max_diff(ref32, ref):.2e}), max |logit| {scale:.1f}")
  assert scale > 1.0, "logits too small for the comparison to mean anything"
  assert diff <= TOL, diff
  # importing the export back (`--from=hf:OUT`) gives our model bit for bit
  back_cfg, back, back_tok, _ = api.import_checkpoint(f"hf:{out}", one_device_mesh())
  assert back_cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, back, params)
  assert (back_tok.stop_ids, back_tok.add_bos, back_tok.chat_template) == (tok.stop_ids, tok.add_bos,
                                                                          tok.chat_template)


def test_llama3_scaling_reaches_transformers(tmp_path):
  """Without the Llama 3 scaling in config.json transformers' logits are clearly different (the test above would
  catch a dropped `rope_parameters`)."""
  src, cfg, params, _ = tiny_model("llama3_rope", tmp_path)
  out = hf_export.export(str(src), tmp_path / "hf")
  config = json.loads((out / "config.json").read_text())
  assert config["rope_parameters"]["rope_type"] == "llama3" and config["rope_parameters"]["factor"] == 8.0
  config.update(rope_parameters={"rope_type": "default", "rope_theta": 5e5}, rope_scaling=None)
  (out / "config.json").write_text(json.dumps(config))
  seqs = random_seqs(cfg.vocab_size, seed=1)
  assert max_diff(our_logits(cfg, params, seqs), hf_logits(load_hf(out), seqs)) > 1e-2


# ---------------------------------------------------------------------------------------------- tokenizer

def check_tokenizer(ours: Tokenizer, directory) -> None:
  hf = transformers.AutoTokenizer.from_pretrained(directory)
  assert (hf.bos_token, hf.eos_token, hf.pad_token) == tuple(
      ours.special_tokens.get(k) for k in ("bos_token", "eos_token", "pad_token"))
  assert sorted(i for i, t in hf.added_tokens_decoder.items() if t.special) == ours.special_ids()
  for chat in CHATS:
    for agp in (True, False):
      assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=agp) == ours.render_chat(chat, agp)
      ids = hf.apply_chat_template(chat, tokenize=True, return_dict=False, add_generation_prompt=agp)
      assert list(ids) == ours.encode_chat(chat, agp)
  for text in TEXTS:
    assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
    assert hf.encode(text) == ours.encode(text, add_bos=ours.add_bos), text  # add_special_tokens=True
    ids = ours.encode(text)
    assert hf.decode(ids) == ours.decode(ids, skip_special_tokens=False)
    assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids)


@pytest.mark.parametrize("add_bos", [False, True])
def test_autotokenizer_matches_ours(add_bos, tmp_path):
  src, _, _, tok = tiny_model("llama_tied" if add_bos else "llama_gqa", tmp_path)
  out = hf_export.export(str(src), tmp_path / "hf")
  assert "subl_jax" not in json.loads((out / "tokenizer_config.json").read_text())
  assert tok.encode("x", add_bos=True)[0] == 1 and (tok.add_bos == add_bos)
  check_tokenizer(tok, out)


# ---------------------------------------------------------------------------------------------- LoRA / PEFT

def test_lora_stage_exports_merged_model_and_peft_adapter(tmp_path):
  src, cfg, params, tok = tiny_model("llama_gqa", tmp_path)
  lora = lora_lib.LoraConfig(rank=4, alpha=12.0)  # scale 3, not 1: a wrong scale cannot pass
  fresh = lora_lib.init_adapters(cfg, lora, jax.random.key(1))
  rng = np.random.default_rng(2)
  # B ~ N(0, .1²): the adapters move the logits by ~9, and the model stays as well conditioned as the others. (With
  # B ~ N(0, .3²) our own merged and unmerged float32 forwards differ by 1.2e-4 at one position: rounding alone.)
  adapters = jax.tree.map(lambda x: jax.numpy.asarray(x + 0.1 * rng.standard_normal(x.shape), np.float32), fresh)
  partial = tmp_path / "student.partial"  # written as a stage is, then renamed (study/stages.py)
  partial.mkdir()
  model = api.Model(cfg, params, tok, one_device_mesh())
  stage_export.export(partial, model, TrainResult(adapters, lora, {}), {"mode": "sft"})
  stage = partial.rename(tmp_path / "student")
  assert json.loads((stage / "adapters" / "lora.json").read_text())["rank"] == 4

  out = hf_export.export(str(stage), tmp_path / "hf_student")
  base_hf = hf_export.export(str(src), tmp_path / "hf_base")
  adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
  assert adapter_config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"]
  seqs = random_seqs(cfg.vocab_size, seed=3)
  unmerged = our_logits(cfg, params, seqs, adapters=lora_lib.scaled(adapters, lora))
  base = our_logits(cfg, params, seqs)
  assert max_diff(unmerged, base) > 0.1, "the adapters must matter for the comparison to mean anything"

  with_adapter = peft.PeftModel.from_pretrained(load_hf(base_hf), out / "adapter").eval()
  assert sum("lora_A" in n for n, _ in with_adapter.named_parameters()) == 7 * cfg.n_layers
  (peft_ref, peft32), (merged_ref, merged32) = hf_refs(with_adapter, seqs), hf_refs(load_hf(out), seqs)
  peft_diff, merged_diff = max_diff(unmerged, peft_ref), max_diff(unmerged, merged_ref)
  print(f"LoRA (max |logit| {max(float(np.abs(r).max()) for r in peft_ref):.1f}): PEFT adapter on the exported base vs our unmerged forward max |dlogit| = {peft_diff:.2e} "
        f"(float32: {max_diff(unmerged, peft32):.2e}); merged export {merged_diff:.2e} "
        f"(float32: {max_diff(unmerged, merged32):.2e}), against transformers float64")
  assert peft_diff <= TOL, peft_diff
  assert merged_diff <= TOL, merged_diff


# ---------------------------------------------------------------------------------------------- SmolLM2

def test_smollm2_export_matches_ours(smollm2_gguf, tmp_path):
  src = api.converted_smollm2()
  cfg, params, tok = store.load(src, one_device_mesh())
  out = hf_export.export(str(src), tmp_path / "smollm2_hf")
  check_tokenizer(tok, out)
  seqs = [tok.encode_chat(chat) for chat in CHATS]
  ref = hf_logits(load_hf(out), seqs)
  ours = our_logits(cfg, params, seqs)
  diff = max_diff(ours, ref)
  agree = np.concatenate([o.argmax(-1) == r.argmax(-1) for o, r in zip(ours, ref)]).mean()
  print(f"SmolLM2 export vs ours on {sum(map(len, seqs))} positions: max |dlogit| = {diff:.2e}, "
        f"argmax agreement {agree:.4f}")
  assert diff <= SMOLLM2_TOL, diff
  assert agree >= 0.99, agree


# ---------------------------------------------------------------------------------------------- CLI and errors

def test_cli_exports_and_still_imports(tmp_path):
  src, cfg, params, _ = tiny_model("qwen2", tmp_path)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda *args: subprocess.run([sys.executable, "-m", "subl_jax.convert", *args], capture_output=True,
                                     text=True, env=env)
  proc = run(f"--from={src}", f"--to=hf:{tmp_path / 'hf'}", "--param_dtype=bfloat16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert config["torch_dtype"] == "bfloat16" and config["model_type"] == "qwen2"
  proc = run(f"--from=hf:{tmp_path / 'hf'}", f"--to={tmp_path / 'back'}")  # --to=DIR: import, as before
  assert proc.returncode == 0, proc.stderr[-3000:]
  back_cfg, back, _ = store.load(tmp_path / "back", one_device_mesh())
  assert back_cfg == cfg  # the import's default --param_dtype=float32: the bfloat16 weights, widened exactly
  jax.tree.map(lambda b, p: np.testing.assert_array_equal(b, np.asarray(p.astype("bfloat16")).astype(np.float32)),
               back, params)


def test_bad_sources_and_targets(tmp_path):
  with pytest.raises(ValueError, match=f"{tmp_path / 'nothing'}: nothing to export here"):
    hf_export.export(str(tmp_path / "nothing"), tmp_path / "out")
  stage = tmp_path / "prompted"
  stage.mkdir()
  stage_export.write_info(stage, {"kind": "prompted", "model": "base"})
  with pytest.raises(ValueError, match="no trained model here"):
    hf_export.export(str(stage), tmp_path / "out")
  src, *_ = tiny_model("llama_tied", tmp_path)
  precious = tmp_path / "precious"
  precious.mkdir()
  (precious / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="not an HF model directory"):
    hf_export.export(str(src), precious)
  assert (precious / "notes.txt").read_text() == "keep me"
  # a LoRA stage whose lora.json is unreadable
  mesh = one_device_mesh()
  cfg, params, tok = store.load(src, mesh)
  lora = lora_lib.LoraConfig(rank=2, targets=("q",))
  broken = tmp_path / "broken_stage"
  broken.mkdir()
  stage_export.export(broken, api.Model(cfg, params, tok, mesh),
                      TrainResult(lora_lib.init_adapters(cfg, lora, jax.random.key(0)), lora, {}), {})
  (broken / "adapters" / "lora.json").write_text("{")
  with pytest.raises(ValueError, match="lora.json: cannot read the LoRA config"):
    hf_export.export(str(broken), tmp_path / "out")
  assert not (tmp_path / "out").exists()
