"""Stages: pure functions of (config, inputs, code) -> an output directory, with manifests for caching and resume.

A stage's work happens in `<workdir>/<name>.partial/`; when it returns, a `manifest.json` is written there and the
directory is renamed to `<workdir>/<name>/`. So a completed stage is all-or-nothing, and a crash in a later stage
never touches it. Re-running skips a stage whose fingerprint matches. The fingerprint covers exactly:
  - the config paths the stage declares (`Stage.config`) and the instance's own parameters (e.g. its seed),
  - its inputs' fingerprints (an upstream stage's manifest fingerprint, or a file's sha256 — not its path, so a
    copied or moved workdir is still cached),
  - the source of the code the stage runs (`Stage.code`: those modules and every `subl_jax` module they import,
    transitively), so a fix re-runs the stages it affects and nothing else.
A changed fingerprint re-runs that stage and — as its own fingerprint changes — every stage after it.

A killed stage resumes: its `.partial/` directory is kept when it belongs to the same fingerprint (recorded in
`.partial/claim.json`), so the stage function can keep finished pieces (sampling shards, Orbax checkpoints) and
continue; a `.partial/` made under a different fingerprint is wiped first.

Inside `only_cached()` a stage that would run raises `NotCached` instead: a caller asks a study's own stage
sequence whether its work is done here (the LLM audit asks it of the students) without running or duplicating it.

With several processes sharing a workdir, process 0 owns the bookkeeping (claim, manifest, rename) and every
process leaves `run_stage` only once the stage is committed, so the next stage can read its fingerprint.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import pathlib
import shutil
import time
from typing import Any, Callable, Sequence

import jax

MANIFEST, CLAIM = "manifest.json", "claim.json"


class NotCached(Exception):
  """Raised inside `only_cached()` by a stage that would run: missing, or complete under another fingerprint."""

  def __init__(self, name: str):
    super().__init__(f"stage {name!r} is not complete with this config, code and inputs")
    self.name = name


_ONLY_CACHED = contextvars.ContextVar("subl_jax_only_cached", default=False)


@contextlib.contextmanager
def only_cached():
  """Inside this block a stage that would run raises `NotCached` instead, and nothing runs: a study's own stage
  sequence answers "is this work already done here?" (the audit asks it of the students) without duplicating it."""
  token = _ONLY_CACHED.set(True)
  try:
    yield
  finally:
    _ONLY_CACHED.reset(token)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One kind of stage, declared in a study's stage table.

  `fn(job)` does the work into `job.out` and returns a JSON-able summary. `config` lists the config paths the output
  depends on ('model.spec', 'sample', 'seed'; a callable of the config for choices such as "a system-prompt teacher
  does not depend on `train`"). `inputs` names the roles of upstream stages or files (or is a callable of the
  config, like `config`). `code` lists the modules whose
  source is part of the fingerprint (with every package module they import).
  """
  kind: str
  fn: Callable[["Job"], dict | None]
  config: tuple[str, ...] | Callable[[Any], tuple[str, ...]]
  inputs: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()
  code: tuple[str, ...] = ()
  cleanup: tuple[str, ...] = ()  # paths in the stage dir deleted once it is committed (e.g. resume checkpoints)

  def config_paths(self, cfg: Any) -> tuple[str, ...]:
    return self.config(cfg) if callable(self.config) else self.config

  def input_roles(self, cfg: Any) -> tuple[str, ...]:
    return self.inputs(cfg) if callable(self.inputs) else self.inputs


@dataclasses.dataclass
class Job:
  """What a stage function gets: the config, its output directory, its inputs, the instance parameters (part of
  the fingerprint) and the run's context (mesh, model loaders: not part of it)."""
  cfg: Any
  out: pathlib.Path
  inputs: dict[str, pathlib.Path]
  params: dict[str, Any]
  ctx: Any = None


def select(cfg: Any, paths: Sequence[str]) -> dict[str, Any]:
  """{path: value} of the config at each dotted path (sections as plain dicts); a missing path names itself."""
  out = {}
  for path in paths:
    value = cfg
    for part in path.split("."):
      try:
        value = value[part]
      except (KeyError, AttributeError, TypeError):
        raise ValueError(f"stage config path {path!r}: no field {part!r} in the config") from None
    out[path] = value.to_dict() if hasattr(value, "to_dict") else value
  return out


def run(stage: Stage, cfg: Any, workdir: str | pathlib.Path, name: str, inputs: dict[str, str | pathlib.Path],
        params: dict[str, Any] | None = None, ctx: Any = None, force: bool = False) -> pathlib.Path:
  """Runs (or skips, or resumes) instance `name` of `stage`; returns its completed directory."""
  if sorted(inputs) != sorted(stage.input_roles(cfg)):
    raise ValueError(f"stage {name!r} ({stage.kind}): inputs {sorted(inputs)} given, "
                     f"{sorted(stage.input_roles(cfg))} declared")
  params = dict(params or {})
  stage_config = {"config": select(cfg, stage.config_paths(cfg)), "params": params}
  paths = {role: pathlib.Path(p) for role, p in inputs.items()}
  final = run_stage(workdir, name, stage_config, paths,
                    lambda out: stage.fn(Job(cfg, out, paths, params, ctx)), force=force, code=stage.code)
  if jax.process_index() == 0:  # after the commit: a crash before it still finds what it needs to resume
    for rel in stage.cleanup:
      shutil.rmtree(final / rel, ignore_errors=True)
  return final


def config_hash(stage_config: Any) -> str:
  """A stable hash of a JSON-able value (a ConfigDict section, dict, list, scalar)."""
  if hasattr(stage_config, "to_dict"):
    stage_config = stage_config.to_dict()
  blob = json.dumps(stage_config, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def _module_file(module: str) -> pathlib.Path | None:
  spec = importlib.util.find_spec(module)  # finds the file without importing the module itself
  return pathlib.Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


# The bookkeeping itself: it decides what runs, not what a stage computes, so it is not part of any stage's code.
NOT_STAGE_CODE = frozenset({"subl_jax.study.stages"})


def _package_imports(module: str, source: str) -> set[str]:
  """The modules of `module`'s own top-level package that its source imports (anywhere in the file, deferred imports included)."""
  found = set()
  is_pkg = _module_file(module).name == "__init__.py"
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        parent = module.split(".") if is_pkg else module.split(".")[:-1]
        base = ".".join(parent[:len(parent) - node.level + 1] + ([base] if base else []))
      # `from pkg import mod` runs pkg.mod; `from pkg import name` runs pkg (its __init__)
      names = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names]
    else:
      continue
    top = module.split(".")[0]  # followed within the module's own package: third-party code is pinned elsewhere
    found.update(n for n in names if n.split(".")[0] == top and n not in NOT_STAGE_CODE and _is_module(n))
  return found


def _is_module(name: str) -> bool:
  try:
    return _module_file(name) is not None
  except ModuleNotFoundError:  # a parent is not a package
    return False


@functools.lru_cache(maxsize=None)
def code_hash(modules: tuple[str, ...]) -> str:
  """sha256 over the source of `modules` and every module of their package they import, transitively ('' for none).
  Cached per process: the code does not change under a running study."""
  if not modules:
    return ""
  seen: dict[str, bytes] = {}
  todo = list(modules)
  while todo:
    module = todo.pop()
    if module in seen:
      continue
    path = _module_file(module)
    if path is None:
      raise ValueError(f"stage code {module!r}: not a module of this installation")
    seen[module] = path.read_bytes()
    todo.extend(_package_imports(module, seen[module].decode("utf-8")))
  digest = hashlib.sha256()
  for module in sorted(seen):
    digest.update(module.encode() + b"\0" + hashlib.sha256(seen[module]).digest())
  return digest.hexdigest()[:16]


def fingerprint(path: str | pathlib.Path) -> str:
  """An input's fingerprint: a completed stage's (changes whenever its config, code or any upstream stage changes),
  or a file's sha256 (its content, not its path)."""
  path = pathlib.Path(path)
  if path.is_file():
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
  manifest = path / MANIFEST
  try:
    return json.loads(manifest.read_text())["fingerprint"]
  except (OSError, KeyError, json.JSONDecodeError) as e:
    raise ValueError(f"{manifest}: not a completed stage ({e})") from None


def is_complete(stage_dir: str | pathlib.Path) -> bool:
  return (pathlib.Path(stage_dir) / MANIFEST).is_file()


def run_stage(workdir: str | pathlib.Path, name: str, stage_config: Any,
              inputs: dict[str, str | pathlib.Path], fn: Callable[[pathlib.Path], dict | None],
              force: bool = False, code: Sequence[str] = ()) -> pathlib.Path:
  """Runs `fn(partial_dir)` unless `<workdir>/<name>` is complete with this fingerprint (see the module docstring).

  `inputs` maps a role to an upstream stage directory or a file. `fn` writes its artifacts into the directory it is
  given and may return a JSON-able summary, stored in the manifest. Returns the completed stage directory. An
  exception in `fn` commits nothing and gets a note naming the stage.
  """
  workdir = pathlib.Path(workdir)
  final, partial = workdir / name, workdir / f"{name}.partial"
  claim = {"stage": name, "config_hash": config_hash(stage_config), "code": code_hash(tuple(code)),
           "inputs": {role: fingerprint(path) for role, path in sorted(inputs.items())}}
  claim["fingerprint"] = hashlib.sha256(json.dumps(claim, sort_keys=True).encode()).hexdigest()[:16]
  if not force and is_complete(final) and fingerprint(final) == claim["fingerprint"]:
    return final
  if _ONLY_CACHED.get():
    raise NotCached(name)
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
  try:
    summary = fn(partial)
  except Exception as e:
    e.add_note(f"stage {name!r}: nothing committed; {partial} is kept for a resume")
    raise
  _barrier(f"{name}:done")
  if lead:
    manifest = dict(claim, config=_jsonable(stage_config), summary=summary, wall_s=round(time.time() - t0, 3),
                    versions={"subl_jax": _version(), "jax": jax.__version__}, finished=time.strftime("%FT%T%z"))
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str, allow_nan=False) + "\n")
    (partial / CLAIM).unlink()
    if final.exists():
      shutil.rmtree(final)
    partial.rename(final)
  _barrier(f"{name}:committed")  # the others wait until the stage is there to read
  return final


def _barrier(tag: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(tag)


def _version() -> str:
  try:
    return importlib.metadata.version("subl-jax")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def read_manifest(stage_dir: str | pathlib.Path) -> dict:
  return json.loads((pathlib.Path(stage_dir) / MANIFEST).read_text())


def _jsonable(value: Any) -> Any:
  return value.to_dict() if hasattr(value, "to_dict") else value
