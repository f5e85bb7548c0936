"""Sweep expansion and launcher dry-runs."""

import pathlib
import subprocess
import sys

import pytest

from subl_jax import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]

SWEEP = '''
from subl_jax import config as config_lib

def get_config(arg=None):
  return config_lib.defaults()

def get_sweep(arg=None):
  words = (arg or "owl,cat").split(",")
  return [{"chat.prompt": w, "seed": s} for w in words for s in (0, 1)]
'''


@pytest.fixture
def sweep_file(tmp_path):
  f = tmp_path / "animals.py"
  f.write_text(SWEEP)
  return f


def test_sweep_expands_to_one_command_per_run(sweep_file, tmp_path):
  cmds = sweep.commands(str(sweep_file), str(tmp_path / "runs"))
  assert len(cmds) == 4
  assert cmds[0] == (f"python -m subl_jax.main --config={sweep_file} --workdir={tmp_path}/runs/prompt-owl_seed-0 "
                     "--config.chat.prompt=owl --config.seed=0")
  assert len(set(cmds)) == 4
  assert len(sweep.commands(f"{sweep_file}:dog", "r")) == 2


def test_bad_sweep_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.py"):
    sweep.load_sweep(str(tmp_path / "nope.py"))
  f = tmp_path / "plain.py"
  f.write_text("def get_config(arg=None):\n  return None\n")
  with pytest.raises(ValueError, match="plain.py: a sweep config needs a get_sweep"):
    sweep.load_sweep(str(f))


def _dry(*args, **env):
  env = {"PATH": f"{pathlib.Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable, **env}
  proc = subprocess.run(["bash", *args], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.strip().splitlines()


def test_local_launcher_dry_run(sweep_file, tmp_path):
  lines = _dry("launch/local.sh", "--dry-run", str(sweep_file), str(tmp_path / "runs"), "--config.chat.max_new_tokens=4")
  assert len(lines) == 4 and all(l.endswith("--config.chat.max_new_tokens=4") for l in lines)
  single = _dry("launch/local.sh", "--dry-run", "configs/quickstart.py", "runs/qs")
  assert single == [f"{sys.executable} -m subl_jax.main --config=configs/quickstart.py --workdir=runs/qs"]


def test_tpu_pod_launcher_dry_run(sweep_file):
  lines = _dry("launch/tpu_pod.sh", "--dry-run", "--tpu=v5e-32", "--zone=us-west4-a", str(sweep_file), "/mnt/gcs/runs")
  assert lines[0].startswith("gcloud compute tpus tpu-vm scp --recurse") and "--worker=all" in lines[0]
  assert "pip install" in lines[1] and "--worker=all" in lines[1]
  runs = lines[2:]
  assert len(runs) == 4
  assert all("ssh v5e-32 --zone=us-west4-a --worker=all" in l and l.endswith("--config.mesh.distributed=true")
             for l in runs)


def test_slurm_launcher_dry_run(sweep_file):
  lines = _dry("launch/gpu_slurm.sbatch", "--dry-run", str(sweep_file), "/shared/runs")
  assert len(lines) == 4 and all(l.startswith("srun ") and "--config.mesh.distributed=true" in l for l in lines)
  one = _dry("launch/gpu_slurm.sbatch", "--dry-run", str(sweep_file), "/shared/runs", SLURM_ARRAY_TASK_ID="2")
  assert len(one) == 1 and "prompt-cat_seed-0" in one[0] and one[0].startswith("srun ")
