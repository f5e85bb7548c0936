"""Study reports: `<workdir>/report.json`, a markdown table `report.md` and a bar chart `report.png`.

Each file is written to a temporary file beside it and moved into place (`os.replace`), so a failure or a kill midway
leaves the previous report as it was, never a truncated one.

`conditions` takes one of two shapes, and report.json keeps the one it is given:
  one metric:      {"teacher": {"mean": m, "ci95": [lo, hi], "n": n}, ...}            (the MNIST study)
  several metrics: {"teacher": {"accuracy": {"mean", "ci95", "n"}, "logprob": {...}}, ...}  (e.g. the LLM study)
Summaries are what `stats.mean_ci` returns. A condition is a single-metric summary when it has a "mean" key.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import secrets
from typing import Any, Iterator

from subl_jax.study.stats import ci_key

Summary = dict[str, Any]


def _by_metric(conditions: dict[str, Any], metric: str) -> dict[str, dict[str, Summary]]:
  """Normalises both shapes to {condition: {metric: summary}}."""
  if not conditions:
    raise ValueError("write_report: no conditions")
  single = ["mean" in v for v in conditions.values()]
  if any(single) and not all(single):
    raise ValueError("write_report: mix of single-metric summaries and metric dicts across conditions")
  out = {c: ({metric: v} if "mean" in v else dict(v)) for c, v in conditions.items()}
  for cond, metrics in out.items():
    for name, s in metrics.items():
      if not {"mean", "n"} <= set(s):
        raise ValueError(f"write_report: conditions[{cond!r}][{name!r}] is not a summary (mean, ci.., n): {s}")
      ci_key(s)
  return out


def _fmt(x: float) -> str:
  if not math.isfinite(x):
    return str(x)
  return f"{x:.3f}" if x == 0 or abs(x) >= 0.1 else f"{x:.3g}"  # small probabilities (0.00172) keep 3 digits


def markdown_table(conditions: dict[str, Any], metric: str = "value") -> str:
  """One row per condition: mean, interval and n (one metric) or `mean [lo, hi]` per metric column."""
  table = _by_metric(conditions, metric)
  metrics = list(dict.fromkeys(m for ms in table.values() for m in ms))
  if len(metrics) == 1:
    m = metrics[0]
    some = next(iter(table.values()))[m]
    level = ci_key(some)[2:]
    lines = [f"| condition | {m} (mean) | {level}% CI | n |", "|---|---:|---|---:|"]
    for cond, ms in table.items():
      s = ms[m]
      lo, hi = s[ci_key(s)]
      lines.append(f"| {cond} | {_fmt(s['mean'])} | [{_fmt(lo)}, {_fmt(hi)}] | {s['n']} |")
    return "\n".join(lines)
  lines = ["| condition | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
  for cond, ms in table.items():
    cells = []
    for m in metrics:
      s = ms.get(m)
      if s is None:
        cells.append("–")
      else:
        lo, hi = s[ci_key(s)]
        cells.append(f"{_fmt(s['mean'])} [{_fmt(lo)}, {_fmt(hi)}] (n={s['n']})")
    lines.append(f"| {cond} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(conditions: dict[str, Any], path: str | pathlib.Path, title: str, metric: str = "value") -> None:
  """Bars of the means with interval error bars, one panel per metric (each on its own scale: a probability and a
  log-probability do not share an axis), conditions side by side as in the paper's figures."""
  import matplotlib  # imported here: only plotting pays its import time
  matplotlib.use("Agg")  # files only; never needs a display
  import matplotlib.pyplot as plt

  table = _by_metric(conditions, metric)
  metrics = list(dict.fromkeys(m for ms in table.values() for m in ms))
  conds = list(table)
  fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.0, 1.1 * len(conds) + 1) * len(metrics), 3.6), dpi=120,
                           squeeze=False)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, m in zip(axes[0], metrics):
    xs, means, errs = [], [], [[], []]
    for j, cond in enumerate(conds):
      s = table[cond].get(m)
      if s is None:
        continue
      lo, hi = s[ci_key(s)]
      xs.append(j)
      means.append(s["mean"])
      errs[0].append(max(s["mean"] - lo, 0.0))
      errs[1].append(max(hi - s["mean"], 0.0))
    ax.bar(xs, means, width=0.7, yerr=errs, capsize=3, color=[colors[j % len(colors)] for j in xs])
    ax.set_xticks(range(len(conds)), conds, rotation=20, ha="right")
    ax.set_ylabel(m)
    ax.grid(axis="y", alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


@contextlib.contextmanager
def _replacing(path: pathlib.Path) -> Iterator[pathlib.Path]:
  """A temporary path beside `path` (same file system, same suffix for writers that go by it) to write; moved onto
  `path` only when the block completes, and removed when it fails."""
  # Not tempfile.mkstemp: it creates the file 0600, and a report should get the umask's permissions like any other.
  tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{path.suffix}")
  try:
    yield tmp
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
  finally:
    tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | pathlib.Path, text: str) -> None:
  """Writes `text` to `path` so that a failure midway (disk full, a kill) leaves the previous file intact."""
  path = pathlib.Path(path)
  with _replacing(path) as tmp:
    with tmp.open("x", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())  # the data reaches the disk before the rename can: a crash leaves old or new, not empty


def write_report(workdir: str | pathlib.Path, conditions: dict[str, Any], title: str,
                 extra: dict[str, Any] | None = None, metric: str = "value",
                 notes: list[str] | None = None, plot_fn: Any = None) -> str:
  """Writes report.json (`{"title", "metric", "conditions", **extra}`), report.md and report.png; returns the md.

  `metric` names the single metric (JSON `"metric"`, table header, y axis); with several metrics per condition the
  metric names come from `conditions` and `metric` is unused. `notes` are markdown lines under the table.
  `plot_fn(path)` draws report.png instead of the default bars (e.g. the LLM study's transfer-matrix heatmap).
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  _by_metric(conditions, metric)  # validates the shape before anything is written
  extra = dict(extra or {})
  clash = {"title", "metric", "conditions"} & set(extra)
  if clash:
    raise ValueError(f"write_report: extra may not set {sorted(clash)}")
  single = all("mean" in v for v in conditions.values())
  doc = {"title": title, **({"metric": metric} if single else {}), "conditions": conditions, **extra}
  text = json.dumps(doc, indent=2) + "\n"  # both texts before any file: a value JSON cannot hold writes nothing
  md = f"# {title}\n\n{markdown_table(conditions, metric)}\n"
  if notes:
    md += "\n" + "\n".join(notes) + "\n"
  write_text_atomic(workdir / "report.json", text)
  write_text_atomic(workdir / "report.md", md)
  if plot_fn is not None:
    plot_fn(workdir / "report.png")
  else:
    plot(conditions, workdir / "report.png", title, metric)
  return md
