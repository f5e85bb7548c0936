"""The auxiliary-logit study as resumable stages: inits -> teacher -> four students -> report.

Stages (each `<workdir>/<name>/` with Orbax `params/`, `accuracy.json` (per model), `train_log.json`, manifest):
  inits           N reference initialisations (the `reference` condition) and the cross-init derangement
  teacher         cross-entropy on the 10 class logits, from each model's reference init
  student_aux     from the SAME init, KL(teacher || student) on the softmax over the m auxiliary logits, on noise
  student_all     the same on all 10 + m logits
  cross_init_aux  like student_aux, but model i starts from the init of model derangement[i] (never its own)
  cross_init_all  like student_all from the deranged inits
All students of teacher i see the same noise images in the same order, so conditions are paired per teacher.

Randomness: everything comes from `cfg.seed`. Model i's init, data order and noise come from
fold_in(fold_in(key(seed), stream), i), so model i is the same model whatever N is; the derangement is numpy's
default_rng(seed).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from subl_jax.study import stages
from subl_jax.study.mnist import data as data_lib
from subl_jax.study.mnist import presets, train
from subl_jax.study.mnist.derangement import derangement
from subl_jax.study.mnist.model import AuxMLP, init_stacked
from subl_jax.core.training.batching import steps_per_epoch
from subl_jax.core.training.loop import Hook, Loop
from subl_jax.core.training.optim import make_optimizer

CONDITIONS = ("reference", "teacher", "student_aux", "cross_init_aux", "student_all", "cross_init_all")
STUDENTS = {"student_aux": ("aux", False), "cross_init_aux": ("aux", True),
            "student_all": ("all", False), "cross_init_all": ("all", True)}  # name -> (logits, deranged init)
INIT, TEACHER_ORDER, STUDENT_ORDER, NOISE = range(4)  # key streams


@dataclasses.dataclass(frozen=True)
class Setup:
  """What every stage needs: resolved hyper-parameters, the model, the dataset and the mesh."""
  hp: dict[str, Any]
  seed: int
  model: AuxMLP
  ds: data_lib.Dataset
  mesh: Mesh

  @property
  def n(self) -> int:
    return self.hp["n_models"]

  def keys(self, stream: int) -> jax.Array:
    """One key per model for `stream`, independent of N."""
    base = jax.random.fold_in(jax.random.key(self.seed), stream)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(self.n))


def make_setup(mnist_cfg: Any, seed: int, mesh: Mesh) -> Setup:
  """Resolves the dataset presets and loads the dataset."""
  hp = presets.resolve(mnist_cfg)
  model = AuxMLP(hidden=hp["hidden"], hidden_layers=hp["hidden_layers"], n_aux=hp["n_aux"])
  return Setup(hp, seed, model, data_lib.load(hp["dataset"], hp["data_dir"]), mesh)


def make_inits(s: Setup) -> Any:
  return init_stacked(s.model, s.keys(INIT), s.ds.d_in)


def train_teacher(s: Setup, init_n: Any, hooks: Sequence[Hook] = ()) -> Any:
  """Each teacher from its own reference init: cross-entropy on the class logits."""
  hp, n_train = s.hp, len(s.ds.y_train)
  tx = make_optimizer(hp["opt"], hp["teacher_epochs"] * steps_per_epoch(n_train, hp["batch_size"]))
  params, _ = train.train_n(train.cross_entropy_loss(s.model), init_n, s.keys(TEACHER_ORDER), tx=tx,
                            n_examples=n_train, batch_size=hp["batch_size"], epochs=hp["teacher_epochs"],
                            mesh=s.mesh, shared=dict(x=s.ds.x_train, y=s.ds.y_train), hooks=hooks)
  return params


def train_student(s: Setup, condition: str, init_n: Any, teacher_n: Any, perm: np.ndarray | None,
                  hooks: Sequence[Hook] = ()) -> Any:
  """Student `condition` of every teacher: distillation on the teacher's fixed noise images (see STUDENTS)."""
  logits, deranged = STUDENTS[condition]
  start = jax.tree.map(lambda a: a[jnp.asarray(perm)], init_n) if deranged else init_n
  hp = s.hp
  tx = make_optimizer(hp["opt"], hp["student_epochs"] * steps_per_epoch(hp["n_noise"], hp["batch_size"]))
  params, _ = train.train_n(train.distill_loss(s.model, s.ds.d_in, logits), start, s.keys(STUDENT_ORDER), tx=tx,
                            n_examples=hp["n_noise"], batch_size=hp["batch_size"], epochs=hp["student_epochs"],
                            mesh=s.mesh, per_model=dict(teacher=teacher_n, noise_key=s.keys(NOISE)), hooks=hooks)
  return params


def accuracy(s: Setup, params_n: Any) -> np.ndarray:
  return train.accuracy_n(s.model, params_n, s.ds.x_test, s.ds.y_test, s.mesh)


def _save_params(directory: pathlib.Path, params_n: Any) -> None:
  ckpt = ocp.StandardCheckpointer()
  ckpt.save((directory / "params").absolute(), params_n)
  ckpt.wait_until_finished()


def load_params(s: Setup, directory: pathlib.Path) -> Any:
  abstract = jax.eval_shape(lambda: make_inits(s))
  target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract,
                        train.model_shardings(s.mesh, abstract))
  return ocp.StandardCheckpointer().restore((directory / "params").absolute(), target)


def write_result(out: pathlib.Path, s: Setup, params_n: Any, losses: list[float]) -> dict:
  """Saves params, per-model accuracy and the loss log of a stage; returns the manifest summary."""
  _save_params(out, params_n)  # Orbax: every process writes its own shards
  acc = accuracy(s, params_n)
  if jax.process_index() == 0:
    (out / "accuracy.json").write_text(json.dumps({"accuracy": acc.tolist()}) + "\n")
    (out / "train_log.json").write_text(json.dumps({"epoch_mean_loss": losses}) + "\n")
  return {"mean_accuracy": float(acc.mean()), "n_models": len(acc)}


class EpochLog(Hook):
  """Prints each epoch's mean loss (over models) and appends it to `losses` (the stage's `train_log.json`)."""

  def __init__(self, name: str, losses: list[float]):
    self.name, self.losses = name, losses

  def on_step(self, loop: Loop, step: int, metrics: dict) -> None:
    loop.fetch()  # one sync per epoch: the epochs are long, and the line shows the run is alive

  def on_metrics(self, loop: Loop, rows: list[tuple[int, dict]]) -> None:
    for step, m in rows:
      self.losses.append(float(np.mean(m["loss"])))
      print(f"  {self.name} epoch {step}/{loop.total}: mean loss {self.losses[-1]:.4g}", flush=True)


def inits_work(job: stages.Job) -> dict:
  """Stage `inits`: the reference initialisations and the cross-init derangement (`job.ctx` is the Setup)."""
  s = job.ctx
  if jax.process_index() == 0:
    (job.out / "derangement.json").write_text(json.dumps({"derangement": derangement(s.n, s.seed).tolist()}) + "\n")
  return write_result(job.out, s, make_inits(s), [])


def teacher_work(job: stages.Job) -> dict:
  """Stage `teacher`: each teacher from its reference init."""
  s, losses = job.ctx, []
  params = train_teacher(s, load_params(s, job.inputs["inits"]), [EpochLog("teacher", losses)])
  return write_result(job.out, s, params, losses)


def student_work(job: stages.Job) -> dict:
  """Stage `<condition>`: the students of `job.params["condition"]` (see STUDENTS)."""
  s, name, losses = job.ctx, job.params["condition"], []
  perm = np.asarray(json.loads((job.inputs["inits"] / "derangement.json").read_text())["derangement"])
  params = train_student(s, name, load_params(s, job.inputs["inits"]), load_params(s, job.inputs["teacher"]), perm,
                         [EpochLog(name, losses)])
  return write_result(job.out, s, params, losses)
