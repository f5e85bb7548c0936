"""Config schema and validation: errors name the field, before any work is done."""

import json
import pathlib
import subprocess
import sys

import ml_collections as mlc
import pytest

from subl_jax import config as config_lib

from conftest import job_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_defaults_validate_on_one_and_eight_devices():
  config_lib.validate(config_lib.defaults(), n_devices=1)
  config_lib.validate(config_lib.defaults(), n_devices=8)


def test_defaults_are_locked_against_unknown_fields():
  c = config_lib.defaults()
  with pytest.raises(AttributeError, match="learning_rat"):
    c.model.learning_rat = 1.0


def test_wrong_type_on_assignment():
  c = config_lib.defaults()
  with pytest.raises(TypeError, match="max_new_tokens"):
    c.chat.max_new_tokens = "many"


@pytest.mark.parametrize("section, expected", [
    ({"model": {"sepc": "smollm2"}}, r"config\.model\.sepc: unknown field"),
    ({"chat": {"max_new_tokens": "10"}}, r"config\.chat\.max_new_tokens: expected int"),
    ({"chat": {"temperature": True}}, r"config\.chat\.temperature: expected float"),
    ({"mesh": 4}, r"config\.mesh: expected a section"),
])
def test_hand_built_config_errors_name_the_field(section, expected):
  with pytest.raises(ValueError, match=expected):
    config_lib.validate(mlc.ConfigDict(section), n_devices=1)


@pytest.mark.parametrize("changes, expected", [
    ({"job": "dance"}, r"config\.job='dance'"),
    ({"model.dtype": "float8"}, r"config\.model\.dtype"),
    ({"model.spec": "random", "model.arch.n_heads": 5}, r"model\.arch\.n_heads=5: expected a divisor of model\.arch\.d_model=64"),
    ({"model.spec": "random", "model.arch.n_kv_heads": 3}, r"model\.arch\.n_kv_heads=3"),
    ({"model.spec": "random", "model.arch.n_layers": 0}, r"model\.arch\.n_layers=0"),
    ({"mesh.data": 3}, r"mesh.*product|mesh.*divide"),
    ({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1}, r"product 4 != 8"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, r"at most one"),
    ({"chat.max_new_tokens": 0}, r"config\.chat\.max_new_tokens=0"),
    ({"chat.temperature": -1.0}, r"config\.chat\.temperature=-1\.0"),
    ({"teacher.rank": -1}, r"config\.teacher\.rank=-1: expected a LoRA rank"),
])
def test_impossible_values_name_the_field(changes, expected):
  c = config_lib.defaults()
  for key, value in changes.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  with pytest.raises(ValueError, match=expected):
    config_lib.validate(c, n_devices=8)


def test_head_dim_makes_non_dividing_heads_legal():
  c = config_lib.defaults()
  c.model.spec = "random"
  c.model.arch.n_heads, c.model.arch.n_kv_heads, c.model.arch.head_dim = 6, 3, 16
  config_lib.validate(c, n_devices=1)


def _main(tmp_path, *args):
  return subprocess.run([sys.executable, "-m", "subl_jax.main", f"--workdir={tmp_path}", *args],
                        capture_output=True, text=True, cwd=ROOT, env=job_env(), timeout=600)


def test_main_rejects_a_bad_override_before_any_work(tmp_path):
  proc = _main(tmp_path / "run", "--config=configs/chat.py", "--config.chat.max_new_tokens=0")
  assert proc.returncode != 0
  assert "config.chat.max_new_tokens=0" in proc.stderr
  assert not (tmp_path / "run").exists()  # nothing written


def test_main_rejects_an_unknown_override(tmp_path):
  proc = _main(tmp_path / "run", "--config=configs/chat.py", "--config.chat.promt=hi")
  assert proc.returncode != 0 and "promt" in proc.stderr


def test_main_runs_a_random_model_and_writes_the_resolved_config(tmp_path):
  proc = _main(tmp_path, "--config=configs/chat.py:Say hi.", "--config.model.spec=random",
               "--config.chat.max_new_tokens=5", "--config.seed=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  resolved = json.loads((tmp_path / "config.json").read_text())
  assert resolved["model"]["spec"] == "random" and resolved["seed"] == 3
  assert resolved["chat"]["prompt"] == "Say hi."
  chat = json.loads((tmp_path / "chat.summary.json").read_text())
  assert chat["prompt"].endswith("<|im_start|>assistant\n") and "Say hi." in chat["prompt"]
  assert 1 <= chat["new_tokens"] <= 5


def test_main_keeps_a_report_named_like_its_job(tmp_path, monkeypatch):
  """The audit job writes its full report to `audit.json`; main's one-line summary must not replace it."""
  from subl_jax import jobs

  def fake_audit(cfg, workdir, mesh):
    (workdir / "audit.json").write_text('{"full": "report"}\n')
    return {"summary": 1}

  monkeypatch.setitem(jobs.JOBS, "audit", fake_audit)
  cfg = config_lib.defaults()
  cfg.job = "audit"
  jobs.run(cfg, tmp_path)
  assert json.loads((tmp_path / "audit.json").read_text()) == {"full": "report"}
  assert json.loads((tmp_path / "audit.summary.json").read_text()) == {"summary": 1}
  assert sorted(jobs.JOBS) == sorted(config_lib.JOBS)  # every job the config accepts is one main can run
