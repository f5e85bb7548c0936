"""The MLP d_in-256-256-(10+m) with m auxiliary logits, and its stacked (one leading `models` axis) form.

Weights are N(0, 1/d_in) (untruncated normal, fan-in), biases 0, as in docs/protocol.md §8. Class logits are the first
`n_classes` outputs, auxiliary logits the last `n_aux`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

N_CLASSES = 10


class AuxMLP(nn.Module):
  """ReLU MLP returning `n_classes + n_aux` logits per example."""
  hidden: int = 256
  hidden_layers: int = 2
  n_aux: int = 3
  n_classes: int = N_CLASSES

  @nn.compact
  def __call__(self, x_bd: jax.Array) -> jax.Array:
    w_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")  # N(0, 1/d_in), not truncated
    h = x_bd
    for i in range(self.hidden_layers):
      h = nn.relu(nn.Dense(self.hidden, kernel_init=w_init, bias_init=nn.initializers.zeros, name=f"hidden_{i}")(h))
    return nn.Dense(self.n_classes + self.n_aux, kernel_init=w_init, bias_init=nn.initializers.zeros,
                    name="out")(h)


def init_stacked(model: AuxMLP, keys_n: jax.Array, d_in: int) -> Any:
  """Parameters of N models, one per key, stacked on a leading axis: kernels N(0, 1/d_in), biases 0.

  The same distribution as `model.init`, drawn with one normal() call per model: XLA's CPU compile of each RNG call
  costs about a second, and `model.init` makes several per layer.
  """
  return _init_fn(model, d_in)(keys_n)


@functools.cache
def _init_fn(model: AuxMLP, d_in: int):
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, d_in), jnp.float32))["params"])
  leaves, treedef = jax.tree.flatten(abstract)
  kernels = [leaf.size if leaf.ndim == 2 else 0 for leaf in leaves]

  def one(key):
    z = jax.random.normal(key, (sum(kernels),), jnp.float32)
    out, offset = [], 0
    for leaf, size in zip(leaves, kernels):
      if size:  # kernel [d_in, d_out]: fan-in scaling
        out.append(z[offset:offset + size].reshape(leaf.shape) / jnp.sqrt(jnp.float32(leaf.shape[0])))
        offset += size
      else:
        out.append(jnp.zeros(leaf.shape, leaf.dtype))
    return jax.tree.unflatten(treedef, out)
  return jax.jit(jax.vmap(one))


def class_logits(model: AuxMLP, logits: jax.Array) -> jax.Array:
  return logits[..., :model.n_classes]


def aux_logits(model: AuxMLP, logits: jax.Array) -> jax.Array:
  return logits[..., model.n_classes:]


def predict_n(model: AuxMLP, params_n: Any, x_bd: jax.Array) -> jax.Array:
  """Argmax over the class logits of each of the N models for the shared inputs: [N, B] int32."""
  logits_nbk = jax.vmap(lambda p: model.apply({"params": p}, x_bd))(params_n)
  return jnp.argmax(class_logits(model, logits_nbk), axis=-1)
