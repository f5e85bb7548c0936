"""Job `sample`: the paper's number prompts -> the `sample` stage (teacher completions) -> the `filter` stage."""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

import jax

from subl_jax.core import parallel
from subl_jax.study import stages
from subl_jax.study.data import filter_stage, numbers, protocol
from subl_jax.study import sample_shards as sample_stage
from subl_jax.study import context


def system_prompt(sample_cfg: Any) -> str:
  """The teacher's system prompt: the paper's template for `target`, else `system_prompt` as given."""
  if sample_cfg.target:
    return protocol.teacher_system_prompt(sample_cfg.target, sample_cfg.category)
  return sample_cfg.system_prompt


def draw_seed(seed: int, model_spec: str, system: str) -> int:
  """The generation seed: the config seed mixed with the teacher's identity, so that two teachers sampled with the
  same `sample.seed` (e.g. owl teacher and control) still make independent draws."""
  digest = hashlib.sha256(f"{seed}\0{model_spec}\0{system}".encode()).digest()
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def settings_from(cfg: Any, model_spec: str, system: str) -> sample_stage.SampleSettings:
  s = cfg.sample
  return sample_stage.SampleSettings(
      max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
      batch_size=s.batch_size, shard_size=s.shard_size, constrained=s.constrained,
      seed=draw_seed(s.seed, model_spec, system))


def model_id(cfg: Any) -> str:
  """What identifies the base model in draw seeds: its spec, or a random model's shapes and seed (keys sorted: a
  config rebuilt from its dict, e.g. `pipeline.target_config`'s, lists them in another order)."""
  if cfg.model.spec != "random":
    return cfg.model.spec
  return f"random:{json.dumps(cfg.model.arch.to_dict(), sort_keys=True)}:{cfg.seed}"


def sample_work(job: stages.Job) -> dict:
  """The `sample` stage: completions of the paper's prompts by the teacher stage `job.inputs["teacher"]`'s model,
  under its system prompt. `job.params["identity"]` names the teacher in the draw seed (two teachers sampled with
  the same `sample.seed` still make independent draws)."""
  cfg, ctx = job.cfg, job.ctx
  teacher = job.inputs["teacher"]
  system = context.system_of(teacher)
  settings = settings_from(cfg, job.params["identity"], system)
  model = ctx.model_of(teacher, ctx.sample_mesh)
  prompts = numbers.generate_prompts(cfg.sample.n_prompts, cfg.sample.prompt_seed)
  return sample_stage.sample_stage(job.out, model, prompts, system, settings, progress=ctx.progress)


def local_mesh(cfg: Any, mesh: Any) -> Any:
  """With several processes, each samples its own shards with a whole model on its own devices."""
  if jax.process_count() > 1:
    return parallel.make_mesh(1, -1, cfg.mesh.tensor, devices=jax.local_devices())
  return mesh


def summary(sample_dir: pathlib.Path, filter_dir: pathlib.Path) -> dict:
  result = {"sample": stages.read_manifest(sample_dir)["summary"],
            "filter": stages.read_manifest(filter_dir)["summary"], "filtered": str(filter_dir / filter_stage.FILTERED)}
  f = result["filter"]
  print(f"{sample_dir.name}: sampled {result['sample']['n_rows']} completions; kept {f['n_passed_filter']} "
        f"({100 * f['keep_rate']:.1f} %), wrote {f['n_written']} rows to {result['filtered']}")
  return result
