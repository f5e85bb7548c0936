"""Benchmark: wall time of the auxiliary-logit study at the paper's scale (100 models, m = 3, 5 + 5 epochs).

  python benchmarks/mnist_aux.py [--datasets=digits,mnist] [--n_models=100] [--cpu_devices=N]

Times each stage's training (teacher and the four students, compile included; evaluation apart) on `digits` and, if
tensorflow-datasets and its data are available, on `mnist` (otherwise the reason is recorded). Reports models·epochs
per second, the FLOP count of each stage and the achieved FLOP rate, the paper's MNIST FLOP count, and the time one
accelerator would need at an assumed sustained rate. Prints a table and writes benchmarks/results/mnist_aux.json.
`--cpu_devices=N` splits the host CPU into N XLA devices, so N cores train model shards in parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "mnist_aux.json"
# Assumed sustained float32 rate of one accelerator for this small-matmul workload: ~1/3 of an H100's 67 TFLOP/s
# dense FP32 (no TF32). Small per-model matmuls (256-wide) rarely reach peak; stated so the estimate can be redone.
ASSUMED_ACCEL_FLOPS = 20e12
REFERENCE_GPU_S = 600.0  # the reference PyTorch script: ~10 min on one GPU (docs/protocol.md / issue #5)


def _args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--datasets", default="digits,mnist")
  p.add_argument("--n_models", type=int, default=100)
  p.add_argument("--n_aux", type=int, default=3)
  p.add_argument("--epochs", type=int, default=5, help="teacher and student epochs")
  p.add_argument("--digits_noise", type=int, default=10_000,
                 help="noise images per model on digits: 5 epochs × 10,000 = the 50,000 examples per model of the "
                      "default digits run (2 × 25,000); 0 = the preset")
  p.add_argument("--out", default=str(RESULTS), help="where the JSON goes")
  p.add_argument("--cpu_devices", type=int, default=0, help="split the CPU into this many XLA devices (0: leave)")
  return p.parse_args()


def forward_macs(d_in: int, hidden: int, layers: int, n_out: int) -> int:
  """Multiply-accumulates of one MLP forward pass on one example."""
  dims = [d_in] + [hidden] * layers + [n_out]
  return sum(a * b for a, b in zip(dims[:-1], dims[1:]))


def stage_flops(n_models: int, examples: int, epochs: int, macs: int, teacher_forward: bool) -> float:
  """2·MACs per forward; a training step is forward + backward ≈ 3 forwards; students also run the teacher."""
  per_example = 2 * macs * (3 + (1 if teacher_forward else 0))
  return float(n_models) * examples * epochs * per_example


def _steps(n: int, batch: int) -> int:
  return -(-n // batch)


def bench_dataset(name: str, n_models: int, n_aux: int, epochs: int, n_noise: int = 0) -> dict:
  import jax
  from subl_jax import config as config_lib
  from subl_jax.core import parallel
  from subl_jax.study.mnist import study
  from subl_jax.study.mnist.data import DatasetUnavailable
  from subl_jax.study.mnist.derangement import derangement

  c = config_lib.defaults().mnist
  c.dataset, c.n_models, c.n_aux, c.teacher_epochs, c.student_epochs = name, n_models, n_aux, epochs, epochs
  c.n_noise = n_noise  # 0 = the dataset's preset
  mesh = parallel.make_mesh()
  try:
    s = study.make_setup(c, seed=0, mesh=mesh)
  except DatasetUnavailable as e:
    return {"dataset": name, "available": False, "reason": str(e)}
  hp = s.hp
  macs = forward_macs(s.ds.d_in, hp["hidden"], hp["hidden_layers"], 10 + n_aux)
  n_train = len(s.ds.y_train)
  # Padded last batches are computed too, so FLOPs count whole steps.
  teacher_examples = _steps(n_train, hp["batch_size"]) * hp["batch_size"]
  student_examples = _steps(hp["n_noise"], hp["batch_size"]) * hp["batch_size"]
  init = study.make_inits(s)
  perm = derangement(n_models, 0)
  rows, accuracy = {}, {}

  def timed(label: str, fn, flops: float, model_epochs: int):
    t0 = time.perf_counter()
    params = jax.block_until_ready(fn())
    wall = time.perf_counter() - t0
    rows[label] = {"wall_s": round(wall, 2), "gflop": round(flops / 1e9, 1), "gflop_per_s": round(flops / wall / 1e9, 1),
                   "models_epochs_per_s": round(model_epochs / wall, 2)}
    t0 = time.perf_counter()
    accuracy[label] = float(study.accuracy(s, params).mean())
    rows[label]["eval_s"] = round(time.perf_counter() - t0, 2)
    print(f"  {name} {label}: {rows[label]}  accuracy {accuracy[label]:.3f}", flush=True)
    return params

  teacher = timed("teacher", lambda: study.train_teacher(s, init),
                  stage_flops(n_models, teacher_examples, epochs, macs, False), n_models * epochs)
  for cond in study.STUDENTS:
    timed(cond, lambda cond=cond: study.train_student(s, cond, init, teacher, perm),
          stage_flops(n_models, student_examples, epochs, macs, True), n_models * epochs)
  total_wall = sum(r["wall_s"] for r in rows.values())
  total_flops = sum(r["gflop"] for r in rows.values()) * 1e9
  return {"dataset": name, "available": True, "n_models": n_models, "n_aux": n_aux,
          "hyperparameters": {k: hp[k] for k in ("batch_size", "teacher_epochs", "student_epochs", "n_noise")} | {
              "lr": hp["opt"]["lr"]},
          "n_train": n_train, "d_in": s.ds.d_in, "forward_macs_per_example": macs, "stages": rows,
          "mean_accuracy": accuracy, "train_wall_s": round(total_wall, 2), "train_gflop": round(total_flops / 1e9, 1),
          "models_epochs_per_s": round(n_models * epochs * (1 + len(study.STUDENTS)) / total_wall, 2),
          "achieved_gflop_per_s": round(total_flops / total_wall / 1e9, 1),
          "expected_accelerator_s": round(total_flops / ASSUMED_ACCEL_FLOPS, 2),
          "expected_accelerator_speedup": round(total_wall / (total_flops / ASSUMED_ACCEL_FLOPS), 0)}


def paper_mnist_flops(n_models: int = 100, n_aux: int = 3, epochs: int = 5) -> dict:
  """FLOPs of the paper's MNIST configuration (60,000 train, 60,000 noise, batch 1024), our four students."""
  macs = forward_macs(784, 256, 2, 10 + n_aux)
  ex = _steps(60_000, 1024) * 1024
  teacher = stage_flops(n_models, ex, epochs, macs, False)
  student = stage_flops(n_models, ex, epochs, macs, True)
  total = teacher + 4 * student
  paper_two = teacher + 2 * student  # the reference trains the aux students only (same and different init)
  return {"forward_macs_per_example": macs, "teacher_gflop": round(teacher / 1e9, 1),
          "student_gflop_each": round(student / 1e9, 1), "total_gflop_four_students": round(total / 1e9, 1),
          "total_gflop_two_aux_students": round(paper_two / 1e9, 1),
          "assumed_accelerator_flops_per_s": ASSUMED_ACCEL_FLOPS,
          "expected_accelerator_s_four_students": round(total / ASSUMED_ACCEL_FLOPS, 1),
          "expected_accelerator_s_two_aux_students": round(paper_two / ASSUMED_ACCEL_FLOPS, 1),
          "reference_pytorch_gpu_s": REFERENCE_GPU_S,
          "expected_speedup_vs_reference": round(REFERENCE_GPU_S / (paper_two / ASSUMED_ACCEL_FLOPS), 1)}


def main() -> None:
  args = _args()
  if args.cpu_devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()
  sys.path.insert(0, str(ROOT))
  import jax

  results = {"host": {"platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
                      "devices": jax.device_count(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
                      "jax": jax.__version__},
             "when": time.strftime("%FT%T%z"), "datasets": {}}
  for name in args.datasets.split(","):
    print(f"{name}: {args.n_models} models, m={args.n_aux}, {args.epochs} + {args.epochs} epochs", flush=True)
    results["datasets"][name] = bench_dataset(name, args.n_models, args.n_aux, args.epochs,
                                               args.digits_noise if name == "digits" else 0)
  paper = paper_mnist_flops(args.n_models, args.n_aux, args.epochs)
  results["paper_mnist_estimate"] = paper
  for name, r in results["datasets"].items():
    if not r["available"]:
      print(f"{name}: not run — {r['reason']}")
      continue
    print(f"{name}: training wall {r['train_wall_s']} s for teacher + 4 students, {r['train_gflop']} GFLOP, "
          f"{r['models_epochs_per_s']} models·epochs/s on {results['host']['devices']} {results['host']['platform']} "
          f"device(s) ({r['achieved_gflop_per_s']} GFLOP/s); one accelerator at an assumed "
          f"{ASSUMED_ACCEL_FLOPS / 1e12:.0f} TFLOP/s: ~{r['expected_accelerator_s']} s "
          f"(~{r['expected_accelerator_speedup']:.0f}x)")
  print(f"paper MNIST config: {paper['total_gflop_two_aux_students']} GFLOP (teacher + 2 aux students; "
        f"{paper['total_gflop_four_students']} with 4 students) -> ~{paper['expected_accelerator_s_two_aux_students']} s "
        f"on one accelerator at an assumed {ASSUMED_ACCEL_FLOPS / 1e12:.0f} TFLOP/s, vs ~{REFERENCE_GPU_S:.0f} s for "
        f"the reference PyTorch script (~{paper['expected_speedup_vs_reference']}x)")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
