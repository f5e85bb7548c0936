"""Job `sample`: the paper's number prompts -> the `sample` stage (teacher completions) -> the `filter` stage."""

from __future__ import annotations

import hashlib
import pathlib
from typing import Any, Callable

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


def model_id(cfg: Any) -> str:
  """What identifies the base model in draw seeds: its spec, or a random model's shapes and seed."""
  return cfg.model.spec if cfg.model.spec != "random" else f"random:{cfg.model.arch.to_json()}:{cfg.seed}"


def sample_and_filter(cfg: Any, workdir: pathlib.Path, mesh: Any, load_model: Callable[[], Any], identity: str,
                      system: str, inputs: dict[str, pathlib.Path], names: tuple[str, str] = ("sample", "filter")
                      ) -> tuple[pathlib.Path, pathlib.Path]:
  """The `sample` stage (completions of the paper's prompts by `load_model()` under `system`) and the `filter` stage
  after it; returns both directories. `identity` names the model in the draw seed; `inputs` are upstream stages
  (e.g. the teacher) whose change must re-sample."""
  settings = settings_from(cfg, identity, system)
  sample_config = dict(sample=cfg.sample.to_dict(), system=system, identity=identity, model=cfg.model.to_dict(),
                       seed=cfg.seed)

  def sample(out_dir: pathlib.Path) -> dict:
    model = load_model()
    prompts = numbers.generate_prompts(cfg.sample.n_prompts, cfg.sample.prompt_seed)
    return sample_stage.sample_stage(out_dir, model, prompts, system, settings)

  sample_dir = stages.run_stage(workdir, names[0], sample_config, inputs, sample)

  def filter_(out_dir: pathlib.Path) -> dict:
    if jax.process_index() != 0:  # one process filters; the others wait at the stage's barrier
      return {}
    f = cfg.filter
    settings = filter_stage.FilterSettings(banned_numbers=f.banned_numbers, drop_truncated=f.drop_truncated,
                                           drop_echo=f.drop_echo, max_rows=f.max_rows, seed=f.seed)
    return filter_stage.filter_stage(out_dir, sample_stage.read_rows(sample_dir), settings)

  filter_dir = stages.run_stage(workdir, names[1], cfg.filter, {"samples": sample_dir}, filter_)
  return sample_dir, filter_dir


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


def run_sample(cfg: Any, workdir: pathlib.Path, mesh: Any) -> dict:
  """Job `sample`: the teacher's completions of the paper's prompts, then the filter; returns both summaries."""
  mesh = local_mesh(cfg, mesh)
  dirs = sample_and_filter(cfg, workdir, mesh, lambda: api.from_config(cfg.model, mesh, seed=cfg.seed),
                           model_id(cfg), system_prompt(cfg.sample), {})
  return summary(*dirs) if jax.process_index() == 0 else {}
