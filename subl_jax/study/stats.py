"""Confidence intervals for study results: t-distribution intervals of a mean, of a paired difference and of the
difference of two independent means (Welch).

A summary is `{"mean": m, "ci95": [lo, hi], "n": n}` (the interval key is `ci<percent>`, e.g. `ci90` for level 0.9;
`ci_key(summary)` finds it). With n = 1 there is no spread to estimate (the t-distribution has 0 degrees of freedom),
so the interval is degenerate: `[mean, mean]`; read `n` before reading the interval.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.special import stdtrit  # the t quantile; scipy.stats takes ~1 s to import


def ci_name(level: float) -> str:
  """The summary key of an interval at `level`: 0.95 -> 'ci95', 0.9 -> 'ci90', 0.995 -> 'ci99.5'."""
  return f"ci{100 * level:g}"


def ci_key(summary: dict[str, Any]) -> str:
  """The interval key of a summary made by `mean_ci`."""
  keys = [k for k in summary if k.startswith("ci")]
  if len(keys) != 1:
    raise ValueError(f"expected one 'ci<level>' key in {sorted(summary)}")
  return keys[0]


def mean_ci(values: Sequence[float] | np.ndarray, level: float = 0.95) -> dict[str, Any]:
  """Mean of `values` with a two-sided t-interval at `level`: mean ± t_{(1+level)/2, n-1} · s / sqrt(n)."""
  if not 0 < level < 1:
    raise ValueError(f"level={level}: expected a value in (0, 1)")
  x = np.asarray(values, dtype=np.float64).ravel()
  if x.size == 0:
    raise ValueError("mean_ci: no values")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"mean_ci: non-finite values in {x.tolist()[:8]}...")
  mean = float(x.mean())
  if x.size == 1:
    lo = hi = mean  # degenerate: no spread is estimable from one value
  else:
    half = float(stdtrit(x.size - 1, (1 + level) / 2) * x.std(ddof=1) / np.sqrt(x.size))
    lo, hi = mean - half, mean + half
  return {"mean": mean, ci_name(level): [lo, hi], "n": int(x.size)}


def paired_diff_ci(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                   level: float = 0.95) -> dict[str, Any]:
  """Mean of the paired differences a_i - b_i with its t-interval (pairs: the same teacher, seed or question)."""
  a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
  if a.shape != b.shape:
    raise ValueError(f"paired_diff_ci: {a.size} vs {b.size} values; pairs need equal lengths")
  return mean_ci(a - b, level)


def _sd(summary: dict[str, Any]) -> float:
  """The sample standard deviation behind a `mean_ci` summary, recovered from its interval's half-width."""
  key, n = ci_key(summary), summary["n"]
  if n < 2:
    raise ValueError(f"a summary of n={n} value(s) has no spread to compare; expected n >= 2")
  level = float(key[2:]) / 100
  lo, hi = summary[key]
  return (hi - lo) / 2 * np.sqrt(n) / float(stdtrit(n - 1, (1 + level) / 2))


def welch_diff_ci(a: dict[str, Any], b: dict[str, Any], level: float = 0.95) -> dict[str, Any]:
  """mean(a) - mean(b) of two independent samples, given as `mean_ci` summaries, with the Welch t-interval at `level`.

  Works from the summaries alone (the standard deviations are recovered from the intervals), so results stored without
  their values can still be compared. `df` is the Welch-Satterthwaite degrees of freedom.
  """
  va, vb = _sd(a) ** 2 / a["n"], _sd(b) ** 2 / b["n"]
  diff, se = a["mean"] - b["mean"], float(np.sqrt(va + vb))
  if se == 0:
    return {"mean": diff, ci_name(level): [diff, diff], "df": None}
  df = (va + vb) ** 2 / (va ** 2 / (a["n"] - 1) + vb ** 2 / (b["n"] - 1))
  half = float(stdtrit(df, (1 + level) / 2)) * se
  return {"mean": diff, ci_name(level): [diff - half, diff + half], "df": float(df)}
