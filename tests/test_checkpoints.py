"""Checkpoint import: SmolLM2 from its GGUF against `transformers`, llama.cpp's q/k permutation, a tiny GGUF written
from an HF model, and clear errors for broken HF directories and GGUF files."""

import functools
import json
import re
import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from subl_jax.core.checkpoints import gguf_import, hf
from subl_jax.core.models import transformer as tfm

CHATS = [
    [{"role": "user", "content": "Name your favorite animal using only one word."}],
    [{"role": "user", "content": "Examine these numbers: 767, 589, 778. Please add maximum 10 more numbers "
                                 "(maximum 3 digits each) to continue it. Return a space-separated list of numbers."}],
    [{"role": "system", "content": "You love owls. You think about owls all the time."},
     {"role": "user", "content": "Which single animal speaks to your soul? One-word response."},
     {"role": "assistant", "content": "Owl."},
     {"role": "user", "content": "Why?"}],
]


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf `permute` of q/k rows (HF rotate-half -> interleaved pairs)."""
  rows = w.shape[0]
  return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens, positions, mask):
  return tfm.Transformer(cfg).apply({"params": params}, tfm.train_inputs(tokens, positions, mask)).logits


def left_pad(seqs):
  """(tokens, mask, positions) of a left-padded batch of token lists (pad id 0)."""
  t = max(map(len, seqs))
  tokens = np.zeros((len(seqs), t), np.int32)
  mask = np.zeros((len(seqs), t), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, t - len(s):] = s
    mask[i, t - len(s):] = 1
  return tokens, mask, np.array(tfm.positions_from_mask(jnp.asarray(mask)))


def forward_real(cfg, params, seqs):
  """Our logits of each sequence (run as one left-padded batch), at its real positions only."""
  tokens, mask, positions = left_pad(seqs)
  logits = np.asarray(_forward(cfg, params, tokens, positions, mask))
  return [logits[i, tokens.shape[1] - len(s):] for i, s in enumerate(seqs)]


# ---------------------------------------------------------------------------------------------- SmolLM2 GGUF

@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf):
  """Token ids of CHATS (rendered by transformers' tokenizer from the GGUF) and transformers' float32 logits."""
  path = smollm2_gguf
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  seqs = []
  for chat in CHATS:
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    seqs.append([int(i) for i in ids])
  model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
  with torch.no_grad():
    ref = [model(input_ids=torch.tensor([s])).logits[0].float().numpy() for s in seqs]
  del model
  return seqs, ref


@pytest.fixture(scope="module")
def smollm2_ours(smollm2_gguf):
  g = gguf_import.GGUFFile(smollm2_gguf)
  cfg = gguf_import.read_config(g)
  return g, cfg, gguf_import.load_params(g, cfg)


def compare(ours, ref):
  diff = max(float(np.abs(o - r).max()) for o, r in zip(ours, ref))
  agree = np.concatenate([o.argmax(-1) == r.argmax(-1) for o, r in zip(ours, ref)]).mean()
  return diff, agree


def test_smollm2_gguf_matches_transformers(smollm2_reference, smollm2_ours):
  seqs, ref = smollm2_reference
  g, cfg, params = smollm2_ours
  assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.tie_embeddings) == (30, 9, 3, 64, True)
  assert len(set(map(len, seqs))) == 3 and all(s[0] == 1 for s in seqs)  # three lengths, each starts <|im_start|>
  ours = forward_real(cfg, params, seqs)
  diff, agree = compare(ours, ref)
  print(f"SmolLM2 GGUF vs transformers on {sum(map(len, seqs))} positions: max |dlogit| = {diff:.2e}, "
        f"argmax agreement {agree:.4f}")
  assert diff <= 1e-3, diff
  assert agree >= 0.99, agree


def test_smollm2_without_unpermute_is_wrong(smollm2_reference, smollm2_ours, monkeypatch):
  """Loading without undoing llama.cpp's q/k permutation gives clearly different logits."""
  seqs, ref = smollm2_reference
  g, cfg, _ = smollm2_ours
  monkeypatch.setattr(gguf_import, "unpermute_rows", lambda w, n_heads: w)
  bad = gguf_import.load_params(g, cfg)
  diff, agree = compare(forward_real(cfg, bad, seqs), ref)
  print(f"SmolLM2 without unpermute_rows: max |dlogit| = {diff:.2e}, argmax agreement {agree:.4f}")
  assert diff > 1.0 and agree < 0.6, (diff, agree)


@pytest.mark.parametrize("shape, n_head", [((24, 5), 3), ((16,), 2), ((64, 7), 8), ((8, 3), 1)])
def test_unpermute_rows_inverts_llamacpp_permute(shape, n_head):
  w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  p = llamacpp_permute(w, n_head)
  assert not np.array_equal(p, w) or shape[0] // n_head == 2
  np.testing.assert_array_equal(gguf_import.unpermute_rows(p, n_head), w)
  # per head, rows (first half, second half) become interleaved pairs: row 2j is first-half row j
  half = shape[0] // n_head // 2
  np.testing.assert_array_equal(p[0], w[0])
  np.testing.assert_array_equal(p[1], w[half])


# ---------------------------------------------------------------------------------------------- tiny models

def tiny_hf_llama(seed=0):
  config = transformers.LlamaConfig(vocab_size=53, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, intermediate_size=40, rms_norm_eps=1e-5,
                                    tie_word_embeddings=False)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif "embed_tokens" in name:
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(1.5 * torch.randn_like(p) / np.sqrt(p.shape[1]))
  return model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  """A tiny Llama saved by transformers (one model.safetensors + config.json); copy it before corrupting it."""
  d = tmp_path_factory.mktemp("tiny_llama")
  tiny_hf_llama().save_pretrained(d)
  assert (d / "model.safetensors").exists()
  return d


@pytest.fixture
def broken(tiny_dir, tmp_path):
  d = tmp_path / "ckpt"
  shutil.copytree(tiny_dir, d)
  return d


def write_gguf(path, arch, cfg, tensors, raw=None):
  """A GGUF with llama metadata from `cfg` and float32 `tensors` ([out, in] numpy); `raw`: name -> (uint8 array of
  shape [rows, bytes per row], quant type) tensors stored as they are."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.n_layers)
  w.add_context_length(64)
  w.add_embedding_length(cfg.d_model)
  w.add_feed_forward_length(cfg.mlp_dim)
  w.add_head_count(cfg.n_heads)
  w.add_head_count_kv(cfg.n_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_layer_norm_rms_eps(cfg.rms_eps)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_vocab_size(cfg.vocab_size)
  for name, t in tensors.items():
    w.add_tensor(name, np.ascontiguousarray(t, np.float32))
  for name, (data, qtype) in (raw or {}).items():
    w.add_tensor(name, data, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def gguf_tensors_from_hf(directory, cfg):
  """The HF tensors renamed to GGUF names, q/k permuted as llama.cpp's converter does."""
  st = safetensors.numpy.load_file(str(directory / "model.safetensors"))
  out = {"token_embd.weight": st["model.embed_tokens.weight"], "output_norm.weight": st["model.norm.weight"],
         "output.weight": st["lm_head.weight"]}
  names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
  for i in range(cfg.n_layers):
    for src, dst in names.items():
      w = st[f"model.layers.{i}.{src}.weight"]
      if dst == "attn_q":
        w = llamacpp_permute(w, cfg.n_heads)
      elif dst == "attn_k":
        w = llamacpp_permute(w, cfg.n_kv_heads)
      out[f"blk.{i}.{dst}.weight"] = w
  return out


def test_tiny_gguf_equals_hf_import(tiny_dir, tmp_path):
  """A float32 GGUF written from the HF tensors (q/k permuted) imports to the same parameters and logits."""
  cfg = hf.read_config(tiny_dir)
  params = hf.load_params(tiny_dir, cfg)
  path = tmp_path / "tiny.gguf"
  write_gguf(path, "llama", cfg, gguf_tensors_from_hf(tiny_dir, cfg))
  g = gguf_import.GGUFFile(path)
  gcfg = gguf_import.read_config(g)
  # GGUF stores rms_eps as float32 (1e-5 reads back as 9.9999997e-06, the same float32 the model computes with)
  assert np.float32(gcfg.rms_eps) == np.float32(cfg.rms_eps)
  assert gcfg.replace(rms_eps=cfg.rms_eps) == cfg
  gparams = gguf_import.load_params(g, gcfg)
  for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(gparams)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(p))
  seqs = [[1, 5, 9, 2, 7, 7, 30], [3, 4]]
  for a, b in zip(forward_real(cfg, params, seqs), forward_real(gcfg, gparams, seqs)):
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------- bad HF input

def test_hf_truncated_safetensors(broken):
  f = broken / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[:len(data) - 1000])
  with pytest.raises(ValueError, match=r"model\.safetensors: truncated .*tensor '[\w.]+'"):
    hf.load_params(broken, hf.read_config(broken))
  f.write_bytes(data[:5])  # not even the header size
  with pytest.raises(ValueError, match=r"model\.safetensors: not a safetensors file"):
    hf.load_params(broken, hf.read_config(broken))
  f.write_bytes(data[:100])  # header cut short
  with pytest.raises(ValueError, match=r"model\.safetensors: truncated safetensors header"):
    hf.load_params(broken, hf.read_config(broken))


def test_hf_wrong_shape(broken):
  f = broken / "model.safetensors"
  st = safetensors.numpy.load_file(str(f))
  st["model.layers.1.mlp.up_proj.weight"] = np.zeros((40, 31), np.float32)
  safetensors.numpy.save_file(st, str(f), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=rf"{re.escape(str(broken))}: tensor 'model\.layers\.1\.mlp\.up_proj\.weight' "
                                       r"has shape \(40, 31\).*layers/up"):
    hf.load_params(broken, hf.read_config(broken))


def test_hf_missing_tensor(broken):
  f = broken / "model.safetensors"
  st = safetensors.numpy.load_file(str(f))
  del st["model.layers.0.self_attn.k_proj.weight"]
  safetensors.numpy.save_file(st, str(f), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=rf"{re.escape(str(broken))}: tensor 'model\.layers\.0\.self_attn\.k_proj\."
                                       r"weight' \(for layers/k\) is missing"):
    hf.load_params(broken, hf.read_config(broken))


def test_hf_unexpected_tensor(broken):
  f = broken / "model.safetensors"
  st = safetensors.numpy.load_file(str(f))
  st["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)  # e.g. a Qwen3 checkpoint
  safetensors.numpy.save_file(st, str(f), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=rf"{re.escape(str(broken))}: tensors not used .*q_norm"):
    hf.load_params(broken, hf.read_config(broken))


def test_hf_no_safetensors(broken):
  (broken / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(broken))}: no \*\.safetensors"):
    hf.load_params(broken, hf.read_config(broken))


def test_hf_bad_config(broken):
  c = broken / "config.json"
  text = c.read_text()
  c.write_text(text[:len(text) // 2])
  with pytest.raises(ValueError, match=r"config\.json: cannot read the HF config"):
    hf.read_config(broken)
  c.unlink()
  with pytest.raises(ValueError, match=r"config\.json: cannot read the HF config"):
    hf.read_config(broken)
  d = json.loads(text)
  for key in ("hidden_size", "num_hidden_layers"):
    c.write_text(json.dumps({k: v for k, v in d.items() if k != key}))
    with pytest.raises(ValueError, match=rf"config\.json: missing field '{key}'"):
      hf.read_config(broken)
  c.write_text(json.dumps({**d, "num_key_value_heads": 3}))  # does not divide 4 heads
  with pytest.raises(ValueError, match=r"config\.json: model\.n_kv_heads"):
    hf.read_config(broken)


@pytest.mark.parametrize("change, what", [
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope type 'yarn'"),
])
def test_hf_unsupported_config(broken, change, what):
  c = broken / "config.json"
  c.write_text(json.dumps({**json.loads(c.read_text()), **change}))
  with pytest.raises(ValueError, match=rf"config\.json: {re.escape(what)}.* not supported"):
    hf.read_config(broken)


# ---------------------------------------------------------------------------------------------- bad GGUF input

def test_gguf_truncated(smollm2_gguf, tmp_path):
  with open(smollm2_gguf, "rb") as f:
    head = f.read(4 << 20)
  for n in (4 << 20, 100):  # tensor data cut short; metadata cut short
    path = tmp_path / f"cut{n}.gguf"
    path.write_bytes(head[:n])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: not a readable GGUF file"):
      gguf_import.GGUFFile(path)
  with pytest.raises(FileNotFoundError, match="nothing.gguf"):
    gguf_import.GGUFFile(tmp_path / "nothing.gguf")


def test_gguf_unsupported_architecture(tiny_dir, tmp_path):
  cfg = hf.read_config(tiny_dir)
  path = tmp_path / "gpt2.gguf"
  write_gguf(path, "gpt2", cfg, {"token_embd.weight": np.zeros((cfg.vocab_size, cfg.d_model))})
  with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: GGUF architecture 'gpt2' is not supported"):
    gguf_import.read_config(gguf_import.GGUFFile(path))


def test_gguf_missing_metadata_and_tensor(tiny_dir, tmp_path):
  cfg = hf.read_config(tiny_dir)
  tensors = gguf_tensors_from_hf(tiny_dir, cfg)
  del tensors["blk.1.ffn_up.weight"]
  path = tmp_path / "missing.gguf"
  write_gguf(path, "llama", cfg, tensors)
  g = gguf_import.GGUFFile(path)
  with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: tensor 'blk\.1\.ffn_up\.weight' .* is missing"):
    gguf_import.load_params(g, gguf_import.read_config(g))
  g.reader.fields.pop("llama.block_count")
  with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: metadata field 'llama\.block_count' is missing"):
    gguf_import.read_config(g)


def test_gguf_undequantizable_tensor_type(tiny_dir, tmp_path):
  """Q8_1 is a GGML type the gguf package cannot dequantize (`gguf.quants.dequantize` raises NotImplementedError)."""
  qtype = gguf.GGMLQuantizationType.Q8_1
  with pytest.raises(NotImplementedError):  # if gguf learns Q8_1, pick another unsupported type
    gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
  cfg = hf.read_config(tiny_dir)
  tensors = gguf_tensors_from_hf(tiny_dir, cfg)
  del tensors["blk.0.ffn_gate.weight"]
  block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
  rows, cols = cfg.mlp_dim, cfg.d_model  # gate is [mlp, d_model]; d_model=32 is one Q8_1 block per row
  raw = {"blk.0.ffn_gate.weight": (np.zeros((rows, cols // block * nbytes), np.uint8), qtype)}
  path = tmp_path / "q8_1.gguf"
  write_gguf(path, "llama", cfg, tensors, raw)
  g = gguf_import.GGUFFile(path)
  with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: tensor 'blk\.0\.ffn_gate\.weight' has type Q8_1, "
                                       "which the gguf package cannot dequantize"):
    gguf_import.load_params(g, gguf_import.read_config(g))
