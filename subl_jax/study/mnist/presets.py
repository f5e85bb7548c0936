"""Per-dataset hyper-parameters: a `mnist` config field left at 0 takes its dataset's value from `PRESETS`.

`mnist` is the paper's recipe (docs/protocol.md §8). `digits` needs its own: its 1,257 training images make the paper's
batch 1024 × 5 epochs about 6 teacher steps. Why each digits value was chosen is in configs/mnist_aux.py.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "mnist": dict(lr=3e-4, batch_size=1024, teacher_epochs=5, student_epochs=5, n_noise=60_000),
    "digits": dict(lr=1e-3, batch_size=64, teacher_epochs=5, student_epochs=2, n_noise=25_000),
}
AUTO_FIELDS = ("batch_size", "teacher_epochs", "student_epochs", "n_noise")


def resolve(mnist_cfg: Any) -> dict[str, Any]:
  """The `mnist` config section as a plain dict with every 0 ("dataset default") replaced by its preset."""
  hp = mnist_cfg.to_dict() if hasattr(mnist_cfg, "to_dict") else dict(mnist_cfg)
  hp["opt"] = dict(hp["opt"])
  preset = PRESETS[hp["dataset"]]
  for field in AUTO_FIELDS:
    if hp[field] == 0:
      hp[field] = preset[field]
  if hp["opt"]["lr"] == 0:
    hp["opt"]["lr"] = preset["lr"]
  return hp
