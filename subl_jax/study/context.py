"""What a study's stage functions share at run time (not part of any fingerprint): the mesh and model loaders."""

from __future__ import annotations

import pathlib

import ml_collections as mlc
from jax.sharding import Mesh

from subl_jax.core import api
from subl_jax.core.training import export

# The model fields that change a model's outputs: what sampling and evaluation depend on (`remat_policy` only
# changes how training recomputes activations).
MODEL_OUTPUTS = ("model.spec", "model.dtype", "model.param_dtype", "model.tokenizer", "model.arch", "seed")


class Context:
  """Loads models when a stage needs them: the base once, trained stages from their directories.

  `sample_mesh` is where sampling and evaluation run: with several processes, each holds a whole model on its own
  devices (see `sampling.job.local_mesh`) and samples its own shards. `base` is a base model already loaded on `mesh` (tests, notebooks)."""

  def __init__(self, cfg: mlc.ConfigDict, mesh: Mesh, sample_mesh: Mesh | None = None, progress: bool = True,
               base: api.Model | None = None):
    self.cfg, self.mesh, self.progress = cfg, mesh, progress
    self.sample_mesh = sample_mesh or mesh
    self._base: dict[int, api.Model] = {} if base is None else {id(mesh): base}

  def base(self, mesh: Mesh | None = None) -> api.Model:
    """The base model of `cfg.model` (a 'random' base is rebuilt from `cfg.seed`); never modified by training."""
    mesh = mesh or self.mesh
    if id(mesh) not in self._base:
      self._base[id(mesh)] = api.from_config(self.cfg.model, mesh, seed=self.cfg.seed)
    return self._base[id(mesh)]

  def model_of(self, stage_dir: str | pathlib.Path, mesh: Mesh | None = None) -> api.Model:
    """The model of a teacher or student stage: its trained `model/`, or the base for a system-prompt teacher."""
    info = export.read_info(stage_dir)
    if info["model"] != export.MODEL_DIR:
      return self.base(mesh)
    m = self.cfg.model
    return api.load(export.model_spec(stage_dir), mesh or self.mesh, dtype=m.dtype, param_dtype=m.param_dtype,
                    remat_policy=m.remat_policy)


def system_of(stage_dir: str | pathlib.Path) -> str:
  """The system prompt a teacher stage's model answers under ('' = the chat template's default)."""
  return export.read_info(stage_dir)["system"]
