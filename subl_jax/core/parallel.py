"""The device mesh `(data, fsdp, tensor)`, one logical-axis rule table, and shardings derived from shapes.

Every parameter and main activation carries logical axis names; `RULES` maps them to mesh axes. A logical axis whose
size is not divisible by its mesh axes is replicated instead (e.g. SmolLM2's 9 heads on tensor=2) — jit's explicit
shardings require even splits, and a replicated small axis costs little.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes. Names not listed (length, head_dim, layers, norm, act_embed ...) are replicated.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("models", ("data", "fsdp", "tensor")),  # independent models (MLP study): split over every device
)


def resolve_mesh_shape(shape: Sequence[int], n_devices: int) -> tuple[int, ...]:
  """Fills in the one -1 of `shape` so the product equals `n_devices`; errors name `mesh.<axis>`."""
  shape = [int(s) for s in shape]
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh: expected {len(MESH_AXES)} sizes {MESH_AXES}, got {shape}")
  for name, s in zip(MESH_AXES, shape):
    if s == 0 or s < -1:
      raise ValueError(f"mesh.{name}={s}: expected a positive size or -1")
  sizes = ", ".join(f"mesh.{name}={s}" for name, s in zip(MESH_AXES, shape))
  if shape.count(-1) > 1:
    raise ValueError(f"{sizes}: at most one of {MESH_AXES} may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n_devices % known:
      raise ValueError(f"{sizes}: the fixed sizes (product {known}) do not divide the {n_devices} available devices, "
                       f"so mesh.{MESH_AXES[shape.index(-1)]}=-1 cannot be filled")
    shape[shape.index(-1)] = n_devices // known
  elif known != n_devices:
    raise ValueError(f"{sizes}: product {known} != {n_devices} available devices; "
                     "set one size to -1 to use all devices")
  return tuple(shape)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A `(data, fsdp, tensor)` mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape((data, fsdp, tensor), len(devices))
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


def maybe_initialize_distributed(enabled: bool) -> None:
  """Multi-process start-up: `jax.distributed.initialize()`, before anything touches the XLA backend.

  TPU pods and SLURM are auto-detected by JAX; elsewhere (several processes on one machine, `launch/multiprocess.sh`)
  JAX_COORDINATOR_ADDRESS, SUBL_JAX_NUM_PROCESSES and SUBL_JAX_PROCESS_ID say who is who. On CPU the processes'
  collectives run over gloo."""
  if not enabled or jax.distributed.is_initialized():  # is_initialized does not start a backend
    return
  kwargs = {}
  if "SUBL_JAX_NUM_PROCESSES" in os.environ:
    kwargs = dict(num_processes=int(os.environ["SUBL_JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["SUBL_JAX_PROCESS_ID"]))
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)


def _mesh_axes_for(name: str | None) -> tuple[str, ...]:
  for logical, mesh_axes in RULES:
    if logical == name:
      if mesh_axes is None:
        return ()
      return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
  return ()


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
  """PartitionSpec for an array with logical axis `names`, replicating axes that don't split evenly."""
  if len(names) != len(shape):
    raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    axes = tuple(a for a in _mesh_axes_for(name) if a not in used and mesh.shape[a] > 1)
    # Drop mesh axes (innermost first) until the dimension divides evenly.
    while axes and size % math.prod(mesh.shape[a] for a in axes):
      axes = axes[:-1]
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def named_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, shape, mesh))


def tree_shardings(logical_tree: Any, shape_tree: Any, mesh: Mesh) -> Any:
  """Maps a pytree of logical-name tuples and a matching pytree of shaped arrays to NamedShardings."""
  is_names = lambda x: isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)
  return jax.tree.map(lambda names, a: named_sharding(mesh, names, a.shape), logical_tree, shape_tree,
                      is_leaf=is_names)


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Mesh | None) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op without a mesh."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, x.shape))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
