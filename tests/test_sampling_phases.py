"""The sampling-phases benchmark's matmuls-only program runs every weight matrix of the model once per row (the
useful FLOPs of a decode step), and its medians treat an unreachable (null) figure as +inf."""

import pathlib
import sys

import jax
import numpy as np

from subl_jax.core.models import transformer as tfm
from subl_jax.core.models.config import ModelConfig

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import gemm_floor  # noqa: E402
import sampling_phases  # noqa: E402

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48,
                  tie_embeddings=True)


def test_matmuls_only_covers_every_weight_matrix_once_per_row():
  shapes, _ = tfm.abstract_params(CFG)
  params = jax.tree.map(lambda s: np.full(s.shape, 0.01, np.float32), shapes)
  rows = 5
  x = np.ones((rows, CFG.d_model), np.float32)
  once, per_iteration = gemm_floor.count_dots(
      jax.make_jaxpr(sampling_phases.matmuls_only)(x, params["layers"], params["embed"]))
  matrices = sum(v.size for path, v in jax.tree_util.tree_leaves_with_path(params)
                 if "norm" not in jax.tree_util.keystr(path))
  assert not per_iteration
  assert sum(n * gemm_floor.dot_flops(k) for k, n in once.items()) == 2 * rows * matrices
  out = sampling_phases.matmuls_only(x, params["layers"], params["embed"])
  assert out.shape == (rows, CFG.vocab_size) and np.isfinite(out).all()


def test_medians_per_batch_with_nulls_as_unreachable():
  def rnd(chain, needed):
    return {"chain_gflop_per_s": chain, "batches": {"64": {"needed": needed, "frac": {"decode": chain / 1000}}}}
  med = sampling_phases.medians([rnd(200.0, 2.0), rnd(300.0, None), rnd(250.0, None)])
  assert med["chain_gflop_per_s"] == 250.0
  assert med["batches"]["64"] == {"needed": None, "frac": {"decode": 0.25}}
  assert sampling_phases.medians([rnd(1.0, 2.0), rnd(1.0, None), rnd(1.0, 3.0)])["batches"]["64"]["needed"] == 3.0
