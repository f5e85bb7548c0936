"""Training and evaluating N models at once: `jax.vmap` over stacked parameters, the model axis sharded.

Every per-model array (parameters, optimizer state, keys, teachers) has a leading `models` axis, split over all mesh
devices by `parallel.RULES` (replicated when N does not divide); datasets are replicated. One jitted call trains
all N models for an epoch, each with its own shuffled order (`training.batching`), with no host sync per step.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from subl_jax.core import parallel
from subl_jax.study.mnist import data as data_lib
from subl_jax.study.mnist.model import AuxMLP, aux_logits, class_logits, predict_n
from subl_jax.core.training import mitigations
from subl_jax.core.training.batching import epoch_batches
from subl_jax.core.training.loop import Hook, run_loop

# loss(params, idx_b, w_b, per_model, shared) -> scalar for one model; per_model is that model's slice.
LossFn = Callable[[Any, jax.Array, jax.Array, Any, Any], jax.Array]


def model_shardings(mesh: Mesh, tree: Any) -> Any:
  """Shardings splitting each leaf's leading axis as `models` and replicating the rest."""
  return jax.tree.map(lambda a: parallel.named_sharding(mesh, ("models",) + (None,) * (a.ndim - 1), a.shape), tree)


def shard_models(mesh: Mesh, tree: Any, copy: bool = False) -> Any:
  """`tree` placed in model shardings; `copy` guarantees fresh buffers (the caller's survive a donation)."""
  placed = jax.device_put(tree, model_shardings(mesh, tree))
  # A copy computed on device: device_put (even with may_alias=False) can reuse the source buffer for one shard.
  return _copy(placed) if copy else placed


_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def replicate(mesh: Mesh, tree: Any) -> Any:
  return jax.device_put(tree, parallel.replicated(mesh))


def _constrain_models(mesh: Mesh, tree: Any) -> Any:
  return jax.tree.map(jax.lax.with_sharding_constraint, tree, model_shardings(mesh, tree))


# The builders below are cached so that equal settings share one jitted function, hence one compile: the four
# student conditions of a study compile twice, not four times (XLA's CPU compile of each RNG call takes ~1 s).

@functools.cache
def cross_entropy_loss(model: AuxMLP) -> LossFn:
  """The teacher's loss: cross-entropy on the class logits of training images `shared["x"][idx]`."""
  def loss(params, idx_b, w_b, per_model, shared):
    logits = class_logits(model, model.apply({"params": params}, shared["x"][idx_b]))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, shared["y"][idx_b])
    return jnp.sum(w_b * ce) / jnp.sum(w_b)
  return loss


@functools.cache
def distill_loss(model: AuxMLP, d_in: int, logits: str) -> LossFn:
  """KL(teacher || student) of the softmax over 'aux' or 'all' logits, on the model's fixed noise images.

  `per_model` holds that model's `teacher` parameters and `noise_key`.
  """
  select = {"aux": lambda z: aux_logits(model, z), "all": lambda z: z}[logits]

  def loss(params, idx_b, w_b, per_model, shared):
    x = data_lib.noise_images(per_model["noise_key"], idx_b, d_in)
    log_pt = jax.nn.log_softmax(select(jax.lax.stop_gradient(model.apply({"params": per_model["teacher"]}, x))))
    log_ps = jax.nn.log_softmax(select(model.apply({"params": params}, x)))
    kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
    return jnp.sum(w_b * kl) / jnp.sum(w_b)
  return loss


@functools.cache
def _epoch_fn(loss_fn: LossFn, tx: optax.GradientTransformation, n_examples: int, batch_size: int,
              mesh: Mesh, trait_loss: LossFn | None = None, project: str = "gradient") -> Callable:
  """jit(vmap(one epoch of one model)): (params_n, opt_state_n, keys_n, per_model, shared, epoch) -> new state.
  With `trait_loss` (a loss over all of `shared`'s examples) each step is projected off the direction d that lowers
  it (raises the trait): `project` 'gradient', the gradient whenever the step would raise the trait
  (`mitigations.project_off`); 'update', the optimizer's update whatever its sign (`mitigations.project_update_off`)."""
  def model_epoch(params, opt_state, key, pm, sh, epoch):
    idx_sb, w_sb = epoch_batches(key, epoch, n_examples, batch_size)

    def step(carry, batch):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, *batch, pm, sh)
      if trait_loss is not None:
        n = sh["y"].shape[0]
        up = jax.tree.map(jnp.negative, jax.grad(trait_loss)(params, jnp.arange(n), jnp.ones(n), pm, sh))
      if trait_loss is not None and project == "gradient":
        grads = mitigations.project_off(grads, up)[0]
      updates, opt_state = tx.update(grads, opt_state, params)
      if trait_loss is not None and project == "update":
        updates = mitigations.project_update_off(updates, up)[0]
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (idx_sb, w_sb))
    return params, opt_state, losses.mean()

  def all_models(params_n, opt_state_n, keys_n, per_model, shared, epoch):
    out = jax.vmap(model_epoch, in_axes=(0, 0, 0, 0, None, None))(params_n, opt_state_n, keys_n, per_model,
                                                                   shared, epoch)
    return _constrain_models(mesh, out)

  return jax.jit(all_models, donate_argnums=(0, 1))


def train_n(loss_fn: LossFn, params_n: Any, keys_n: jax.Array, *, tx: optax.GradientTransformation,
            n_examples: int, batch_size: int, epochs: int, mesh: Mesh, per_model: Any = None, shared: Any = None,
            hooks: Sequence[Hook] = (), trait_loss: LossFn | None = None,
            project: str = "gradient") -> tuple[Any, np.ndarray]:
  """Trains N models for `epochs` epochs; model i shuffles with `keys_n[i]`. Returns (params_n, last losses [N]).

  `per_model` (leading axis N) and `shared` (replicated) are passed to `loss_fn`; `trait_loss` (over every example of
  `shared`) turns on projection, of what `project` names (see `_epoch_fn`). A loop step is one epoch (one
  jitted call) with metrics `{"loss": mean loss per model [N]}`; `hooks` (`core.training.loop`) see each. The
  caller's `params_n` are left intact.
  """
  params_n = shard_models(mesh, params_n, copy=True)  # the epoch function donates its state
  opt_state_n = shard_models(mesh, jax.vmap(tx.init)(params_n))
  keys_n, per_model = shard_models(mesh, keys_n), shard_models(mesh, per_model or {})
  shared = replicate(mesh, shared or {})
  epoch_fn = _epoch_fn(loss_fn, tx, n_examples, batch_size, mesh, trait_loss, project)
  n = jax.tree.leaves(params_n)[0].shape[0]

  def epoch(e: int, state: tuple) -> tuple[tuple, dict]:
    params, opt_state, loss_n = epoch_fn(*state, keys_n, per_model, shared, e)
    return (params, opt_state), {"loss": loss_n}

  done = run_loop((params_n, opt_state_n), 0, epochs, epoch, hooks)
  loss_n = np.asarray(done.metrics["loss"]) if done.metrics else np.full((n,), np.nan, np.float32)
  return done.state[0], loss_n


@functools.cache
def _correct_fn(model: AuxMLP, mesh: Mesh) -> Callable:
  return jax.jit(lambda p, xb, yb: _constrain_models(mesh, jnp.sum(predict_n(model, p, xb) == yb[None], axis=1)))


def accuracy_n(model: AuxMLP, params_n: Any, x: np.ndarray, y: np.ndarray, mesh: Mesh,
               chunk: int = 2048) -> np.ndarray:
  """Test accuracy of each of the N models (argmax of the class logits): float64 [N]."""
  params_n = shard_models(mesh, params_n)
  count = _correct_fn(model, mesh)
  correct = np.zeros((jax.tree.leaves(params_n)[0].shape[0],), np.int64)
  for start in range(0, len(y), chunk):  # bounds the [N, chunk, hidden] activations on big test sets
    xb, yb = replicate(mesh, (x[start:start + chunk], y[start:start + chunk]))
    correct += np.asarray(count(params_n, xb, yb))
  return correct / len(y)
