"""XLA:CPU matmul libraries at SmolLM2's shapes: YNNPACK (jaxlib's default) against XLA's Eigen kernels (YNNPACK's
fusions off, `subl_jax.core.xla_cpu.many_rows_options`), float32, by number of rows.

The measurement behind `subl_jax.core.xla_cpu`: which programs are compiled with YNNPACK off. The two are compiled in one
process and timed interleaved (rounds of every shape x library), so a changing machine load hits both alike; the
figure is the median over rounds. Each round also times the 1536^3 float32 matmul chain the sampling and training
benchmarks measure MFU against, so every rate is also given as a fraction of that peak (`fraction_of_chain`, against
the median chain rate): what a program of nothing but matmuls of that many rows could reach with its weights in
cache (each shape reuses one weight; a decode step streams all the model's weights: `sampling_phases.py`).

  python benchmarks/cpu_matmul.py [--rounds 5]   (writes benchmarks/results/cpu_matmul.json; ~2 min on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import common
from subl_jax.core import xla_cpu

# (K, N) of SmolLM2-135M's projections: q/o, k/v, gate/up, down
PROJECTIONS = ((576, 576), (576, 192), (576, 1536), (1536, 576))
ROWS = (64, 128, 256, 512, 1024, 2048, 6144)


def seconds(fn, x, w, reps: int) -> float:
  fn(x, w).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(reps):
    fn(x, w).block_until_ready()
  return (time.perf_counter() - t0) / reps


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "cpu_matmul.json"))
  args = ap.parse_args()
  if jax.default_backend() != "cpu":
    raise SystemExit("cpu_matmul.py measures XLA:CPU; run it on a CPU backend")
  libraries = {"ynnpack (default)": {}, "eigen (ynnpack off)": xla_cpu.many_rows_options()}
  if not libraries["eigen (ynnpack off)"]:
    raise SystemExit(f"this jaxlib has no {xla_cpu.OPTION} option: nothing to compare")
  rng = np.random.default_rng(0)
  cases = {}
  for m in ROWS:
    for k, n in PROJECTIONS:
      x = jnp.asarray(rng.normal(size=(m, k)).astype(np.float32))
      w = jnp.asarray(rng.normal(size=(k, n)).astype(np.float32))
      fns = {name: jax.jit(lambda a, b: a @ b).lower(x, w).compile(compiler_options=opts or None)
             for name, opts in libraries.items()}
      cases[(m, k, n)] = (x, w, fns, {name: [] for name in libraries})
  chain = []
  for _ in range(args.rounds):
    chain.append(common.jax_matmul_peak("float32", 1536) / 1e9)
    for (m, k, n), (x, w, fns, rates) in cases.items():
      reps = max(3, int(2e9 / (2 * m * k * n)))  # ~2 GFLOP per timing
      for name, fn in fns.items():
        rates[name].append(2 * m * k * n / seconds(fn, x, w, reps) / 1e9)
  rows = []
  for (m, k, n), (_, _, _, rates) in cases.items():
    med = {name: round(float(np.median(r)), 1) for name, r in rates.items()}
    rows.append({"rows": m, "k": k, "n": n, "gflop_per_s": med,
                 "faster": max(med, key=med.get)})
    print(f"{m:5d} x [{k:4d} x {n:4d}]  " + "  ".join(f"{name} {v:6.1f}" for name, v in med.items()), flush=True)
  by_rows = {}
  for m in ROWS:
    sel = [r for r in rows if r["rows"] == m]
    by_rows[m] = {name: round(float(np.exp(np.mean([np.log(r["gflop_per_s"][name]) for r in sel]))), 1)
                  for name in libraries}
  chain_median = float(np.median(chain))
  fraction = {m: {name: round(v / chain_median, 3) for name, v in r.items()} for m, r in by_rows.items()}
  out = {"machine": common.machine(), "dtype": "float32", "rounds": args.rounds, "shapes": rows,
         "geomean_gflop_per_s_by_rows": by_rows, "chain_gflop_per_s": [round(c, 1) for c in chain],
         "fraction_of_chain_by_rows": fraction, "many_rows_options": libraries["eigen (ynnpack off)"]}
  path = pathlib.Path(args.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=2) + "\n")
  print(json.dumps(by_rows), f"chain {chain_median:.0f} GFLOP/s;", json.dumps(fraction), f"-> {path}")


if __name__ == "__main__":
  main()
