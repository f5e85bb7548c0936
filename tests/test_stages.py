"""Stage caching, invalidation and resume."""

import json

import pytest

from subl_jax import stages


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
