"""Job `audit`: the transfer audit of a distillation, with its calibration against realised transfer.

`audit.study='mnist'`: for each m in `audit.n_aux` the MNIST auxiliary-logit study runs in `<workdir>/m<m>/` (its
stages are cached like any study's), then one `audit_<condition>` stage per student condition computes every
signal for every model (`mnist_audit`), and `audit.json` / `audit.md` / `audit.png` calibrate each signal against the
students' accuracies.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from jax.sharding import Mesh

from subl_jax.study import stage_table, stages
from subl_jax.study.audit import mnist_report
from subl_jax.study.mnist import study as mnist_study

def run_mnist(cfg: Any, workdir: pathlib.Path, mesh: Mesh) -> dict[str, Any]:
  points = []
  for m in (int(v) for v in cfg.audit.n_aux.split(",") if v.strip()):  # validated by config.validate
    c = cfg.copy_and_resolve_references()
    c.mnist.n_aux = m
    sub = workdir / f"m{m}"
    s = mnist_study.make_setup(c.mnist, c.seed, mesh)
    print(f"audit: MNIST study with m={m} in {sub}", flush=True)
    dirs = mnist_study.run_stages(c, s, sub)
    for condition in mnist_study.STUDENTS:
      d = stages.run(stage_table.MNIST_AUDIT, c, sub, f"audit_{condition}",
                     {"inits": dirs["inits"], "teacher": dirs["teacher"], "student": dirs[condition]},
                     {"condition": condition}, ctx=s)
      points.append(json.loads((d / "signals.json").read_text()))
  doc = mnist_report.write(workdir, points, cfg.audit.transfer_threshold)
  print((workdir / "audit.md").read_text(), flush=True)
  return {"calibration": {k: {"auroc": v["models"]["auroc"], "spearman": v["models"]["spearman"]}
                          for k, v in doc["calibration"].items()}, "cost_fraction": doc["cost_fraction"]}


def run_audit(cfg: Any, workdir: pathlib.Path, mesh: Mesh) -> dict[str, Any]:
  return {"mnist": run_mnist}[cfg.audit.study](cfg, workdir, mesh)
