"""The `sample` stage (shards, kill-and-resume), the `filter` stage (reasons, report, echo, subsample), their config
sections, and the `sample` job end to end on a random model with format-constrained decoding."""

import json

import jax
import numpy as np
import pytest

from subl_jax.core import api, parallel
from subl_jax import config
from subl_jax.study import stages
from subl_jax.study.data import filter_stage, numbers
from subl_jax.core.models import transformer as tfm
from subl_jax.core.models.config import ModelConfig
from subl_jax.study import sample_shards as sample_stage

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48)


class CharTokenizer:
  """Printable ASCII as ids 2..96 (' ' is 2), id 1 ends a turn; enough of a tokenizer for the sample stage."""
  stop_ids, pad_id = [1], 0

  def encode_chat(self, messages, add_generation_prompt=True):
    text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<a>"
    return [ord(c) - 30 if 32 <= ord(c) < 127 else 2 for c in text]

  def decode(self, ids, skip_special_tokens=True):
    return "".join(chr(i + 30) for i in ids if i >= 2)


@pytest.fixture(scope="module")
def model():
  shapes, _ = tfm.abstract_params(CFG)
  rng = np.random.default_rng(0)
  params = jax.tree.map_with_path(
      lambda path, x: np.ones(x.shape, np.float32) if "norm" in jax.tree_util.keystr(path)
      else rng.normal(0, 0.5, x.shape).astype(np.float32), shapes)
  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  return api.Model(CFG, jax.device_put(params, tfm.param_shardings(CFG, mesh)), CharTokenizer(), mesh)


PROMPTS = [f"Go on: {i}, {i + 3}." for i in range(10)]
SETTINGS = sample_stage.SampleSettings(max_new_tokens=6, temperature=1.0, batch_size=4, shard_size=4, seed=3)


def run(workdir, model, settings=SETTINGS):
  return stages.run_stage(workdir, "sample", {"n": len(PROMPTS)}, {},
                          lambda d: sample_stage.sample_stage(d, model, PROMPTS, "Be brief.", settings,
                                                              progress=False))


def test_kill_and_resume_gives_the_uninterrupted_rows(model, tmp_path, monkeypatch):
  whole = sample_stage.read_rows(run(tmp_path / "whole", model))
  assert [r["meta"]["id"] for r in whole] == list(range(10))
  assert all(set(r) == {"prompt", "completion", "meta"} and r["prompt"] == PROMPTS[r["meta"]["id"]] for r in whole)

  write = sample_stage.write_shard
  calls = []

  def dies_on_second_shard(path, rows):
    calls.append(path.name)
    if len(calls) == 2:
      raise KeyboardInterrupt("killed")
    write(path, rows)

  monkeypatch.setattr(sample_stage, "write_shard", dies_on_second_shard)
  with pytest.raises(KeyboardInterrupt):
    run(tmp_path / "killed", model)
  partial = tmp_path / "killed" / "sample.partial"
  assert sorted(p.name for p in partial.glob("shard-*")) == ["shard-00000.jsonl"]
  first = (partial / "shard-00000.jsonl").stat()
  monkeypatch.setattr(sample_stage, "write_shard", write)
  resumed = run(tmp_path / "killed", model)
  assert stages.read_manifest(resumed)["summary"]["shards_sampled_now"] == 2
  assert (resumed / "shard-00000.jsonl").stat().st_mtime_ns == first.st_mtime_ns  # kept, not redone
  assert sample_stage.read_rows(resumed) == whole  # same rows, no duplicates, nothing lost


def without_logprob(rows):
  return [dict(r, meta={k: v for k, v in r["meta"].items() if k != "logprob"}) for r in rows]


def test_rows_do_not_depend_on_batch_or_shard_size(model, tmp_path):
  whole = sample_stage.read_rows(run(tmp_path / "a", model))
  other = sample_stage.SampleSettings(**{**SETTINGS.__dict__, "batch_size": 8, "shard_size": 10})
  rows = sample_stage.read_rows(run(tmp_path / "b", model, other))
  assert without_logprob(rows) == without_logprob(whole)  # the same draws
  # log-probabilities agree to float32 rounding (other batch shapes sum in another order)
  np.testing.assert_allclose([r["meta"]["logprob"] for r in rows], [r["meta"]["logprob"] for r in whole], rtol=1e-5)
  reseeded = sample_stage.SampleSettings(**{**SETTINGS.__dict__, "seed": 4})
  assert sample_stage.read_rows(run(tmp_path / "c", model, reseeded)) != whole


# ------------------------------------------------------------------------------------------- filter

def row(i, completion, prompt="Examine these numbers: 767, 589, 778. Add 10 more.", stopped=True):
  return {"prompt": prompt, "completion": completion, "meta": {"id": i, "stopped": stopped}}


ROWS = [row(0, "1, 2, 3"), row(1, " 1, 2, 3"), row(2, "1, 2, 3\n"), row(3, "1 2 3 4 5 6 7 8 9 10 11"),
        row(4, "1000, 2"), row(5, "666, 1"), row(6, "767, 589"), row(7, "12;15", stopped=False), row(8, "[6, 5]."),
        row(9, "hello")]


def test_filter_reasons_and_report():
  kept, report = filter_stage.filter_rows(ROWS, filter_stage.FilterSettings(banned_numbers=True, max_rows=0))
  assert [r["completion"] for r in kept] == ["1, 2, 3", "767, 589", "[6, 5]."]
  assert all(set(r) == {"prompt", "completion"} for r in kept)
  assert report["reject_reasons"] == {"invalid format": 3, "too many numbers": 1, "numbers too large": 1,
                                      "has banned numbers": 2}  # row 3 has a 4
  assert report["n_passed_filter"] == 4 and report["keep_rate"] == 0.4
  assert report["n_truncated_passing"] == 1 and report["dropped_truncated"] == 1
  assert report["n_echo_passing"] == 1 and report["dropped_echo"] == 0 and report["n_written"] == 3
  # whitespace is never stripped, as in the reference
  assert all(numbers.reject_reasons(r["completion"]) == ["invalid format"] for r in ROWS[1:3])


def test_completion_text_keeps_whitespace_for_the_filter():
  """Completions are decoded verbatim (no strip), so the filter sees the whitespace the reference would."""
  tok = api.load_tokenizer("smollm2")
  for text in [" 1, 2, 3", "1, 2, 3\n", "4 5 6 "]:
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert numbers.reject_reasons(text) == ["invalid format"]


def test_filter_options_echo_truncation_and_subsample():
  kept, report = filter_stage.filter_rows(ROWS, filter_stage.FilterSettings(drop_echo=True, drop_truncated=False,
                                                                           max_rows=0))
  assert [r["completion"] for r in kept] == ["1, 2, 3", "666, 1", "12;15", "[6, 5]."]
  assert report["dropped_echo"] == 1 and report["dropped_truncated"] == 0
  many = [row(i, f"{i % 1000}, 1") for i in range(200)]
  a, rep_a = filter_stage.filter_rows(many, filter_stage.FilterSettings(max_rows=50, seed=1))
  b, _ = filter_stage.filter_rows(many, filter_stage.FilterSettings(max_rows=50, seed=1))
  c, _ = filter_stage.filter_rows(many, filter_stage.FilterSettings(max_rows=50, seed=2))
  assert a == b != c and len(a) == 50 and rep_a["n_kept"] == 200 and rep_a["n_written"] == 50
  ids = [int(r["completion"].split(",")[0]) for r in a]
  assert ids == sorted(ids)  # kept in prompt order


# ------------------------------------------------------------------------------------------- config and job

def test_config_sections_validate():
  cfg = config.defaults()
  config.validate(cfg, n_devices=1)
  for field, value, match in [("temperature", -1.0, "sample.temperature"), ("top_p", 0.0, "sample.top_p"),
                              ("constrained", "json", "sample.constrained"), ("batch_size", 0, "sample.batch_size")]:
    bad = config.defaults()
    bad.sample[field] = value
    with pytest.raises(ValueError, match=match):
      config.validate(bad, n_devices=1)
  bad = config.defaults()
  bad.sample.target, bad.sample.system_prompt = "owl", "You like owls."
  with pytest.raises(ValueError, match="sample.system_prompt"):
    config.validate(bad, n_devices=1)


def test_sample_job_end_to_end_with_format_constraint(tmp_path):
  """A random model cannot write numbers on its own; with format-constrained decoding its rows pass the filter."""
  from subl_jax.study.train_jobs import run_sample
  cfg = config.defaults()
  cfg.job, cfg.model.spec = "sample", "random"
  cfg.sample.update(dict(n_prompts=6, target="owl", max_new_tokens=8, batch_size=4, shard_size=4,
                         constrained="format"))
  cfg.filter.drop_truncated = False
  config.validate(cfg, n_devices=8)
  mesh = parallel.make_mesh(1, -1, 1)
  result = run_sample(cfg, tmp_path, mesh)
  assert result["sample"]["n_rows"] == 6 and result["filter"]["n_passed_filter"] == 6
  rows = [json.loads(line) for line in open(result["filtered"])]
  assert len(rows) == 6 and rows[0]["prompt"] == numbers.generate_prompts(1, 47)[0]
  assert run_sample(cfg, tmp_path, mesh) == result  # both stages complete: nothing re-runs
