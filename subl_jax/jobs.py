"""The jobs `python -m subl_jax.main` runs (`cfg.job`), and `run`, which runs one in a workdir.

Kept apart from `main` so that code and tests can run a job without defining main's absl flags."""

from __future__ import annotations

import json
import pathlib
import time

import jax

from subl_jax.core import api, parallel, sampling
from subl_jax.study import pipeline
from subl_jax.study import train_jobs as training_jobs
from subl_jax.study.audit import job as audit_job
from subl_jax.study.mnist.job import run_mnist_aux


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
        "teacher": training_jobs.run_teacher, "student": training_jobs.run_student, "sample": training_jobs.run_sample,
        "study": pipeline.run_study,
        "audit": audit_job.run_audit}


def run(cfg, workdir: pathlib.Path, stage: str = "") -> None:
  """The job of a validated config in a locked workdir; `stage`: job 'study' stops after this stage."""
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(cfg.to_json(indent=2) + "\n")
  mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  print(f"mesh {dict(mesh.shape)} over {mesh.size} device(s): {jax.devices()[0].platform}")
  result = JOBS[cfg.job](cfg, workdir, mesh, **({"stop": stage} if cfg.job == "study" else {}))
  if jax.process_index() == 0:  # not `<job>.json`: a job's own report may have that name (the audit's audit.json)
    (workdir / f"{cfg.job}.summary.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
