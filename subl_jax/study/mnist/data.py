"""Datasets for the MLP study, as flat float32 images in [-1, 1] and int32 labels, and the fixed noise images.

- `digits`: scikit-learn's bundled 8×8 digits (1,797 images, no download), split once with a fixed seed into
  1,257 train / 540 test (the split never depends on the config seed, so every run shares one test set).
- `mnist`: 28×28 MNIST (60,000 / 10,000) through tensorflow-datasets (the `tfds` extra), imported only when asked.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

DATASETS = ("mnist", "digits")
DIGITS_TEST, DIGITS_SPLIT_SEED = 540, 0


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  x_train: np.ndarray  # [n_train, d_in] float32 in [-1, 1]
  y_train: np.ndarray  # [n_train] int32
  x_test: np.ndarray
  y_test: np.ndarray

  @property
  def d_in(self) -> int:
    return self.x_train.shape[1]


class DatasetUnavailable(RuntimeError):
  """The dataset's package or files are missing; the message names the offline alternative."""


def load(name: str, data_dir: str = "") -> Dataset:
  """Loads `name` ('digits' or 'mnist'); `data_dir` is where tensorflow-datasets looks ('' = its default)."""
  if name == "digits":
    return _digits()
  if name == "mnist":
    return _mnist(data_dir)
  raise ValueError(f"dataset {name!r}: expected one of {DATASETS}")


def _digits() -> Dataset:
  from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
  d = load_digits()
  x = (d.data.astype(np.float32) / 8.0 - 1.0)  # pixel values 0..16 -> [-1, 1]
  y = d.target.astype(np.int32)
  order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(y))
  test, train = order[:DIGITS_TEST], order[DIGITS_TEST:]
  return Dataset("digits", x[train], y[train], x[test], y[test])


def _mnist(data_dir: str) -> Dataset:
  offline = ("Offline, run the same study on scikit-learn's bundled 8x8 digits with `--config.mnist.dataset=digits` "
             "(or `--config=configs/mnist_aux.py:digits`).")
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise DatasetUnavailable(f"dataset 'mnist' needs tensorflow-datasets (`pip install -e '.[tfds]'`), which is not "
                             f"installed ({e}). {offline}") from None
  try:
    (x_tr, y_tr), (x_te, y_te) = tfds.as_numpy(tfds.load(
        "mnist", split=["train", "test"], batch_size=-1, as_supervised=True, data_dir=data_dir or None))
  except Exception as e:  # tfds raises many types for no network / missing files
    raise DatasetUnavailable(f"dataset 'mnist': tensorflow-datasets could not download or find the data "
                             f"(data_dir={data_dir or 'default'}): {type(e).__name__}: {e}. {offline}") from None
  flat = lambda x: (x.reshape(len(x), -1).astype(np.float32) / 127.5 - 1.0)  # uint8 0..255 -> [-1, 1]
  return Dataset("mnist", flat(x_tr), y_tr.astype(np.int32), flat(x_te), y_te.astype(np.int32))


def noise_images(key: jax.Array, idx_b: jax.Array, d_in: int) -> jax.Array:
  """Noise image i of a model is uniform in [-1, 1] from fold_in(key, i): a fixed set, never stored."""
  one = lambda i: jax.random.uniform(jax.random.fold_in(key, i), (d_in,), jnp.float32, -1.0, 1.0)
  return jax.vmap(one)(idx_b)
