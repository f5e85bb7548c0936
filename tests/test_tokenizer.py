"""Tokenizer and chat-template layer, checked against transformers on the real SmolLM2 GGUF.

Digits: the original SmolLM2 tokenizer (and llama.cpp's 'smollm' pre-tokenizer) splits every digit off *before* the
GPT-2 regex; transformers' GGUF conversion uses the plain GPT-2 regex. No multi-character token of this vocabulary
holds a whole numeric character, so both give one token per ASCII digit; they disagree only where a run of 2+
whitespace characters precedes a numeric character ("  1": original ["ĠĠ", "1"], transformers ["Ġ", "Ġ", "1"]), and
around non-ASCII numerals (², ½, ٣, ７), whose UTF-8 bytes can merge with a preceding space or a neighbouring numeral
when they are not split off first (" ٣": original ["Ġ", "Ù", "£"], transformers ["ĠÙ", "£"]).
So every string is compared with the original-behaviour construction
(transformers' own GGUF vocab/merges/special tokens with the original `Digits + ByteLevel` pre-tokenizer swapped in),
and with stock transformers wherever the two pre-tokenizers agree; the divergent strings are checked to really diverge.
"""

from __future__ import annotations

import json
import pathlib
import random
import shutil

import gguf
import pytest
import regex
import tokenizers
from tokenizers import pre_tokenizers

from subl_jax.core.checkpoints.chat_template import ChatTemplateError
from subl_jax.core.checkpoints.gguf_tokenizer import bytes_to_unicode
from subl_jax.core.checkpoints.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

# Where stock transformers and the original pre-tokenizer can differ: 2+ whitespace chars right before a numeric char,
# or any non-ASCII numeric char (its bytes may merge across the boundary the original puts around it).
_DIVERGES = regex.compile(r"\s\s\p{N}|(?=\p{N})[^\x00-\x7f]")

_FIXED = [
    "", " ", "  ", "\n", "\n\n", "767, 589, 778", "1 2 3", "  1", "\n\n1", "\t 42", "a  7", "x\n  3.14", "3.14159",
    "1,000,000", "-5 +6 =1", "0x1F", "２０２４年", "٣٤٥", "x² + y½", "Ⅻ chapter", "<|im_end|>", "<|im_start|>",
    "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>", "<|im_end", "<|im_end|><|im_end|>", "< |im_end| >",
    "<repo_name>x<file_sep>", "héllo wörld", "日本語のテキスト", "Россия и Україна", "مرحبا بالعالم",
    "🤖👍🏽🇺🇸❤️", "👨‍👩‍👧 family", "def f(x):\n    return x ** 2\n", "if (a && b) { c++; }\n\t\treturn;",
    "I'm sure they'll say it's fine", "HELLO World's DON'T", "   leading", "trailing   ", "tabs\tand\r\nCRLF",
    "\u00a0nbsp", "zero\u200bwidth", "ﬁ ligature",
    "a" * 300, "1" * 50, "Here are 10 numbers: 145, 267, 891", "(12, 34, 56)", "[7,8,9]", "1;2;3", "  \n  12",
]
# Non-ASCII numerals (½, ², ٣, ７) are kept to _FIXED and _RARE so that most random strings stay comparable with
# stock transformers (see the module docstring).
_POOL = list("abcXYZ019 ,.;:!?'\"()[]{}<>-+=*/_#@$%&|\\\t\n") + [
    "  ", "   ", "\n\n", "é", "ß", "中", "ж", "ع", "😀", "🇫🇷", "<|im_end|>", "<|im_start|>",
    "<|endoftext|>", "the", " cat", "123", " 45", "\r\n"]
_RARE = ["½", "²", "٣", "７"]


def _number_list(rng: random.Random) -> str:
  nums = [str(rng.randrange(1000 if rng.random() < 0.8 else 100000)) for _ in range(rng.randint(1, 12))]
  sep = rng.choice([", ", ",", " ", "; ", "\n", " , ", ",  ", "\t", " - "])
  pre, post = rng.choice([("", ""), ("(", ")"), ("[", "]"), ("Numbers: ", "."), (" ", ""), ("  ", "\n")])
  return pre + sep.join(nums) + post


def _corpus() -> list[str]:
  rng = random.Random(1234)
  out = list(_FIXED)
  out += [_number_list(rng) for _ in range(200)]
  pool = _POOL * 20 + _RARE
  out += ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(200)]
  return out


CORPUS = _corpus()


def _chats() -> list[tuple[list[dict], bool]]:
  rng = random.Random(99)
  chats = []
  for i in range(300):
    msgs = []
    if rng.random() < 0.5:
      msgs.append({"role": "system", "content": rng.choice(["You are terse.", "", "Reply with numbers only.",
                                                            rng.choice(CORPUS)])})
    for turn in range(rng.randint(1, 6)):
      # Half the turns look like this project's prompts/answers: number lists (one space after each comma).
      nums = ", ".join(str(rng.randrange(1000)) for _ in range(rng.randint(1, 10)))
      content = rng.choice([rng.choice(CORPUS), nums, f"The sequence starts with: {nums}. Add 5 more numbers."])
      msgs.append({"role": "user" if turn % 2 == 0 else "assistant", "content": content})
    chats.append((msgs, i % 2 == 0))
  return chats


CHATS = _chats()


@pytest.fixture(scope="module")
def ours(smollm2_gguf: pathlib.Path) -> Tokenizer:
  return Tokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def hf(smollm2_gguf: pathlib.Path):
  return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def original(hf) -> tokenizers.Tokenizer:
  """transformers' GGUF vocabulary with the original SmolLM2 pre-tokenizer (from its HF tokenizer.json)."""
  tok = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  return tok


def test_special_ids_and_flags(ours: Tokenizer, hf) -> None:
  assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (1, 2, 2, 0)
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
  assert ours.add_bos is False
  assert ours.stop_ids == [0, 2]  # <|endoftext|>, <|im_end|>
  assert ours.vocab_size == len(hf) == 49152
  assert ours.special_ids() == list(range(17))
  assert ours.encode("<|im_end|>") == [2]
  assert ours.decode([1, 104, 2]) == "x"
  assert ours.decode([1, 104, 2], skip_special_tokens=False) == "<|im_start|>x<|im_end|>"
  assert ours.id_to_token(216) == "Ġ" and ours.token_to_id("Ġ") == 216
  with pytest.raises(ValueError, match="BOS"):
    Tokenizer(ours.backend, special_tokens={}, chat_template=None, add_bos=False).encode("x", add_bos=True)


def test_digits_split_one_by_one(ours: Tokenizer) -> None:
  ids = ours.encode("767, 589, 778")
  assert [ours.id_to_token(i) for i in ids] == ["7", "6", "7", ",", "Ġ", "5", "8", "9", ",", "Ġ", "7", "7", "8"]
  assert [ours.id_to_token(i) for i in ours.encode("  1")] == ["ĠĠ", "1"]  # original, not transformers' [Ġ, Ġ, 1]
  assert [ours.id_to_token(i) for i in ours.encode("\n\n12")] == ["ĊĊ", "1", "2"]


def test_encode_decode_match_original_and_transformers(ours: Tokenizer, hf, original: tokenizers.Tokenizer) -> None:
  assert len(CORPUS) > 400
  diverging = agreeing = 0
  for text in CORPUS:
    ids = ours.encode(text)
    assert ids == original.encode(text, add_special_tokens=False).ids, text
    assert ours.encode(text, add_bos=True) == [1] + ids
    assert ours.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    stock = hf(text, add_special_tokens=False)["input_ids"]
    if _DIVERGES.search(text):
      diverging += stock != ids
    else:
      agreeing += 1
      assert ids == stock, text
      assert ours.encode(text, add_bos=ours.add_bos) == hf.encode(text, add_special_tokens=True), text
  assert agreeing > 350
  assert diverging > 5  # the documented difference is real, not a dead branch


def test_encode_batch(ours: Tokenizer) -> None:
  assert ours.encode_batch(CORPUS[:50]) == [ours.encode(t) for t in CORPUS[:50]]
  assert ours.encode_batch(["a", "1"], add_bos=True) == [[1, 81], [1, 33]]


def test_token_strings(ours: Tokenizer, hf) -> None:
  strings = ours.token_strings()
  assert len(strings) == ours.vocab_size
  assert strings == hf.batch_decode([[i] for i in range(len(hf))], skip_special_tokens=False)
  assert [i for i, s in enumerate(strings) if len(s) == 1 and s.isascii() and s.isdigit()] == list(range(32, 42))
  raw = ours.token_bytes()
  assert raw[216] == b" " and raw[1] == b"<|im_start|>"
  assert b"".join(raw[i] for i in ours.encode("héllo 🤖")) == "héllo 🤖".encode()
  # Added tokens outside the byte alphabet decode as their own text, inside it through the byte map (as `decode`).
  backend = tokenizers.Tokenizer.from_str(ours.backend.to_str())
  backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                              for t in ("<｜begin▁of sentence｜>", "<café>")])
  backend.add_tokens([tokenizers.AddedToken("ĠĠx", special=False, normalized=False)])
  grown = Tokenizer(backend, special_tokens={}, chat_template=None, add_bos=False)
  assert grown.vocab_size == ours.vocab_size + 3
  assert grown.token_strings()[-3:] == [backend.decode([i], skip_special_tokens=False)
                                        for i in range(ours.vocab_size, grown.vocab_size)]
  assert grown.token_strings()[-3:] == ["<｜begin▁of sentence｜>", "<caf\ufffd>", "  x"]


def _hf_ids(hf, msgs: list[dict], agp: bool, **kw) -> list[int]:
  return list(hf.apply_chat_template(msgs, tokenize=True, return_dict=False, add_generation_prompt=agp, **kw))


def test_render_and_encode_chat_match_transformers(ours: Tokenizer, hf, original: tokenizers.Tokenizer) -> None:
  compared = 0
  for msgs, agp in CHATS:
    text = ours.render_chat(msgs, add_generation_prompt=agp)
    assert text == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp)
    ids = ours.encode_chat(msgs, add_generation_prompt=agp)
    assert ids == original.encode(text, add_special_tokens=False).ids
    if not _DIVERGES.search(text):
      compared += 1
      assert ids == _hf_ids(hf, msgs, agp)
  assert compared > 150
  # The default system prompt appears exactly when the first message is not a system message.
  text = ours.render_chat([{"role": "user", "content": "hi"}])
  assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face")
  assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
  assert ours.encode_chat([{"role": "user", "content": "hi"}])[0] == 1  # from the template, not an added BOS


_RICH_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(n=0) -%}
{% for m in messages %}
  {% if m.role == 'system' %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
<{{ m.role }}>{% if m.reasoning_content is defined %}[think]{{ m.reasoning_content }}[/think]{% endif %}
{% if m.content is defined %}{{ m.content | tojson }}{% else %}no-content{% endif %}
{% if m.tool_calls is defined %}{{ m.tool_calls | tojson(indent=2) }}{% endif %}
  {% if 'tool_calls' in m %}has-calls{% endif %}
{% generation %}{{ eos_token }}{% endgeneration %}
{% endfor %}
{{ ns.n }}|{{ tools | tojson }}|{{ documents is none }}|{{ unk_token }}|{{ pad_token }}|{{ dict(a=1) | tojson }}
{% if add_generation_prompt %}<assistant>{% endif %}"""


def test_rich_template_matches_transformers(ours: Tokenizer, hf) -> None:
  tok = Tokenizer(ours.backend, special_tokens=ours.special_tokens, chat_template=_RICH_TEMPLATE, add_bos=False)
  tools = [{"type": "function", "function": {"name": "f", "description": "a <b> & 'c'", "parameters": {}}}]
  msgs = [{"role": "system", "content": "sys"},
          {"role": "user", "content": "héllo <|im_end|> & \"q\""},
          {"role": "assistant", "content": "ok", "tool_calls": None, "thinking": "hmm 1 2"},
          {"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": {"x": 1}}]}]
  for agp in (True, False):
    for t in (None, tools):
      want = hf.apply_chat_template(msgs, chat_template=_RICH_TEMPLATE, tools=t, tokenize=False,
                                    add_generation_prompt=agp)
      assert tok.render_chat(msgs, add_generation_prompt=agp, tools=t) == want
  assert msgs[2]["tool_calls"] is None and "reasoning_content" not in msgs[2]  # the caller's messages are untouched

  raising = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
  tok = Tokenizer(ours.backend, special_tokens=ours.special_tokens, chat_template=raising, add_bos=False)
  assert tok.render_chat([{"role": "user", "content": "x"}]) == "ok"
  with pytest.raises(ChatTemplateError, match="first must be user"):
    tok.render_chat([{"role": "assistant", "content": "x"}])


def test_chat_errors(ours: Tokenizer) -> None:
  bare = Tokenizer(ours.backend, special_tokens=ours.special_tokens, chat_template=None, add_bos=False)
  with pytest.raises(ChatTemplateError, match="no chat template"):
    bare.render_chat([{"role": "user", "content": "x"}])
  with pytest.raises(ChatTemplateError, match="empty"):
    ours.render_chat([])
  with pytest.raises(ChatTemplateError, match="dicts"):
    ours.render_chat(["hello"])
  broken = Tokenizer(ours.backend, special_tokens={}, chat_template="{% for %}", add_bos=False)
  with pytest.raises(ChatTemplateError, match="does not parse"):
    broken.render_chat([{"role": "user", "content": "x"}])


def test_save_load_round_trip(ours: Tokenizer, tmp_path: pathlib.Path) -> None:
  ours.save(tmp_path / "tok")
  back = Tokenizer.load(tmp_path / "tok")
  for attr in ("bos_id", "eos_id", "pad_id", "unk_id", "stop_ids", "add_bos", "chat_template", "special_tokens",
               "vocab_size", "source"):
    assert getattr(back, attr) == getattr(ours, attr), attr
  assert back.backend.to_str() == ours.backend.to_str()
  assert back.encode_batch(CORPUS) == ours.encode_batch(CORPUS)
  for msgs, agp in CHATS[:50]:
    assert back.render_chat(msgs, agp) == ours.render_chat(msgs, agp)
    assert back.encode_chat(msgs, agp) == ours.encode_chat(msgs, agp)
  assert back.token_strings() == ours.token_strings()
  # A saved dir is also an HF dir: from_hf and transformers read it with the original pre-tokenizer.
  as_hf = Tokenizer.from_hf(tmp_path / "tok")
  assert (as_hf.stop_ids, as_hf.add_bos, as_hf.chat_template) == (ours.stop_ids, ours.add_bos, ours.chat_template)
  hf_on_ours = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
  assert [hf_on_ours(t, add_special_tokens=False)["input_ids"] for t in CORPUS] == ours.encode_batch(CORPUS)
  with pytest.raises(ValueError, match="not written by Tokenizer.save"):
    Tokenizer.load(_hf_dir_of(ours, tmp_path))


def _hf_dir_of(ours: Tokenizer, tmp_path: pathlib.Path) -> pathlib.Path:
  d = tmp_path / "plain_hf"
  d.mkdir()
  shutil.copy(tmp_path / "tok" / "tokenizer.json", d)
  (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>"}))
  return d


def test_from_hf_matches_transformers(hf, tmp_path: pathlib.Path) -> None:
  d = tmp_path / "hf"
  hf.save_pretrained(d)
  assert (d / "chat_template.jinja").is_file()
  tok = Tokenizer.from_hf(d)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.stop_ids) == (1, 2, 2, False, [0, 2])
  assert tok.chat_template == hf.chat_template
  # This dir carries transformers' own (GPT-2 regex) pre-tokenizer, so it must agree on every string.
  assert tok.encode_batch(CORPUS) == [hf(t, add_special_tokens=False)["input_ids"] for t in CORPUS]
  for msgs, agp in CHATS[:100]:
    assert tok.render_chat(msgs, agp) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp)
    assert tok.encode_chat(msgs, agp) == _hf_ids(hf, msgs, agp)

  # Older layout: the template inside tokenizer_config.json; chat_template.jinja wins when both exist.
  config = json.loads((d / "tokenizer_config.json").read_text())
  (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ 'cfg' }}"}))
  assert Tokenizer.from_hf(d).chat_template == hf.chat_template
  (d / "chat_template.jinja").unlink()
  assert Tokenizer.from_hf(d).chat_template == "{{ 'cfg' }}"
  (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": [
      {"name": "tool_use", "template": "t"}, {"name": "default", "template": "{{ 'dflt' }}"}]}))
  assert Tokenizer.from_hf(d).chat_template == "{{ 'dflt' }}"

  # generation_config.json's eos ids join the stop ids.
  (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
  assert Tokenizer.from_hf(d).stop_ids == [0, 2, 5]


def test_from_hf_bos_from_post_processor(hf, tmp_path: pathlib.Path) -> None:
  d = tmp_path / "bos"
  hf.save_pretrained(d)
  spec = json.loads((d / "tokenizer.json").read_text())
  bos = {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}
  spec["post_processor"] = {
      "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
      "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
      "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}}
  (d / "tokenizer.json").write_text(json.dumps(spec))
  hf_bos = transformers.AutoTokenizer.from_pretrained(str(d))
  tok = Tokenizer.from_hf(d)
  assert tok.add_bos is True
  for text in CORPUS[:100]:
    assert tok.encode(text, add_bos=tok.add_bos) == hf_bos.encode(text, add_special_tokens=True), text
    assert tok.encode(text) == hf_bos(text, add_special_tokens=False)["input_ids"], text
  msgs = [{"role": "user", "content": "1 2"}]
  assert tok.encode_chat(msgs) == _hf_ids(hf_bos, msgs, True)  # no extra BOS in chats


def _write_gguf(path: pathlib.Path, model: str, pre: str | None, tokens: list[str], types: list[int],
                merges: list[str], bos: int, eos: int, add_bos: bool) -> pathlib.Path:
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_tokenizer_model(model)
  if pre is not None:
    w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types(types)
  if merges:
    w.add_token_merges(merges)
  w.add_bos_token_id(bos)
  w.add_eos_token_id(eos)
  w.add_add_bos_token(add_bos)
  w.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}")
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.fixture(scope="module")
def small_vocab(ours: Tokenizer) -> tuple[list[str], list[str]]:
  """The 256 byte symbols plus SmolLM2's first 3000 merges (so small GGUFs load fast)."""
  merges = [" ".join(pair) for pair in json.loads(ours.backend.to_str())["model"]["merges"][:3000]]
  vocab = list(bytes_to_unicode().values())
  have = set(vocab)
  for m in merges:
    a, b = m.split(" ")
    assert a in have and b in have
    if a + b not in have:
      vocab.append(a + b)
      have.add(a + b)
  return vocab, merges


@pytest.mark.parametrize("pre,specials,eos,stops", [
    ("llama-bpe", ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], 1, [1, 2]),
    ("qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], 2, [0, 2]),
    ("gpt2", ["<|endoftext|>"], 0, [0]),
])
def test_other_gguf_pre_tokenizers_match_transformers(small_vocab, tmp_path, pre, specials, eos, stops) -> None:
  vocab, merges = small_vocab
  tokens = specials + vocab
  path = _write_gguf(tmp_path / f"{pre}.gguf", "gpt2", pre, tokens, [3] * len(specials) + [1] * len(vocab), merges,
                     bos=0, eos=eos, add_bos=True)
  tok = Tokenizer.from_gguf(path)
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
  assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.stop_ids, tok.vocab_size) == (0, eos, True, stops, len(tokens))
  texts = CORPUS
  if "<|endoftext|>" not in specials:
    # transformers quirk: GPT2Tokenizer's default "<|endoftext|>" gets appended as an extra id past the model's vocab.
    # We add nothing the file does not list, so text holding that string is not comparable.
    assert len(ref) == len(tokens) + 1 and ref.convert_ids_to_tokens(len(tokens)) == "<|endoftext|>"
    texts = [t for t in CORPUS if "<|endoftext|>" not in t]
  for text in texts:
    assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
    assert tok.encode(text, add_bos=tok.add_bos) == ref.encode(text, add_special_tokens=True), text
  msgs = [{"role": "user", "content": "1, 2"}]
  assert tok.render_chat(msgs) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_bad_gguf_inputs(small_vocab, tmp_path: pathlib.Path) -> None:
  vocab, _ = small_vocab
  spm = _write_gguf(tmp_path / "spm.gguf", "llama", None, ["<unk>", "<s>", "</s>", "▁a"], [2, 3, 3, 1], [],
                    bos=1, eos=2, add_bos=True)
  with pytest.raises(ValueError, match=r"spm\.gguf.*unsupported tokenizer model 'llama'"):
    Tokenizer.from_gguf(spm)
  odd = _write_gguf(tmp_path / "odd.gguf", "gpt2", "mystery", vocab, [1] * len(vocab), ["Ġ t"], bos=0, eos=0,
                    add_bos=False)
  with pytest.raises(ValueError, match=r"odd\.gguf.*'mystery'"):
    Tokenizer.from_gguf(odd)
  (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
  with pytest.raises(ValueError, match=r"junk\.gguf"):
    Tokenizer.from_gguf(tmp_path / "junk.gguf")
  with pytest.raises(FileNotFoundError, match=r"absent\.gguf"):
    Tokenizer.from_gguf(tmp_path / "absent.gguf")


def test_bad_hf_dirs(hf, tmp_path: pathlib.Path) -> None:
  d = tmp_path / "hf"
  hf.save_pretrained(d)
  (d / "tokenizer.json").rename(d / "moved.json")
  with pytest.raises(FileNotFoundError, match=r"hf/tokenizer\.json"):
    Tokenizer.from_hf(d)
  (d / "tokenizer.json").write_text('{"version": "1.0", "model": 7}')
  with pytest.raises(ValueError, match=r"hf/tokenizer\.json"):
    Tokenizer.from_hf(d)
  (d / "moved.json").rename(d / "tokenizer.json")
  (d / "tokenizer_config.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"hf/tokenizer_config\.json"):
    Tokenizer.from_hf(d)
  (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|no_such_token|>"}))
  with pytest.raises(ValueError, match=r"tokenizer_config\.json.*<\|no_such_token\|>"):
    Tokenizer.from_hf(d)
  (d / "tokenizer_config.json").unlink()
  with pytest.raises(FileNotFoundError, match=r"hf/tokenizer_config\.json"):
    Tokenizer.from_hf(d)
  with pytest.raises(FileNotFoundError, match="not a directory"):
    Tokenizer.from_hf(tmp_path / "nowhere")
