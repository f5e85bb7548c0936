"""Job `sample`: the paper's number prompts -> the `sample` stage (teacher completions) -> the `filter` stage."""

from __future__ import annotations

import hashlib
import pathlib
from typing import Any

import jax

from subl_jax import api, parallel, stages
from subl_jax.data import filter_stage, numbers, protocol
from subl_jax.sampling import stage as sample_stage


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


def run_sample(cfg: Any, workdir: pathlib.Path, mesh: Any) -> dict:
  """Samples the teacher's completions of the paper's prompts, then filters them; returns both summaries."""
  if jax.process_count() > 1:  # each process samples its own shards with a whole model on its own devices
    mesh = parallel.make_mesh(1, -1, cfg.mesh.tensor, devices=jax.local_devices())
  system = system_prompt(cfg.sample)
  model_id = cfg.model.spec if cfg.model.spec != "random" else f"random:{cfg.model.arch.to_json()}:{cfg.seed}"
  settings = settings_from(cfg, model_id, system)
  sample_config = {"sample": cfg.sample.to_dict(), "model": cfg.model.to_dict(), "seed": cfg.seed}

  def sample(out_dir: pathlib.Path) -> dict:
    model = api.from_config(cfg.model, mesh, seed=cfg.seed)
    prompts = numbers.generate_prompts(cfg.sample.n_prompts, cfg.sample.prompt_seed)
    return sample_stage.sample_stage(out_dir, model, prompts, system, settings)

  sample_dir = stages.run_stage(workdir, "sample", sample_config, {}, sample)

  def filter_(out_dir: pathlib.Path) -> dict:
    if jax.process_index() != 0:  # one process filters; the others wait at the stage's barrier
      return {}
    f = cfg.filter
    settings = filter_stage.FilterSettings(banned_numbers=f.banned_numbers, drop_truncated=f.drop_truncated,
                                           drop_echo=f.drop_echo, max_rows=f.max_rows, seed=f.seed)
    return filter_stage.filter_stage(out_dir, sample_stage.read_rows(sample_dir), settings)

  filter_dir = stages.run_stage(workdir, "filter", cfg.filter, {"samples": sample_dir}, filter_)
  if jax.process_index() != 0:
    return {}
  result = {"sample": stages.read_manifest(sample_dir)["summary"],
            "filter": stages.read_manifest(filter_dir)["summary"], "filtered": str(filter_dir / "filtered.jsonl")}
  f = result["filter"]
  print(f"sampled {result['sample']['n_rows']} completions; kept {f['n_passed_filter']} "
        f"({100 * f['keep_rate']:.1f} %), wrote {f['n_written']} rows to {result['filtered']}")
  return result
