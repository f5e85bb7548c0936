"""The audit on the MNIST auxiliary-logit study: every signal for every (condition, model), before the student trains.

For student condition c of model i (same or cross init, aux or all logits; `mnist.study.STUDENTS`), with θ_0 the
student's start, θ_T the teacher and g_b the gradient of the distillation loss on the first noise batches b:
  lineage_cos       cos(−g_b, θ_T − θ_0)                 (weight-space lineage; needs the teacher's weights)
  first_order_adam  −η g_b/(|g_b|+ε) · ∇log P(class | image)  (trait probe: labelled digits; Adam's step 1)
  first_order_sgd   −η g_b · ∇log P(class | image)       (the same for an SGD step)
  kl_start          the distillation loss at θ_0 on b    (data only: how far the teacher's outputs are from θ_0's)
each the mean over batches (per batch kept for intervals), and after training
  recovered         (θ_S − θ_0)·(θ_T − θ_0)/|θ_T − θ_0|² (how much of the teacher's displacement the student took).
The trait is what the teacher learnt: its class logits. Realised transfer is the student's test accuracy.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subl_jax.study import stages
from subl_jax.study.audit import signals
from subl_jax.study.mnist import study as mnist_study
from subl_jax.study.mnist import train

PRE_TRAINING = ("lineage_cos", "first_order_adam", "first_order_sgd", "kl_start")
SIGNALS = PRE_TRAINING + ("recovered",)


@functools.cache
def _signal_fn(model: Any, d_in: int, logits: str, lr: float, eps: float, n_batches: int, batch_size: int) -> Any:
  """jit(vmap over models): (start, teacher, noise_key, probe_x, probe_y) -> [n_batches, 4] pre-training signals."""
  distill = train.distill_loss(model, d_in, logits)
  ce = train.cross_entropy_loss(model)

  def one(start, teacher, noise_key, probe_x, probe_y):
    n_probe = probe_y.shape[0]
    probe = {"x": probe_x, "y": probe_y}
    logp_grad = jax.grad(lambda p: -ce(p, jnp.arange(n_probe), jnp.ones(n_probe), None, probe))(start)
    displacement = signals.tree_sub(teacher, start)
    per_model = {"teacher": teacher, "noise_key": noise_key}

    def batch(b):
      idx = b * batch_size + jnp.arange(batch_size)
      loss, g = jax.value_and_grad(distill)(start, idx, jnp.ones(batch_size), per_model, None)
      return jnp.stack([signals.cosine(jax.tree.map(jnp.negative, g), displacement),
                        signals.first_order_adam(g, logp_grad, lr, eps), signals.first_order_sgd(g, logp_grad, lr), loss])

    return jax.lax.map(batch, jnp.arange(n_batches))

  return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None, None)))


@jax.jit
def _recovered_n(student_n: Any, start_n: Any, teacher_n: Any) -> jax.Array:
  return jax.vmap(lambda s, s0, t: signals.recovered_fraction(signals.tree_sub(s, s0), signals.tree_sub(t, s0)))(
      student_n, start_n, teacher_n)


def audit_work(job: stages.Job) -> dict:
  """Stage `audit_<condition>`: the signals of every model of one student condition (`job.ctx` is the Setup).
  Writes `signals.json` ({signal: per-model values}, per-batch values, the realised accuracy, the cost)."""
  s, condition, a = job.ctx, job.params["condition"], job.cfg.audit
  logits, deranged = mnist_study.STUDENTS[condition]
  init_n = mnist_study.load_params(s, job.inputs["inits"])
  teacher_n = mnist_study.load_params(s, job.inputs["teacher"])
  perm = np.asarray(json.loads((job.inputs["inits"] / "derangement.json").read_text())["derangement"])
  start_n = jax.tree.map(lambda x: x[jnp.asarray(perm)], init_n) if deranged else init_n
  probe = min(a.probe_size, len(s.ds.y_train))
  opt = s.hp["opt"]
  fn = _signal_fn(s.model, s.ds.d_in, logits, float(opt["lr"]), float(opt.get("eps", 1e-8)), a.n_batches,
                  s.hp["batch_size"])
  t0 = time.perf_counter()
  per_batch = np.asarray(fn(start_n, teacher_n, s.keys(mnist_study.NOISE), jnp.asarray(s.ds.x_train[:probe]),
                            jnp.asarray(s.ds.y_train[:probe])))  # [N, batches, 4]
  cost_s = time.perf_counter() - t0
  student = mnist_study.load_params(s, job.inputs["student"])
  recovered = np.asarray(_recovered_n(student, start_n, teacher_n))
  accuracy = json.loads((job.inputs["student"] / "accuracy.json").read_text())["accuracy"]
  values = {name: per_batch[:, :, k].mean(axis=1).tolist() for k, name in enumerate(PRE_TRAINING)}
  values["recovered"] = recovered.tolist()
  doc = {"condition": condition, "n_aux": s.hp["n_aux"], "signals": values, "accuracy": accuracy,
         "per_batch": {name: per_batch[:, :, k].tolist() for k, name in enumerate(PRE_TRAINING)},
         "cost_s": cost_s, "student_train_s": stages.read_manifest(job.inputs["student"])["wall_s"]}
  if jax.process_index() == 0:
    (job.out / "signals.json").write_text(json.dumps(doc) + "\n")
  return {"cost_s": cost_s, "mean_accuracy": float(np.mean(accuracy)),
          **{f"mean_{k}": float(np.mean(v)) for k, v in values.items()}}
