"""Stage caching, invalidation and resume."""

import json

import pytest

from subl_jax.study import stages


def _writer(calls, text="x", fail=False):
  def fn(out):
    calls.append(out.name)
    (out / "data.txt").write_text(text)
    if fail:
      raise RuntimeError("killed")
    return {"rows": 1}
  return fn


def test_completed_stage_is_skipped_and_changed_config_reruns(tmp_path):
  calls = []
  a = stages.run_stage(tmp_path, "a", {"n": 1}, {}, _writer(calls))
  assert (a / "data.txt").read_text() == "x" and calls == ["a.partial"]
  assert stages.read_manifest(a)["summary"] == {"rows": 1}
  stages.run_stage(tmp_path, "a", {"n": 1}, {}, _writer(calls))
  assert len(calls) == 1  # cached
  stages.run_stage(tmp_path, "a", {"n": 2}, {}, _writer(calls, "y"))
  assert len(calls) == 2 and (a / "data.txt").read_text() == "y"


def test_upstream_change_reruns_downstream_only_when_needed(tmp_path):
  calls = []
  a = stages.run_stage(tmp_path, "a", {"n": 1}, {}, _writer(calls))
  stages.run_stage(tmp_path, "b", {"m": 1}, {"src": a}, _writer(calls))
  stages.run_stage(tmp_path, "b", {"m": 1}, {"src": a}, _writer(calls))
  assert calls == ["a.partial", "b.partial"]
  a = stages.run_stage(tmp_path, "a", {"n": 5}, {}, _writer(calls))
  stages.run_stage(tmp_path, "b", {"m": 1}, {"src": a}, _writer(calls))
  assert calls == ["a.partial", "b.partial", "a.partial", "b.partial"]


def test_crash_leaves_previous_output_intact_and_partial_resumes(tmp_path):
  calls = []
  a = stages.run_stage(tmp_path, "a", {"n": 1}, {}, _writer(calls, "old"))
  with pytest.raises(RuntimeError):
    stages.run_stage(tmp_path, "a", {"n": 2}, {}, _writer(calls, "new", fail=True))
  assert (a / "data.txt").read_text() == "old"  # the completed stage is untouched
  partial = tmp_path / "a.partial"
  assert (partial / "data.txt").read_text() == "new"

  seen = []
  def resume(out):
    seen.append((out / "data.txt").read_text())  # the same config finds its partial work
    return None
  stages.run_stage(tmp_path, "a", {"n": 2}, {}, resume)
  assert seen == ["new"] and not partial.exists()
  assert json.loads((a / "manifest.json").read_text())["config"] == {"n": 2}


def test_partial_from_another_config_is_wiped(tmp_path):
  with pytest.raises(RuntimeError):
    stages.run_stage(tmp_path, "a", {"n": 1}, {}, _writer([], "stale", fail=True))
  seen = []
  stages.run_stage(tmp_path, "a", {"n": 2}, {}, lambda out: seen.append(sorted(p.name for p in out.iterdir())))
  assert seen == [["claim.json"]]


def test_missing_input_stage_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="not a completed stage"):
    stages.run_stage(tmp_path, "b", {}, {"src": tmp_path / "nope"}, _writer([]))


def _package(root, files):
  for name, text in files.items():
    path = root / "fakepkg" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_changed_code_reruns_only_the_stages_that_run_it(tmp_path, monkeypatch):
  """The fingerprint covers the source of the declared modules and what they import from their package."""
  src = tmp_path / "src"
  _package(src, {"__init__.py": "", "a.py": "from fakepkg import b\n", "b.py": "X = 1\n", "c.py": "Y = 1\n"})
  monkeypatch.syspath_prepend(str(src))
  calls, work = [], tmp_path / "work"

  def run():
    stages.code_hash.cache_clear()  # the per-process cache assumes the code does not change under a study
    stages.run_stage(work, "s", {"n": 1}, {}, _writer(calls), code=("fakepkg.a",))

  run()
  run()
  assert len(calls) == 1
  (src / "fakepkg" / "c.py").write_text("Y = 2\n")  # not imported by a: no re-run
  run()
  assert len(calls) == 1
  (src / "fakepkg" / "b.py").write_text("X = 2\n")  # imported by a: re-runs
  run()
  assert len(calls) == 2


def test_file_input_is_fingerprinted_by_content_not_path(tmp_path):
  calls = []
  data = tmp_path / "d1.jsonl"
  data.write_text("row\n")
  stages.run_stage(tmp_path, "s", {}, {"data": data}, _writer(calls))
  moved = tmp_path / "elsewhere" / "d2.jsonl"
  moved.parent.mkdir()
  data.rename(moved)
  stages.run_stage(tmp_path, "s", {}, {"data": moved}, _writer(calls))
  assert len(calls) == 1
  moved.write_text("other row\n")
  stages.run_stage(tmp_path, "s", {}, {"data": moved}, _writer(calls))
  assert len(calls) == 2


def test_declared_stage_depends_on_its_config_paths_only(tmp_path):
  from subl_jax import config
  calls = []
  stage = stages.Stage("k", lambda job: calls.append(job.params) or {}, ("sample", "model.spec"))
  cfg = config.defaults()
  stages.run(stage, cfg, tmp_path, "x", {}, params={"i": 1})
  cfg.model.remat_policy = "none"  # not a declared path
  cfg.train.opt.lr = 1.0
  stages.run(stage, cfg, tmp_path, "x", {}, params={"i": 1})
  assert calls == [{"i": 1}]
  cfg.sample.n_prompts = 7
  stages.run(stage, cfg, tmp_path, "x", {}, params={"i": 1})
  stages.run(stage, cfg, tmp_path, "x", {}, params={"i": 2})  # an instance parameter is part of it too
  assert len(calls) == 3
  with pytest.raises(ValueError, match="inputs"):
    stages.run(stage, cfg, tmp_path, "x", {"extra": tmp_path})
  with pytest.raises(ValueError, match="nope"):
    stages.run(stages.Stage("k", lambda job: {}, ("sample.nope",)), cfg, tmp_path, "y", {})


def test_stage_table_code_closures_are_specific():
  """A fix to the filter re-runs the filter, not the sampling; evaluation code is not training code."""
  def closure(module):
    seen, todo = set(), [module]
    while todo:
      m = todo.pop()
      if m not in seen:
        seen.add(m)
        todo.extend(stages._package_imports(m, stages._module_file(m).read_text()))
    return seen
  assert closure("subl_jax.study.data.filter_stage") == {"subl_jax.study.data.filter_stage", "subl_jax.study.data.numbers",
                                                   "subl_jax.study.data.protocol", "subl_jax.study.data.shards"}
  evaluate = closure("subl_jax.study.evaluate_stage")
  assert "subl_jax.study.evaluation" in evaluate and "subl_jax.core.training.trainer" not in evaluate
  assert "subl_jax.study.stages" not in evaluate  # the bookkeeping is not stage code
  # No stage's code reaches the table itself (or the study that orders the stages): else an edit to any stage, the
  # report or a job would re-run them all.
  from subl_jax.study import stage_table
  kinds = [v for v in vars(stage_table).values() if isinstance(v, stages.Stage)]
  assert len(kinds) > 10
  for kind in kinds:
    for module in kind.code:
      reached = closure(module) & {"subl_jax.study.stage_table", "subl_jax.study.pipeline", "subl_jax.jobs"}
      assert not reached, (kind.kind, module, reached)
