"""Entry point: `python -m subl_jax.main --config=configs/X.py[:arg] --workdir=DIR [--config.field=value ...]`."""

from __future__ import annotations

import json
import pathlib
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from subl_jax import config as config_lib
from subl_jax import api, parallel, sampling
from subl_jax.mnist.study import run_mnist_aux
from subl_jax.sampling.job import run_sample
from subl_jax.study import pipeline
from subl_jax.training import jobs as training_jobs

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: resolved config and every artifact go here.")
_STAGE = flags.DEFINE_string("stage", "", "Job 'study': run the stages up to this one and stop (teacher, sample, "
                             "filter, student, evaluate, report); '' runs them all.")
flags.mark_flags_as_required(["config", "workdir"])


def run_chat(cfg, workdir: pathlib.Path, mesh) -> dict:
  """Loads the model and answers one chat prompt (greedy by default)."""
  t0 = time.time()
  model = api.from_config(cfg.model, mesh, seed=cfg.seed)
  t_load = time.time() - t0
  messages = ([{"role": "system", "content": cfg.chat.system}] if cfg.chat.system else []) + [
      {"role": "user", "content": cfg.chat.prompt}]
  prompt = model.render_chat(messages)
  t0 = time.time()
  gen = sampling.generate(model, [model.tokenizer.encode(prompt)], cfg.chat.max_new_tokens,
                          temperature=cfg.chat.temperature, seed=cfg.seed)
  answer = model.tokenizer.decode(gen.tokens[0])
  result = dict(prompt=prompt, answer=answer, new_tokens=len(gen.tokens[0]), load_s=round(t_load, 2),
                generate_s=round(time.time() - t0, 2))
  print(f"{prompt}{answer}\n\n[{result['new_tokens']} tokens in {result['generate_s']} s; "
        f"model loaded in {result['load_s']} s]")
  return result


JOBS = {"chat": run_chat, "mnist_aux": run_mnist_aux, "train": training_jobs.run_train,
        "teacher": training_jobs.run_teacher, "student": training_jobs.run_student, "sample": run_sample,
        "study": lambda cfg, workdir, mesh: pipeline.run_study(cfg, workdir, mesh, stop=_STAGE.value)}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every read and write at INFO
  cfg = _CONFIG.value
  parallel.maybe_initialize_distributed(cfg.mesh.distributed)
  config_lib.validate(cfg)
  workdir = pathlib.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(cfg.to_json(indent=2) + "\n")
  mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  print(f"mesh {dict(mesh.shape)} over {mesh.size} device(s): {jax.devices()[0].platform}")
  result = JOBS[cfg.job](cfg, workdir, mesh)
  if jax.process_index() == 0:
    (workdir / f"{cfg.job}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
  app.run(main)
