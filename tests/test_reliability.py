"""Failure modes outside the happy path: bad or empty training files, huge rows, signals, exit codes, two runs in
one workdir, the persistent compilation cache, a report write that fails midway.

The subprocess tests run `python -m subl_jax.main` on a tiny random model (d_model 32, 2 layers) with the SmolLM2
tokenizer read straight from its GGUF (no model conversion)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from subl_jax.core.checkpoints import fetch
from subl_jax.core.checkpoints.tokenizer import Tokenizer
from subl_jax.core.training import chat_data

from conftest import job_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer.from_gguf(fetch.smollm2_gguf_path())


# --------------------------------------------------------------------------------------------- training data

def test_non_utf8_line_names_file_and_line(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_bytes(b'{"prompt": "a", "completion": "1"}\n\n{"prompt": "caf\xe9", "completion": "2"}\n')
  with pytest.raises(ValueError, match=rf"^{path}:3: not UTF-8 \(byte 0xe9 at byte 16 of the line.*expected "
                                       r"UTF-8 JSON"):
    chat_data.read_jsonl(path)
  # A bad byte far into a file (past text-mode read-ahead) still names its own line.
  good = b'{"prompt": "a", "completion": "1"}\n'
  path.write_bytes(good * 5000 + b'{"prompt": "\xff", "completion": "2"}\n')
  with pytest.raises(ValueError, match=rf"^{path}:5001: not UTF-8"):
    chat_data.read_jsonl(path)
  # Malformed JSON keeps naming file and line; CRLF line ends and non-ASCII UTF-8 read as before.
  path.write_bytes(good + b'{"prompt": "b",\n')
  with pytest.raises(ValueError, match=rf"^{path}:2: not valid JSON"):
    chat_data.read_jsonl(path)
  path.write_bytes('{"prompt": "café", "completion": "1"}\r\n \r\n{"prompt": "b", "completion": "2"}\r\n'.encode())
  assert [c[0]["content"] for c in chat_data.read_jsonl(path)] == ["café", "b"]


def test_empty_jsonl_names_the_file(tmp_path, tokenizer):
  path = tmp_path / "empty.jsonl"
  path.write_text("")
  with pytest.raises(ValueError, match=rf"^{path}: no rows \(an empty file\); expected one JSON object per line"):
    chat_data.read_jsonl(path)
  path.write_text("\n  \n")
  with pytest.raises(ValueError, match=rf"^{path}: no rows \(only blank lines\)"):
    chat_data.read_jsonl(path)
  # Every row dropped: the error names the file and counts the rows by reason.
  path.write_text(json.dumps({"prompt": "Hi", "completion": " ".join(["7"] * 200)}) + "\n")
  with pytest.raises(ValueError, match=rf"^{path}: no training examples left: all 1 rows were dropped, 1 longer "
                                       r"than max_len=50 tokens \(of which 0 too many bytes to fit"):
    chat_data.build(tokenizer, chat_data.read_jsonl(path), max_len=50)
  with pytest.raises(ValueError, match=r"^teacher rows: no training examples: no rows"):
    chat_data.build(tokenizer, chat_data.rows_to_chats([], "teacher rows"), max_len=50)


class SpyTokenizer:
  """The real tokenizer, recording the length of every text it is asked to encode."""

  def __init__(self, tok):
    self._tok, self.encoded = tok, []

  def encode(self, text, add_bos=False):
    self.encoded.append(len(text))
    return self._tok.encode(text, add_bos)

  def __getattr__(self, name):
    return getattr(self._tok, name)


def test_huge_row_is_dropped_without_tokenizing_it(tokenizer):
  huge = "7 " * 500_000  # 1 MB; max_len 100 x 81 bytes (SmolLM2's longest token) is 8.1 KB
  rows = [{"prompt": "Hi", "completion": "1 2 3"}, {"prompt": "Hi", "completion": huge},
          {"prompt": huge, "completion": "4"}, {"prompt": "Hi", "completion": " ".join(["7"] * 200)},
          {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "1"},
                        {"role": "user", "content": huge}, {"role": "assistant", "content": "2"}]}]
  spy = SpyTokenizer(tokenizer)
  ds = chat_data.build(spy, chat_data.rows_to_chats(rows), max_len=100, teacher_system="You love owls.")
  assert spy.encoded and max(spy.encoded) < 10_000, sorted(spy.encoded)[-3:]
  assert len(ds) == 1 and len(ds.teacher) == 1
  # 4 too long: the 400-token completion was tokenized and then dropped, the 3 huge ones never tokenized.
  assert (ds.n_too_long, ds.n_too_long_untokenized) == (4, 3)
  assert ds.summary()["dropped_too_long"] == 4 and ds.summary()["dropped_too_long_untokenized"] == 3
  assert chat_data.max_token_bytes(spy) == 81
  # What was kept is exactly what encode_chat gives without the bound.
  kept = chat_data.encode_chat(tokenizer, chat_data.with_system(chat_data.rows_to_chats(rows[:1])[0], ""))
  assert (ds.examples[0].tokens == kept.tokens).all() and (ds.examples[0].mask == kept.mask).all()


def test_token_count_lower_bound_holds(tokenizer):
  longest = chat_data.max_token_bytes(tokenizer)
  texts = ["\n" + " " * 80, "\n" + " " * 400, "7 " * 300, "owl " * 200, "猫头鹰" * 50, "<|im_end|>" * 20,
           "".join(chr(c) for c in range(32, 2000)), "Ġ" * 100]
  for text in texts:
    n = len(tokenizer.encode(text))
    assert chat_data.min_tokens(tokenizer, text) <= n, text[:20]
    assert n * longest >= len(text.encode("utf-8"))


# --------------------------------------------------------------------------------------------- signals

_TWO_SIGNALS = """
import os, signal, sys, time
from subl_jax.core.training.checkpoint import StopRequest
signal.signal(signal.SIGTERM, signal.{previous})
with StopRequest() as stop:
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(0.1)  # the handler runs between bytecodes; give it some
  assert stop.requested == signal.SIGTERM, stop.requested
  print("stop pending", flush=True)
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(2)
print("survived the second signal", flush=True)
"""


@pytest.mark.parametrize("previous", ["SIG_DFL", "SIG_IGN"])
def test_second_sigterm_falls_through_to_the_previous_disposition(previous):
  proc = subprocess.run([sys.executable, "-c", _TWO_SIGNALS.format(previous=previous)], capture_output=True,
                        text=True, cwd=ROOT, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert "stop pending" in proc.stdout, proc.stderr[-2000:]
  if previous == "SIG_DFL":  # dies of the signal, as it would have without StopRequest
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "survived" not in proc.stdout
  else:  # an ignored signal stays ignored
    assert proc.returncode == 0 and "survived" in proc.stdout, proc.stderr[-2000:]


def test_second_sigint_raises_keyboard_interrupt():
  from subl_jax.core.training.checkpoint import StopRequest
  # Python's own SIGINT handler before the stop, whatever the test worker had installed (xdist workers may differ)
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(KeyboardInterrupt):
      with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.requested == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, outer)


# --------------------------------------------------------------------------------------------- report

_FULL_DISK = """
import resource, signal, sys
from subl_jax.study import report
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
conditions = {f"condition_{i}": {"mean": 0.5, "ci95": [0.4, 0.6], "n": 10} for i in range(200)}  # ~20 KB of JSON
try:
  report.write_report(sys.argv[1], conditions, "new")
except OSError as e:
  print("write failed:", e)
  sys.exit(3)
"""


def test_report_write_failing_midway_keeps_the_old_report(tmp_path):
  from subl_jax.study import report
  report.write_report(tmp_path, {"a": {"mean": 0.5, "ci95": [0.4, 0.6], "n": 10}}, "old")
  old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  assert sorted(old) == ["report.json", "report.md", "report.png"]
  # A real failure in the middle of writing (the file-size limit as a full disk): the new report.json is ~20 KB.
  proc = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path)], capture_output=True, text=True,
                        cwd=ROOT, timeout=120)
  assert proc.returncode == 3 and "write failed" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr[-2000:])
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old  # intact, and no temporary file left over
  assert json.loads((tmp_path / "report.json").read_text())["title"] == "old"
  # A value JSON cannot hold fails before any file is touched.
  with pytest.raises(TypeError):
    report.write_report(tmp_path, {"a": {"mean": 0.5, "ci95": [0.4, 0.6], "n": 10}}, "new", extra={"x": object()})
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old


# --------------------------------------------------------------------------------------------- subl_jax.main

def tiny_train_job(tmp_path, epochs):
  """A `train` job config file for a tiny random model (SmolLM2's tokenizer from its GGUF) on 16 short rows: 4
  steps an epoch."""
  data = tmp_path / "data.jsonl"
  data.write_text("".join(json.dumps({"prompt": f"Continue: {i}, {i + 1}", "completion": f"{i + 2}, {i + 3}"}) + "\n"
                          for i in range(16)))
  path = tmp_path / "tiny_train.py"
  path.write_text(textwrap.dedent(f"""
      from subl_jax import config

      def get_config(arg=None):
        cfg = config.defaults()
        cfg.job, cfg.model.spec = "train", "random"
        cfg.model.tokenizer = "gguf:{fetch.smollm2_gguf_path()}"
        cfg.model.arch.update(dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64))
        cfg.mesh.fsdp = 1
        cfg.train.update(dict(data="{data}", batch_size=4, grad_accum=1, epochs={epochs}, max_len=64, log_every=100,
                              checkpoint_every=0))
        cfg.train.lora.rank = 0
        return cfg
      """))
  return path


def main_env(cache):
  # Not the test process's XLA_FLAGS (8 fake devices); our own cache dir, so that the compilation cache is seen.
  return job_env(SUBL_JAX_CACHE=str(cache), TQDM_DISABLE="1",
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # the tiny job's programs compile in well under 1 s


def main_args(config, workdir, *flags):
  return [sys.executable, "-m", "subl_jax.main", f"--config={config}", f"--workdir={workdir}", *flags]


def cache_entries(cache):
  d = cache / "jax_compilation_cache"
  return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_sigterm_stops_with_exit_75_and_a_rerun_resumes(tmp_path):
  config = tiny_train_job(tmp_path, epochs=75)  # 300 steps: still running when the first metrics row (step 100) appears
  workdir, cache = tmp_path / "run", tmp_path / "cache"
  proc = subprocess.Popen(main_args(config, workdir), cwd=ROOT, env=main_env(cache), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    metrics = workdir / "sft.partial" / "train" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    assert proc.poll() is None, f"finished before the first metrics row: {proc.communicate()[1][-3000:]}"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert proc.returncode == 75, (proc.returncode, err[-3000:])
  assert "Traceback" not in err, err[-3000:]
  lines = [line for line in err.splitlines() if "subl_jax.main:" in line]
  assert len(lines) == 1 and lines[0] == err.rstrip("\n").splitlines()[-1], err[-3000:]
  line = lines[0][lines[0].index("subl_jax.main:"):]
  assert line.startswith(f"subl_jax.main: job 'train' in {workdir} stopped by signal 15 after step "), line
  assert f"checkpoint saved in {workdir}" in line and line.endswith("re-run the same command to resume"), line
  assert cache_entries(cache), "the compilation cache is on by default"

  done = subprocess.run(main_args(config, workdir), cwd=ROOT, env=main_env(cache), capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  train = json.loads((workdir / "sft" / "manifest.json").read_text())["summary"]["train"]
  assert train["steps"] == 300 and 0 < train["resumed_from"] < 300, train


def snapshot(d):
  return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
          for p in sorted(d.rglob("*"))} | {".": d.stat().st_mtime_ns}


def test_second_run_in_a_busy_workdir_fails_fast_and_touches_nothing(tmp_path):
  from subl_jax import workdir_lock
  config = tiny_train_job(tmp_path, epochs=1)
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text('{"from": "the running job"}\n')
  with workdir_lock.hold(workdir) as lock:
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    before = snapshot(workdir)
    t0 = time.time()
    proc = subprocess.run(main_args(config, workdir), cwd=ROOT, env=main_env(tmp_path / "cache"),
                          capture_output=True, text=True, timeout=300)
    took = time.time() - t0
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert f"workdir {workdir} is in use by another run (pid {os.getpid()} on " in proc.stderr, proc.stderr[-3000:]
    assert "pytest" in proc.stderr.splitlines()[-1] and "Traceback" not in proc.stderr  # the holder's command
    assert snapshot(workdir) == before  # config.json, the lock file, nothing else written
    assert not (tmp_path / "cache" / "jax_compilation_cache").exists() or not cache_entries(tmp_path / "cache")
    assert took < 120, took  # no model loaded, nothing compiled
  # Released: the next run gets the lock (and writes its own details into it).
  with workdir_lock.hold(workdir) as lock:
    assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
  from subl_jax import workdir_lock
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom subl_jax import workdir_lock\n"
                             "with workdir_lock.hold(sys.argv[1]):\n  print('held', flush=True)\n  time.sleep(300)",
                             str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(workdir_lock.WorkdirBusy, match=rf"(?s)workdir {tmp_path} is in use by another run "
                                                       rf"\(pid {holder.pid} on .*workdir_lock\.hold"):
      with workdir_lock.hold(tmp_path):
        pass
  finally:
    holder.kill()
    holder.wait(timeout=60)
  assert holder.returncode == -signal.SIGKILL
  with workdir_lock.hold(tmp_path) as lock:  # no stale lock after a SIGKILL
    assert json.loads(lock.read_text())["pid"] == os.getpid()


# What `main` does with `--compile_cache` before its job compiles anything: configure, then compile one program.
CACHE_PROBE = ("import sys, jax, jax.numpy as jnp; from subl_jax import main; "
               "main.configure_compile_cache(sys.argv[1] == 'on'); "
               "jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()")


def test_compilation_cache_on_by_default_off_by_flag_or_env(tmp_path):
  # on: a real job writes entries
  config, cache = tiny_train_job(tmp_path, epochs=1), tmp_path / "on"
  proc = subprocess.run(main_args(config, tmp_path / "run"), cwd=ROOT, env=main_env(cache), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert cache_entries(cache)
  # off by the flag's value or by the variable; the same probe with neither writes (so "nothing written" means off)
  runs = {"flag on": ("on", {}), "flag off": ("off", {}), "env off": ("on", {"SUBL_JAX_COMPILE_CACHE": "0"})}
  for name, (flag, env) in runs.items():
    cache = tmp_path / name.replace(" ", "_")
    proc = subprocess.run([sys.executable, "-c", CACHE_PROBE, flag], cwd=ROOT, env=main_env(cache) | env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (name, proc.stderr[-3000:])
    assert bool(cache_entries(cache)) == (name == "flag on"), (name, cache_entries(cache))
