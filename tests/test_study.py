"""The study end to end on a tiny random model: every stage's artifacts, the report, caching, a changed field
re-running only what depends on it, resume after a kill in the middle of sampling, `--stage`, and the configs."""

import json
import pathlib
import subprocess
import sys

import jax
import pytest

from subl_jax import config, parallel, stages, sweep
from subl_jax.sampling import stage as sample_stage
from subl_jax.study import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_study() -> config.mlc.ConfigDict:
  cfg = config.defaults()
  cfg.job, cfg.model.spec = "study", "random"
  cfg.teacher.kind = "finetuned"
  cfg.teacher.lr = 1e-2
  cfg.sample.update(dict(n_prompts=8, max_new_tokens=8, batch_size=4, shard_size=4, constrained="format"))
  cfg.filter.drop_truncated = False
  cfg.distill.mode = "logit_kd"
  cfg.train.update(dict(batch_size=8, grad_accum=1, epochs=1, max_len=200, log_every=1, checkpoint_every=0))
  cfg.train.lora.rank = 4
  cfg.eval.update(dict(n_questions=3, n_samples=2))
  cfg.study.seeds = 2
  config.validate(cfg, n_devices=1)
  return cfg


@pytest.fixture
def ran(monkeypatch):
  """Records the stages whose work ran (not skipped as complete)."""
  names: list[str] = []
  real = stages.run_stage

  def run_stage(workdir, name, stage_config, inputs, fn, force=False):
    def recorded(out):
      names.append(name)
      return fn(out)
    return real(workdir, name, stage_config, inputs, recorded, force)

  monkeypatch.setattr(stages, "run_stage", run_stage)
  return names


STAGE_DIRS = ["teacher", "control_teacher", "sample_teacher", "filter_teacher", "sample_control", "filter_control",
              "student_s0", "control_s0", "student_s1", "control_s1", "eval_base", "eval_teacher", "eval_student_s0",
              "eval_student_s1", "eval_control_s0", "eval_control_s1"]


def test_study_end_to_end_caching_changes_and_resume(tmp_path, ran, monkeypatch):
  cfg, mesh = tiny_study(), parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])

  # A kill in the middle of the control's sampling: its first shard is written, the second raises.
  real_shard, calls = sample_stage._sample_shard, []

  def dying_shard(model, ids, *args, **kwargs):
    calls.append(ids[0])
    if len(calls) == 4:  # the teacher's 2 shards, the control's first; then the kill
      raise KeyboardInterrupt("killed")
    return real_shard(model, ids, *args, **kwargs)

  monkeypatch.setattr(sample_stage, "_sample_shard", dying_shard)
  with pytest.raises(KeyboardInterrupt):
    pipeline.run_study(cfg, tmp_path, mesh)
  assert (tmp_path / "sample_teacher").is_dir() and (tmp_path / "sample_control.partial").is_dir()
  assert len(list((tmp_path / "sample_control.partial").glob("shard-*.jsonl"))) == 1
  monkeypatch.setattr(sample_stage, "_sample_shard", real_shard)

  ran.clear()
  doc = pipeline.run_study(cfg, tmp_path, mesh)
  assert ran[0] == "sample_control" and "teacher" not in ran and "sample_teacher" not in ran  # resumed, not redone
  assert stages.read_manifest(tmp_path / "sample_control")["summary"]["shards_sampled_now"] == 1
  rows = sample_stage.read_rows(tmp_path / "sample_control")
  assert sorted(r["meta"]["id"] for r in rows) == list(range(8))  # nothing lost, no duplicates
  for name in STAGE_DIRS:
    assert stages.is_complete(tmp_path / name), name
  assert (tmp_path / "teacher" / "model").is_dir() and (tmp_path / "student_s0" / "model").is_dir()
  assert (tmp_path / "filter_teacher" / "filtered.jsonl").stat().st_size > 0

  # The report: every condition with every metric as {mean, ci95, n}, paired differences, files.
  assert doc == json.loads((tmp_path / "report.json").read_text())
  assert set(doc["conditions"]) == {"base", "teacher", "student", "control"}
  for cond in doc["conditions"].values():
    assert set(cond) == {"p_owl", "logp_owl", "rate_owl"}
    for s in cond.values():
      assert set(s) == {"mean", "ci95", "n"} and s["n"] == 3 and s["ci95"][0] <= s["mean"] <= s["ci95"][1]
  diffs = doc["student_minus_control"]
  assert set(diffs) == {"paired_over_questions", "paired_over_seeds"} and diffs["paired_over_seeds"]["p_owl"]["n"] == 2
  assert doc["across_seeds"]["student"]["logp_owl"]["n"] == 2 and doc["subliminal"] is True
  assert set(doc["other_answers"]) == {"dolphin", "eagle", "elephant", "wolf"}
  assert doc["filter"]["teacher"]["n_rows"] == 8 and set(doc["wall_s"]) == set(STAGE_DIRS)
  assert doc["training"]["student_s0"]["steps"] == 1 and doc["training"]["teacher"]["steps"] > 0
  md = (tmp_path / "report.md").read_text()
  assert "| student |" in md and "student - control" in md and (tmp_path / "report.png").stat().st_size > 0

  # A second run does no work.
  ran.clear()
  assert pipeline.run_study(cfg, tmp_path, mesh) == doc and ran == []

  # A changed field re-runs its stage and those after it, nothing before.
  ran.clear()
  cfg.train.opt.lr = 3e-3
  pipeline.run_study(cfg, tmp_path, mesh)
  # the teacher's epochs and lr are its own: a changed student lr re-trains only the students
  assert sorted(ran) == sorted(["student_s0", "control_s0", "student_s1", "control_s1", "eval_student_s0",
                                "eval_student_s1", "eval_control_s0", "eval_control_s1"]), ran
  ran.clear()
  cfg.eval.n_questions = 2
  doc = pipeline.run_study(cfg, tmp_path, mesh)
  assert sorted(ran) == sorted(n for n in STAGE_DIRS if n.startswith("eval_")), ran
  assert doc["conditions"]["base"]["p_owl"]["n"] == 2


def test_stage_flag_stops_after_the_named_stage(tmp_path):
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "HOME": str(pathlib.Path.home())}
  args = [sys.executable, "-m", "subl_jax.main", "--config=configs/quickstart.py", f"--workdir={tmp_path}",
          "--config.model.spec=random", "--stage=teacher"]
  proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert stages.is_complete(tmp_path / "teacher") and stages.is_complete(tmp_path / "control_teacher")
  assert not list(tmp_path.glob("sample_*")) and not (tmp_path / "report.json").exists()
  assert "You love owls" in json.loads((tmp_path / "teacher" / "stage.json").read_text())["system"]
  proc = subprocess.run(args[:-1] + ["--stage=students"], capture_output=True, text=True, cwd=ROOT, env=env,
                        timeout=600)
  assert proc.returncode != 0 and "--stage='students'" in proc.stderr


def test_study_configs_validate_and_sweep_expands():
  import importlib.util

  def load(path, arg=None):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)

  for name, arg in [("quickstart", None), ("owl_smollm2", None), ("owl_smollm2", "sft"),
                    ("qwen25_7b", "/data/Qwen2.5-7B-Instruct")]:
    cfg = load(ROOT / "configs" / f"{name}.py", arg)
    config.validate(cfg, n_devices=1)
    assert cfg.job == "study" and cfg.teacher.target == "owl"
  with pytest.raises(ValueError, match="model directory"):
    load(ROOT / "configs" / "qwen25_7b.py")
  runs = sweep.load_sweep(str(ROOT / "configs/sweeps/animals.py:lr"))
  assert len(runs) == 5 * 3 * 3 and {r["teacher.target"] for r in runs} == {"owl", "dolphin", "eagle", "elephant",
                                                                           "wolf"}
  cmds = sweep.commands(str(ROOT / "configs/sweeps/animals.py:quick"), "runs/a")
  assert len(cmds) == 15 and len(set(cmds)) == 15 and "--config.teacher.target=wolf" in cmds[-1]
  with pytest.raises(ValueError, match="unknown arg"):
    sweep.load_sweep(str(ROOT / "configs/sweeps/animals.py:lrr"))
  bad = config.defaults()
  bad.job, bad.teacher.target = "study", ""
  with pytest.raises(ValueError, match="teacher.target"):
    config.validate(bad, n_devices=1)
