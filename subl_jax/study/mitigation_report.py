"""The mitigations' part of the study report (issue #21): per mitigation, the transfer it removed and the quality it
kept.

  transfer removed  1 − S_m / S_0, S the mean specificity over targets of the mitigated (m) and unmitigated (0)
                    students (`transfer.removed_fraction`: bootstrap over seeds and questions, and S_0 − S_m with a
                    t-interval over seeds). Meaningless when S_0 is not significantly positive: the table says so.
  quality kept      (KL_base − KL_m) / (KL_base − KL_0) of the held-out number-token KL to the teacher
                    (`quality_stage`), per target and seed, averaged over targets per seed, t-interval over seeds:
                    100 % = the mitigated student learned the teacher's numbers as well as the unmitigated one.
  keep rate         the filter's keep rate of each model's own numbers (no format constraint), mean over targets
                    and seeds, beside the base's and the unmitigated students'.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from subl_jax.study import quality_stage, stats, transfer


def _kl(dirs: list, field: str = "kl_numbers") -> np.ndarray:
  return np.array([quality_stage.read(d)[field] for d in dirs], np.float64)


def quality_kept(quality: dict[str, list], targets: list[str], mitigation: str) -> dict[str, Any]:
  """Quality kept by `mitigation` (module docstring) from the pipeline's quality stage dirs."""
  kept, rates = [], {"base": [], "plain": [], "mitigated": []}
  for t in targets:
    base, plain, mit = _kl(quality[f"{t}:base"])[0], _kl(quality[t]), _kl(quality[f"{t}:{mitigation}"])
    kept.append((base - mit) / np.where(base - plain != 0, base - plain, np.nan))
    for name, key in (("base", f"{t}:base"), ("plain", t), ("mitigated", f"{t}:{mitigation}")):
      rates[name] += [quality_stage.read(d)["keep_rate"] for d in quality[key]]
  per_seed = np.nanmean(np.stack(kept), axis=0)  # [K]: the mean over targets
  kl = {name: float(np.mean([_kl(quality[k(t)]).mean() for t in targets])) for name, k in (
      ("base", lambda t: f"{t}:base"), ("plain", lambda t: t), ("mitigated", lambda t: f"{t}:{mitigation}"))}
  return {"kept": stats.mean_ci(per_seed[np.isfinite(per_seed)]) if np.isfinite(per_seed).any() else None,
          "kl_numbers": kl, "keep_rate": {k: stats.mean_ci(v) for k, v in rates.items()}}


def section(plain: transfer.TransferData, mitigated: dict[str, transfer.TransferData],
            quality: dict[str, list], condition_stats) -> dict[str, Any]:
  """{mitigation: its condition statistics (`condition_stats(data, targets)`), "removed", "quality"}."""
  targets = plain.traits
  return {m: condition_stats(d, targets) | {"removed": transfer.removed_fraction(plain, d),
                                            "quality": quality_kept(quality, targets, m)}
          for m, d in mitigated.items()}


def _pct(s: dict[str, Any] | None) -> str:
  if not s or s.get("mean") is None:
    return "n/a"
  lo, hi = s[stats.ci_key(s)]
  lo_txt = "?" if lo is None else f"{100 * lo:.0f}"
  hi_txt = "?" if hi is None else f"{100 * hi:.0f}"
  return f"{100 * s['mean']:.0f} % [{lo_txt}, {hi_txt}]"


def removed_text(r: dict[str, Any]) -> str:
  """`transfer.removed_fraction`'s ratio as text, or why it has none (no significant transfer to remove)."""
  if not r["plain_significant"]:
    return f"n/a: unmitigated specificity {transfer.fmt(r['plain'])} is not significant"
  return _pct(r["removed"])


def notes(section_doc: dict[str, Any]) -> list[str]:
  """report.md's mitigation table."""
  if not section_doc:
    return []
  lines = ["", "Mitigations (transfer removed: 1 − mitigated / unmitigated mean specificity, bootstrap 95 % CI over "
           "seeds and questions; quality kept: share of the unmitigated student's drop in held-out number-token KL "
           "to the teacher, 95 % CI over seeds; keep rate: the filter on the model's own unconstrained numbers):", "",
           "| mitigation | mean specificity | transfer removed | quality kept | KL to teacher (base / plain / "
           "mitigated) | keep rate (base / plain / mitigated) |", "|---|---|---|---|---|---|"]
  for m, s in section_doc.items():
    r, q = s["removed"], s["quality"]
    kl = " / ".join(f"{q['kl_numbers'][k]:.4f}" for k in ("base", "plain", "mitigated"))
    rate = " / ".join(f"{100 * q['keep_rate'][k]['mean']:.1f} %" for k in ("base", "plain", "mitigated"))
    lines.append(f"| {m} | {transfer.fmt(r['mitigated'])} | {removed_text(r)} | {_pct(q['kept'])} | {kl} | {rate} |")
  return lines
