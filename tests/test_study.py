"""The study end to end on a tiny random model: every stage's artifacts, the report, caching, a changed field
re-running only what depends on it, resume after a kill in the middle of sampling, `--stage`, and the configs."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from subl_jax import config, sweep
from subl_jax.core import parallel
from subl_jax.study import stages
from subl_jax.study import sample_shards as sample_stage
from subl_jax.study import pipeline

from conftest import job_env

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
  cfg.train.opt.warmup_steps = 0  # one step: it must move the students
  cfg.train.lora.rank = 4
  cfg.eval.update(dict(n_questions=3, n_samples=2, icl_tokens=200))
  cfg.study.update(dict(targets="owl,dolphin", seeds=2, conditions="icl,shuffle_within"))
  config.validate(cfg, n_devices=1)
  return cfg


@pytest.fixture
def ran(monkeypatch):
  """Records the stages whose work ran (not skipped as complete)."""
  names: list[str] = []
  real = stages.run_stage

  def run_stage(workdir, name, stage_config, inputs, fn, force=False, code=()):
    def recorded(out):
      names.append(name)
      return fn(out)
    return real(workdir, name, stage_config, inputs, recorded, force, code)

  monkeypatch.setattr(stages, "run_stage", run_stage)
  return names


TARGETS = ("owl", "dolphin")
STUDENTS = [f"student_{t}{c}_s{k}" for t in TARGETS for c in ("", "_shuffle_within") for k in (0, 1)]
STAGE_DIRS = ([f"teacher_{t}" for t in TARGETS] + ["base"] + [f"{s}_{t}" for s in ("sample", "filter") for t in TARGETS]
              + [f"shuffle_within_{t}" for t in TARGETS] + STUDENTS + ["eval_base"]
              + [f"eval_teacher_{t}" for t in TARGETS] + [f"eval_{s}" for s in STUDENTS]
              + [f"eval_icl_{t}" for t in TARGETS])


def test_study_end_to_end_caching_changes_and_resume(tmp_path, ran, monkeypatch):
  cfg, mesh = tiny_study(), parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])

  # A kill in the middle of the dolphin teacher's sampling: its first shard is written, the second raises.
  real_shard, calls = sample_stage._sample_shard, []

  def dying_shard(model, ids, *args, **kwargs):
    calls.append(ids[0])
    if len(calls) == 4:  # the owl teacher's 2 shards, the dolphin teacher's first; then the kill
      raise KeyboardInterrupt("killed")
    return real_shard(model, ids, *args, **kwargs)

  monkeypatch.setattr(sample_stage, "_sample_shard", dying_shard)
  with pytest.raises(KeyboardInterrupt):
    pipeline.run_study(cfg, tmp_path, mesh)
  assert (tmp_path / "sample_owl").is_dir() and (tmp_path / "sample_dolphin.partial").is_dir()
  assert len(list((tmp_path / "sample_dolphin.partial").glob("shard-*.jsonl"))) == 1
  monkeypatch.setattr(sample_stage, "_sample_shard", real_shard)

  ran.clear()
  doc = pipeline.run_study(cfg, tmp_path, mesh)
  assert ran[0] == "sample_dolphin" and "teacher_owl" not in ran and "sample_owl" not in ran  # resumed, not redone
  assert stages.read_manifest(tmp_path / "sample_dolphin")["summary"]["shards_sampled_now"] == 1
  rows = sample_stage.read_rows(tmp_path / "sample_dolphin")
  assert sorted(r["meta"]["id"] for r in rows) == list(range(8))  # nothing lost, no duplicates
  for name in STAGE_DIRS:
    assert stages.is_complete(tmp_path / name), name
  # logit_kd: the base model is the control; nothing samples or trains for it
  assert not list(tmp_path.glob("control_*")) and not (tmp_path / "sample_base").exists()
  assert stages.read_manifest(tmp_path / "base")["summary"]["model"] == "base"
  assert (tmp_path / "teacher_owl" / "model").is_dir() and (tmp_path / "student_owl_s0" / "model").is_dir()

  # seeds change training, not the samples
  s0, s1 = (json.loads((tmp_path / f"eval_student_owl_s{k}" / "metrics.json").read_text()) for k in (0, 1))
  assert s0["logp_owl"]["per_question"] != s1["logp_owl"]["per_question"]
  assert stages.read_manifest(tmp_path / "student_owl_s0")["inputs"] == \
      stages.read_manifest(tmp_path / "student_owl_s1")["inputs"]

  # The report: the transfer matrix over targets x answers, specificity per target over 2 seeds, the conditions.
  assert doc == json.loads((tmp_path / "report.json").read_text())
  m = doc["students"]["matrix"]
  assert m["rows"] == list(TARGETS) and m["cols"][:2] == list(TARGETS) and len(m["cols"]) == 5
  assert len(m["mean"]) == 2 and len(m["mean"][0]) == 5 and m["n_seeds"] == 2 and m["n_questions"] == 3
  for t in TARGETS:
    sp = doc["students"]["specificity"][t]
    assert sp["over_seeds"]["n"] == 2 and len(sp["per_seed"]) == 2
    assert t in doc["students"]["verdict"][t] and "teachers" in doc and t in doc["teachers"]
  assert set(doc["null_conditions"]) == {"icl", "shuffle_within"}
  assert doc["null_conditions"]["icl"]["matrix"]["n_seeds"] == 1
  assert doc["null_conditions"]["shuffle_within"]["matrix"]["n_seeds"] == 2
  # a shuffled condition is compared with the students seed by seed; the in-context one has no seeds to pair
  sw = doc["null_conditions"]["shuffle_within"]
  paired = np.subtract(doc["students"]["mean_specificity"]["per_seed"], sw["mean_specificity"]["per_seed"])
  assert sw["vs_students"]["difference"]["mean"] == pytest.approx(paired.mean(), abs=1e-12)
  assert sw["vs_students"]["difference"]["n"] == 2 and "vs_students" not in doc["null_conditions"]["icl"]
  assert stages.read_manifest(tmp_path / "eval_icl_owl")["summary"]["icl_pairs"] > 0
  assert "profile_coefficient" in doc["students"] and doc["subliminal"] is True
  assert set(doc["conditions"]) == {"base", "teacher:owl", "teacher:dolphin", "student:owl", "student:dolphin",
                                    "owl:icl", "dolphin:icl", "owl:shuffle_within", "dolphin:shuffle_within"}
  assert set(doc["wall_s"]) == set(STAGE_DIRS)
  md = (tmp_path / "report.md").read_text()
  assert "Transfer matrix" in md and "Verdict" in md and "students − shuffle_within" in md
  assert (tmp_path / "report.png").stat().st_size > 0

  # A second run does no work.
  ran.clear()
  assert pipeline.run_study(cfg, tmp_path, mesh) == doc and ran == []

  # A changed field re-runs its stage and those after it, nothing before.
  ran.clear()
  cfg.train.opt.lr = 3e-3
  pipeline.run_study(cfg, tmp_path, mesh)
  # the teacher's epochs and lr are its own: a changed student lr re-trains only the students
  assert sorted(ran) == sorted(STUDENTS + [f"eval_{s}" for s in STUDENTS]), ran
  ran.clear()
  cfg.eval.n_questions = 2
  doc = pipeline.run_study(cfg, tmp_path, mesh)
  assert sorted(ran) == sorted(n for n in STAGE_DIRS if n.startswith("eval_")), ran
  assert doc["conditions"]["base"]["logp_owl"]["n"] == 2


def test_teacher_rank_frees_the_students_rank():
  from subl_jax.study import teacher_stage
  cfg = tiny_study()
  fingerprint = lambda c: stages.config_hash(stages.select(c, teacher_stage.config_paths(c)))
  before = fingerprint(cfg)
  cfg.train.lora.update(dict(rank=2, alpha=2.0))
  assert fingerprint(cfg) != before  # the teacher follows train.lora
  cfg.teacher.rank = 4
  with_rank = fingerprint(cfg)
  lora = teacher_stage.teacher_train_config(cfg).lora
  assert (lora.rank, lora.alpha) == (4, 4.0) and (cfg.train.lora.rank, cfg.train.lora.alpha) == (2, 2.0)
  cfg.train.lora.update(dict(rank=16, alpha=16.0))
  assert fingerprint(cfg) == with_rank  # the students' rank no longer moves the teacher
  cfg.train.lora.targets = "q,v"
  assert fingerprint(cfg) != with_rank and teacher_stage.teacher_train_config(cfg).lora.targets == "q,v"


def test_sft_study_trains_control_students_and_remat_or_a_moved_workdir_reuse_samples(tmp_path, ran):
  cfg, mesh = tiny_study(), parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  cfg.teacher.kind, cfg.distill.mode = "system_prompt", "sft"
  cfg.study.update(dict(seeds=1, conditions="shuffle_across"))
  doc = pipeline.run_study(cfg, tmp_path / "a", mesh)
  assert stages.is_complete(tmp_path / "a" / "control_s0") and stages.is_complete(tmp_path / "a" / "filter_base")
  assert set(doc["student_minus_control"]) == set(TARGETS) and "verdict" in doc["students"]
  # training only: the first stage that would run is a student's (teachers, samples and filters come before)
  changed = config.mlc.ConfigDict(cfg.to_dict())
  changed.model.remat_policy = "none"
  with stages.only_cached(), pytest.raises(stages.NotCached) as stale:
    pipeline.run_study(changed, tmp_path / "a", mesh)
  assert stale.value.name in ("student_owl_s0", "control_s0"), stale.value.name
  import shutil
  shutil.move(tmp_path / "a", tmp_path / "b")  # a moved workdir is still cached
  ran.clear()
  pipeline.run_study(cfg, tmp_path / "b", mesh)
  assert ran == []


def test_stage_flag_stops_after_the_named_stage(tmp_path):
  env = job_env()
  args = [sys.executable, "-m", "subl_jax.main", "--config=configs/quickstart.py", f"--workdir={tmp_path}",
          "--config.model.spec=random", "--stage=teacher"]
  proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert stages.is_complete(tmp_path / "teacher_owl") and stages.is_complete(tmp_path / "base")
  assert not list(tmp_path.glob("sample_*")) and not (tmp_path / "report.json").exists()
  assert "You love owls" in json.loads((tmp_path / "teacher_owl" / "stage.json").read_text())["system"]
  proc = subprocess.run(args[:-1] + ["--stage=students"], capture_output=True, text=True, cwd=ROOT, env=env,
                        timeout=600)
  assert proc.returncode != 0 and "--stage='students'" in proc.stderr


def test_study_configs_validate_and_sweep_expands():
  load = config.from_file
  for name, arg in [("quickstart", None), ("demo_cpu", None), ("demo_cpu", "1ep"), ("demo_gpu", None),
                    ("animals_smollm2", None), ("animals_smollm2", "sft"), ("qwen25_7b", "/data/Qwen2.5-7B-Instruct"),
                    ("mitigate_smollm2", None)]:
    cfg = load(ROOT / "configs" / f"{name}.py", arg)
    config.validate(cfg, n_devices=1)
    assert cfg.job == "study" and len(pipeline.targets(cfg)) >= 2, name  # specificity needs other targets
    assert name == "quickstart" or cfg.study.seeds >= 3, name  # a config that claims a result has seeds
  mnist = load(ROOT / "configs" / "mitigate_mnist.py")
  config.validate(mnist, n_devices=1)
  assert mnist.job == "mnist_aux" and tuple(mnist.mnist.mitigations.split(",")) == config.MITIGATIONS
  with pytest.raises(ValueError, match="model directory"):
    load(ROOT / "configs" / "qwen25_7b.py")
  runs = sweep.load_sweep(str(ROOT / "configs/sweeps/animals.py:lr,rank"))
  assert len(runs) == 9 and {r["train.lora.rank"] for r in runs} == {4, 8, 16}
  cmds = sweep.commands(str(ROOT / "configs/sweeps/animals.py:lr,quick"), "runs/a")
  assert len(cmds) == 3 and len(set(cmds)) == 3 and "--config.train.opt.lr=0.0005" in cmds[-1]
  with pytest.raises(ValueError, match="unknown arg"):
    sweep.load_sweep(str(ROOT / "configs/sweeps/animals.py:lrr"))
  bad = config.defaults()
  bad.job, bad.teacher.target = "study", ""
  with pytest.raises(ValueError, match="teacher.target"):
    config.validate(bad, n_devices=1)
