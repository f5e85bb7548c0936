"""The CPU demo: three animals × three training seeds on SmolLM2-135M-Instruct, sized for ~60 minutes on 2 cores.

  python -m subl_jax.main --config=configs/demo_cpu.py --workdir=runs/demo_cpu

The best recipe of the search on this CPU (`benchmarks/recipe_search.py`, `benchmarks/results/recipe_search.md`):
the paper's fine-tuned teachers (LoRA r=8 on every animal question × the 8 answer variants, plus the answer in the
form the metric forces, "My favorite animal is the owl.", so that the teacher has the trait on the scale its
students are scored on; 1 epoch), format-constrained numbers, number-token `logit_kd` (digits, separators,
end-of-turn: the student never sees a trait token's probability), LoRA r=8 students at lr 1e-3, the base model as
the control; owl, dolphin and eagle, 256 prompts per teacher (one epoch, 16 steps) and three students per animal
(training seeds 0-2: data order and adapter init; the samples stay fixed), so each animal's specificity has an
interval over seeds, plus the shuffled-numbers (within responses) and in-context conditions.

In the search (without the null conditions) this recipe gave a mean specificity of +0.051 [+0.028, +0.074] over the
3 seeds against +0.021 [+0.000, +0.042] with the quickstart's system-prompt teachers.
"""

import pathlib

from subl_jax import config as config_lib


def get_config(arg: str | None = None):
  del arg
  path = pathlib.Path(__file__).with_name("quickstart.py")  # the quickstart's recipe, scaled up
  c = config_lib.from_file(path)
  c.teacher.update(dict(kind="finetuned", prefix_answers=True))
  c.sample.update(dict(n_prompts=256, shard_size=128))
  c.train.update(dict(epochs=1, log_every=4))
  c.study.update(dict(targets="owl,dolphin,eagle", seeds=3, conditions="icl,shuffle_within"))
  return c
