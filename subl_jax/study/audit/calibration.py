"""How well a signal predicts realised transfer: rank correlation and AUROC over conditions, with bootstrap CIs."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def ranks(x: Sequence[float]) -> np.ndarray:
  """Average ranks (1-based; ties share the mean of their ranks)."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="mergesort")
  r = np.empty(len(x))
  r[order] = np.arange(1, len(x) + 1)
  for v in np.unique(x):
    tie = x == v
    r[tie] = r[tie].mean()
  return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman's ρ: the Pearson correlation of the average ranks; nan when either side is constant."""
  rx, ry = ranks(x), ranks(y)
  if rx.std() == 0 or ry.std() == 0:
    return float("nan")
  return float(np.corrcoef(rx, ry)[0, 1])


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
  """P(score of a positive > score of a negative) + ½ P(tie) (Mann–Whitney U / n₊n₋); nan without both classes."""
  s, y = np.asarray(scores, np.float64), np.asarray(labels, bool)
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  r = ranks(s)
  return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _bootstrap(fn, arrays: Sequence[np.ndarray], n_boot: int, seed: int, level: float) -> list[float] | None:
  rng = np.random.default_rng(seed)
  n = len(arrays[0])
  vals = []
  for _ in range(n_boot):
    idx = rng.integers(0, n, n)
    v = fn(*(a[idx] for a in arrays))
    if np.isfinite(v):
      vals.append(v)
  if len(vals) < n_boot // 2:  # most resamples lacked a class or variation: no interval
    return None
  a = (1 - level) / 2
  return [float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))]


def spearman_ci(x: Sequence[float], y: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
                level: float = 0.95) -> dict[str, Any]:
  """Spearman's ρ of x and y with its percentile bootstrap interval over the pairs."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return {"n": int(len(x)), "spearman": spearman(x, y), "spearman_ci": _bootstrap(spearman, (x, y), n_boot, seed, level)}


def calibrate(scores: Sequence[float], realised: Sequence[float], transfers: Sequence[bool], *,
              n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
  """A signal's `scores` against the `realised` transfer of the same conditions, and against the yes/no
  `transfers` labels: Spearman ρ and AUROC, each with a percentile bootstrap interval over conditions."""
  s, r, y = (np.asarray(v) for v in (scores, realised, transfers))
  if not len(s) == len(r) == len(y):
    raise ValueError(f"calibrate: {len(s)} scores, {len(r)} realised values and {len(y)} labels: expected one each")
  return {"n": int(len(s)), "n_transfer": int(y.astype(bool).sum()),
          "spearman": spearman(s, r), "spearman_ci": _bootstrap(spearman, (s, r), n_boot, seed, level),
          "auroc": auroc(s, y), "auroc_ci": _bootstrap(auroc, (s, y.astype(bool)), n_boot, seed, level)}


def finite(x: Any) -> Any:
  """A JSON-able tree with NaN (an undefined correlation: a constant side, one class only) as None."""
  if isinstance(x, dict):
    return {k: finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [finite(v) for v in x]
  if isinstance(x, (float, np.floating)):
    return float(x) if np.isfinite(x) else None
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, np.integer):
    return int(x)
  return x
