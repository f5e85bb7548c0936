"""Stages: pure functions of (config, input artifacts) -> an output directory, with manifests for caching and resume.

A stage's work happens in `<workdir>/<name>.partial/`; when it returns, a `manifest.json` is written there and the
directory is renamed to `<workdir>/<name>/`. So a completed stage is all-or-nothing, and a crash in a later stage
never touches it. Re-running skips a stage whose manifest matches: the same stage config (hashed) and the same
input fingerprints. A changed config re-runs that stage, and — as its fingerprint changes — every stage after it.

A killed stage resumes: its `.partial/` directory is kept when it belongs to the same config and inputs (recorded in
`.partial/claim.json`), so the stage function can keep finished pieces (sampling shards, Orbax checkpoints) and
continue; a `.partial/` made under a different config is wiped first.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import time
from typing import Any, Callable

import jax

from subl_jax import __version__

MANIFEST, CLAIM = "manifest.json", "claim.json"


def config_hash(stage_config: Any) -> str:
  """A stable hash of a JSON-able value (a ConfigDict section, dict, list, scalar)."""
  if hasattr(stage_config, "to_dict"):
    stage_config = stage_config.to_dict()
  blob = json.dumps(stage_config, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def fingerprint(stage_dir: str | pathlib.Path) -> str:
  """The fingerprint of a completed stage (changes whenever its config or any upstream stage changes)."""
  path = pathlib.Path(stage_dir) / MANIFEST
  try:
    return json.loads(path.read_text())["fingerprint"]
  except (OSError, KeyError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a completed stage ({e})") from None


def is_complete(stage_dir: str | pathlib.Path) -> bool:
  return (pathlib.Path(stage_dir) / MANIFEST).is_file()


def run_stage(workdir: str | pathlib.Path, name: str, stage_config: Any,
              inputs: dict[str, str | pathlib.Path], fn: Callable[[pathlib.Path], dict | None],
              force: bool = False) -> pathlib.Path:
  """Runs `fn(partial_dir)` unless `<workdir>/<name>` is complete for this config and these inputs.

  `inputs` maps a role to an upstream stage directory. `fn` writes its artifacts into the directory it is given and
  may return a JSON-able summary, stored in the manifest. Returns the completed stage directory.
  """
  workdir = pathlib.Path(workdir)
  final, partial = workdir / name, workdir / f"{name}.partial"
  claim = {"stage": name, "config_hash": config_hash(stage_config),
           "inputs": {role: fingerprint(path) for role, path in sorted(inputs.items())}}
  claim["fingerprint"] = hashlib.sha256(json.dumps(claim, sort_keys=True).encode()).hexdigest()[:16]
  if not force and is_complete(final) and fingerprint(final) == claim["fingerprint"]:
    return final
  lead = jax.process_index() == 0  # with several processes (shared workdir), process 0 owns the bookkeeping
  if partial.exists() and lead:
    try:
      same = json.loads((partial / CLAIM).read_text())["fingerprint"] == claim["fingerprint"]
    except (OSError, KeyError, json.JSONDecodeError):
      same = False
    if force or not same:
      shutil.rmtree(partial)
  if lead:
    partial.mkdir(parents=True, exist_ok=True)
    (partial / CLAIM).write_text(json.dumps(claim, indent=2) + "\n")
  _barrier(f"{name}:start")
  t0 = time.time()
  summary = fn(partial)
  _barrier(f"{name}:done")
  if not lead:
    return final
  manifest = dict(claim, config=_jsonable(stage_config), summary=summary, wall_s=round(time.time() - t0, 3),
                  versions={"subl_jax": __version__, "jax": jax.__version__}, finished=time.strftime("%FT%T%z"))
  (partial / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
  (partial / CLAIM).unlink()
  if final.exists():
    shutil.rmtree(final)
  partial.rename(final)
  return final


def _barrier(tag: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(tag)


def read_manifest(stage_dir: str | pathlib.Path) -> dict:
  return json.loads((pathlib.Path(stage_dir) / MANIFEST).read_text())


def _jsonable(value: Any) -> Any:
  return value.to_dict() if hasattr(value, "to_dict") else value
