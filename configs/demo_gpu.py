"""The demo at GPU scale: the CPU demo's recipe on the paper's five animals × five seeds with 2,048 numbers each.

  python -m subl_jax.main --config=configs/demo_gpu.py --workdir=runs/demo_gpu
  bash benchmarks/gpu_demo.sh run        # on a lent GPU machine; its header says how the weights get there

`configs/demo_cpu.py`'s recipe (fine-tuned LoRA teachers that also answer in the metric's forced form, format-
constrained numbers, number-token `logit_kd`, LoRA r=8 students at lr 1e-3, the base model as the control) at the size
the CPU search points to: there, more numbers transferred more (256, 512 and 1,024 rows × 1 epoch gave mean
specificities of +0.051, +0.145 and +0.254; `benchmarks/results/recipe_search.md`). Here: owl, dolphin, eagle,
elephant and wolf (the paper's nano set; each animal's students are the others' control), 2,048 of the paper's prompts
per teacher, students trained 1 epoch (128 steps, every row seen once) with training seeds 0-4, the log-prob metric on
every animal. bfloat16 compute with float32 parameters, as `configs/animals_smollm2.py`.
"""

import pathlib

from subl_jax import config as config_lib


def get_config(arg: str | None = None):
  if arg not in (None, ""):
    raise ValueError(f"configs/demo_gpu.py:{arg}: expected no argument")
  c = config_lib.from_file(pathlib.Path(__file__).with_name("demo_cpu.py"))
  c.model.update(dict(dtype="bfloat16", param_dtype="float32"))
  c.sample.update(dict(n_prompts=2048, batch_size=512, shard_size=512))
  c.train.update(dict(epochs=1, log_every=16, checkpoint_every=64))
  c.study.update(dict(targets="owl,dolphin,eagle,elephant,wolf", seeds=5, conditions=""))
  return c
