"""Mitigations of the auxiliary-logit transfer (issue #21): same-init students distilled on the auxiliary logits with
one mitigation each (`mnist.mitigations`), and what each removes and keeps.

  project         every step's gradient loses its component along the trait direction d = ∇ log P(class | image)
                  (the teacher's task, on `audit.probe_size` labelled training images: the MNIST audit's probe) when
                  the step would raise the trait (`mitigations.project_off`)
  project_update  the optimizer's update loses its component along d, whatever its sign
                  (`mitigations.project_update_off`)
  mask            the noise images where KL(teacher ‖ student's init) on the auxiliary softmax exceeds
                  `mitigation.mask_threshold` nats are left out of the loss: an image is the MLP's "position"
  kl_base         the loss plus `mitigation.kl_weight` · KL(init ‖ student) over all 10 + m logits on the same images
  shuffle_within  each image's teacher auxiliary distribution with its m entries permuted (a fixed permutation
                  per image): the values kept, their order lost
  shuffle_across  image i is paired with the teacher's outputs on another image of the set (i + n/2 + 1 mod n): the
                  pooled outputs kept, which image produced them lost
The cross-init student (`cross_init_aux` of the study) is the fifth: a student from another model's init.

Transfer removed: 1 − mean(acc_m − 0.1) / mean(acc_aux − 0.1) over the models (realised transfer is test accuracy
above chance), percentile bootstrap over models (paired: model i of both). Quality kept: (KL_init − KL_m) /
(KL_init − KL_aux) of the mean KL(teacher ‖ student) on the auxiliary softmax, on held-out noise (a key stream the
students never saw) and on the real test images, same bootstrap.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subl_jax.study import stages, stats
from subl_jax.study.mnist import data as data_lib
from subl_jax.study.mnist.model import AuxMLP, aux_logits
from subl_jax.study.mnist import study as mnist_study
from subl_jax.study.mnist import train
from subl_jax.core.training.batching import steps_per_epoch
from subl_jax.core.training.optim import make_optimizer

CHANCE = 0.1
HELDOUT_NOISE, HELDOUT_IMAGES = 5, 2048  # a key stream past the study's (see `mnist_study` INIT..NOISE)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The `mitigation` section's values an MNIST mitigation reads (hashable: the loss is cached on it)."""
  kind: str
  mask_threshold: float = 0.5
  kl_weight: float = 1.0
  n_noise: int = 0


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


@functools.cache
def loss_fn(model: AuxMLP, d_in: int, s: Settings) -> train.LossFn:
  """The auxiliary-logit distillation loss with mitigation `s.kind` (module docstring); `per_model` holds the
  model's `teacher`, `init` and `noise_key`. The projections act on the step: their loss is the plain one."""
  aux = lambda p, x: jax.nn.log_softmax(aux_logits(model, model.apply({"params": p}, x)))

  def loss(params, idx_b, w_b, pm, shared):
    x = data_lib.noise_images(pm["noise_key"], idx_b, d_in)
    x_teacher = data_lib.noise_images(pm["noise_key"], (idx_b + s.n_noise // 2 + 1) % s.n_noise, d_in) \
        if s.kind == "shuffle_across" else x
    log_pt = jax.lax.stop_gradient(aux(pm["teacher"], x_teacher))
    if s.kind == "shuffle_within":  # a fixed permutation of the m entries per image
      perm = jax.vmap(lambda i: jax.random.permutation(jax.random.fold_in(pm["noise_key"], -1 - i),
                                                       log_pt.shape[-1]))(idx_b)
      log_pt = jnp.take_along_axis(log_pt, perm, axis=-1)
    w = w_b
    if s.kind == "mask":
      w = w_b * (_kl(log_pt, jax.lax.stop_gradient(aux(pm["init"], x))) <= s.mask_threshold)
    per = _kl(log_pt, aux(params, x))
    total = jnp.sum(w * per) / jnp.maximum(jnp.sum(w), 1.0)
    if s.kind == "kl_base":
      log_base = jax.lax.stop_gradient(jax.nn.log_softmax(model.apply({"params": pm["init"]}, x)))
      total += s.kl_weight * jnp.sum(w_b * _kl(log_base, jax.nn.log_softmax(model.apply({"params": params}, x)))) \
          / jnp.sum(w_b)
    return total

  return loss


def settings(cfg: Any, kind: str, n_noise: int) -> Settings:
  m = cfg.mitigation
  return Settings(kind, float(m.mask_threshold), float(m.kl_weight), int(n_noise))


def train_mitigated(s: mnist_study.Setup, cfg: Any, kind: str, init_n: Any, teacher_n: Any, hooks=()) -> Any:
  """The same-init auxiliary-logit students of every teacher, with mitigation `kind`."""
  hp = s.hp
  tx = make_optimizer(hp["opt"], hp["student_epochs"] * steps_per_epoch(hp["n_noise"], hp["batch_size"]))
  trait = None
  shared = None
  if kind in ("project", "project_update"):
    probe = min(cfg.audit.probe_size, len(s.ds.y_train))
    trait = train.cross_entropy_loss(s.model)  # the trait's loss: lowering it raises log P(class | image)
    shared = dict(x=s.ds.x_train[:probe], y=s.ds.y_train[:probe])  # the probe: every example of `shared`
  params, _ = train.train_n(loss_fn(s.model, s.ds.d_in, settings(cfg, kind, hp["n_noise"])), init_n,
                            s.keys(mnist_study.STUDENT_ORDER), tx=tx, n_examples=hp["n_noise"],
                            batch_size=hp["batch_size"], epochs=hp["student_epochs"], mesh=s.mesh,
                            per_model=dict(teacher=teacher_n, init=init_n, noise_key=s.keys(mnist_study.NOISE)),
                            shared=shared, hooks=hooks, trait_loss=trait,
                            project="update" if kind == "project_update" else "gradient")
  return params


def mitigated_work(job: stages.Job) -> dict:
  """Stage `student_aux_<kind>` (`job.params["mitigation"]`; `job.ctx` is the Setup)."""
  s, kind, losses = job.ctx, job.params["mitigation"], []
  params = train_mitigated(s, job.cfg, kind, mnist_study.load_params(s, job.inputs["inits"]),
                           mnist_study.load_params(s, job.inputs["teacher"]),
                           [mnist_study.EpochLog(f"student_aux_{kind}", losses)])
  out = mnist_study.write_result(job.out, s, params, losses)
  if kind == "mask":
    out["masked_fraction"] = float(np.mean(masked_fraction(s, job.cfg, params_of(s, job.inputs))))
    if jax.process_index() == 0:
      (job.out / "mask.json").write_text(json.dumps(out) + "\n")
  return out


def params_of(s: mnist_study.Setup, inputs: dict) -> tuple[Any, Any]:
  return mnist_study.load_params(s, inputs["inits"]), mnist_study.load_params(s, inputs["teacher"])


def masked_fraction(s: mnist_study.Setup, cfg: Any, init_teacher: tuple[Any, Any], n: int = 4096) -> np.ndarray:
  """Per model, the share of its first `n` noise images that masking leaves out."""
  init_n, teacher_n = init_teacher
  thr = float(cfg.mitigation.mask_threshold)
  aux = lambda p, x: jax.nn.log_softmax(aux_logits(s.model, s.model.apply({"params": p}, x)))

  @jax.jit
  def frac(init, teacher, key):
    x = data_lib.noise_images(key, jnp.arange(n), s.ds.d_in)
    return jnp.mean(_kl(aux(teacher, x), aux(init, x)) > thr)

  return np.asarray(jax.vmap(frac)(init_n, teacher_n, s.keys(mnist_study.NOISE)))


@functools.cache
def _quality_fn(model: AuxMLP, d_in: int):
  aux = lambda p, x: jax.nn.log_softmax(aux_logits(model, model.apply({"params": p}, x)))

  def one(student, teacher, key, x_test):
    noise = data_lib.noise_images(key, jnp.arange(HELDOUT_IMAGES), d_in)
    return (jnp.mean(_kl(aux(teacher, noise), aux(student, noise))),
            jnp.mean(_kl(aux(teacher, x_test), aux(student, x_test))))

  return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None)))


def quality(s: mnist_study.Setup, student_n: Any, teacher_n: Any) -> dict[str, np.ndarray]:
  """Per model: mean KL(teacher ‖ student) on the auxiliary softmax over held-out noise and over the test images."""
  noise, test = _quality_fn(s.model, s.ds.d_in)(student_n, teacher_n, s.keys(HELDOUT_NOISE), jnp.asarray(s.ds.x_test))
  return {"kl_noise": np.asarray(noise, np.float64), "kl_test": np.asarray(test, np.float64)}


def _ratio_boot(num: np.ndarray, den: np.ndarray, n_boot: int = 2000, seed: int = 0,
                level: float = 0.95) -> dict[str, Any]:
  """mean(num) / mean(den) with a percentile bootstrap over the paired models."""
  rng = np.random.Generator(np.random.PCG64(seed))
  idx = rng.integers(0, len(num), (n_boot, len(num)))
  b_num, b_den = num[idx].mean(axis=1), den[idx].mean(axis=1)
  ok = b_den != 0
  draws = b_num[ok] / b_den[ok]
  lo, hi = np.percentile(draws, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
  return {"mean": float(num.mean() / den.mean()), stats.ci_name(level): [float(lo), float(hi)], "n": len(num)}


def table(acc: dict[str, np.ndarray], kl: dict[str, dict[str, np.ndarray]], rows: list[str]) -> dict[str, Any]:
  """Per mitigated condition (student_aux_<kind>, cross_init_aux): accuracy, transfer removed, quality kept on
  held-out noise and on test images; against `student_aux` (unmitigated) and `reference` (the untrained inits)."""
  plain = acc["student_aux"] - CHANCE
  out = {}
  for c in rows:
    removed = _ratio_boot(plain - (acc[c] - CHANCE), plain)
    kept = {where: _ratio_boot(kl["reference"][where] - kl[c][where], kl["reference"][where] - kl["student_aux"][where])
            for where in ("kl_noise", "kl_test")}
    out[c] = {"accuracy": stats.mean_ci(acc[c]), "removed": removed, "kept_noise": kept["kl_noise"],
              "kept_test": kept["kl_test"], "kl_noise": float(kl[c]["kl_noise"].mean()),
              "kl_test": float(kl[c]["kl_test"].mean())}
  return out


def notes(doc: dict[str, Any], kl: dict[str, dict[str, np.ndarray]]) -> list[str]:
  pct = lambda s: f"{100 * s['mean']:.0f} % [{100 * s['ci95'][0]:.0f}, {100 * s['ci95'][1]:.0f}]"
  lines = ["", "Mitigations of the same-init auxiliary-logit student (transfer removed: 1 − (acc − 0.1) / (acc of "
           "student_aux − 0.1); quality kept: share of student_aux's drop in KL(teacher ‖ student) on the auxiliary "
           "softmax, from the untrained init's; 95 % bootstrap CIs over the models):", "",
           "| student | accuracy | transfer removed | quality kept: held-out noise | quality kept: test images |",
           "|---|---|---|---|---|"]
  for c, r in doc.items():
    lines.append(f"| {c} | {r['accuracy']['mean']:.3f} | {pct(r['removed'])} | {pct(r['kept_noise'])} | "
                 f"{pct(r['kept_test'])} |")
  lines.append("KL(teacher ‖ student) on held-out noise / test images: " + "; ".join(
      f"{c} {v['kl_noise'].mean():.4f} / {v['kl_test'].mean():.4f}" for c, v in kl.items()))
  return lines
