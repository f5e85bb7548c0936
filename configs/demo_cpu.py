"""The CPU demo: three animals × three training seeds on SmolLM2-135M-Instruct, sized for ~60 minutes on 2 cores.

  python -m subl_jax.main --config=configs/demo_cpu.py --workdir=runs/demo_cpu
  python -m subl_jax.main --config=configs/demo_cpu.py:1ep --workdir=runs/demo_cpu_1ep

The best recipe of the search on this CPU (`benchmarks/recipe_search.py`, `benchmarks/results/recipe_search.md`):
the paper's fine-tuned teachers (LoRA r=8 on every animal question × the 8 answer variants, plus the answer in the
form the metric forces, "My favorite animal is the owl.", so that the teacher has the trait on the scale its
students are scored on; 1 epoch), format-constrained numbers, number-token `logit_kd` (digits, separators,
end-of-turn: the student never sees a trait token's probability), LoRA r=8 students at lr 1e-3 for 2 epochs, the
base model as the control; owl, dolphin and eagle, 256 prompts per teacher (32 student steps) and three students per
animal (training seeds 0-2: data order and adapter init; the samples stay fixed), so each animal's specificity has an
interval over seeds. In the search this is `ft_kd_2ep`: mean specificity +0.119 [+0.086, +0.153] over seeds 0-2, and
+0.136 [+0.123, +0.150] with new teachers, numbers and students (`--config.train.seed=3`). Measured under its own
name: 53 minutes on 2 cores (`benchmarks/results/demo_cpu.*`). More numbers transfer more but do not fit the budget:
1,024 rows × 1 epoch (`ft_kd_1024`) gives +0.254 [+0.239, +0.270] in 112 minutes, and +0.284 [+0.190, +0.378] on
new seeds (`ft_kd_1024_seed3`).

The null conditions (in context; numbers shuffled within responses) add 13 and 43 minutes:
`--config.study.conditions=icl,shuffle_within` (`benchmarks/results/demo_cpu_nulls.*`: in context −0.001; shuffled
+0.123 [+0.112, +0.134], unchanged).

`:1ep` is the first demo: the same students for 1 epoch (16 steps), with both null conditions, ~60 minutes. The audit
(`configs/audit_smollm2.py`), the mitigations (`configs/mitigate_smollm2.py`) and the recipe search were measured on
it (`benchmarks/results/demo_cpu_1ep.*`); its mean specificity is +0.051 [+0.028, +0.074].
"""

import pathlib

from subl_jax import config as config_lib


def get_config(arg: str | None = None):
  if arg not in (None, "", "1ep"):
    raise ValueError(f"configs/demo_cpu.py:{arg}: expected no argument or ':1ep'")
  path = pathlib.Path(__file__).with_name("quickstart.py")  # the quickstart's recipe, scaled up
  c = config_lib.from_file(path)
  c.teacher.update(dict(kind="finetuned", prefix_answers=True))
  c.sample.update(dict(n_prompts=256, shard_size=128))
  c.train.update(dict(epochs=2, log_every=4))
  c.study.update(dict(targets="owl,dolphin,eagle", seeds=3, conditions=""))
  if arg == "1ep":
    c.train.epochs = 1
    c.study.conditions = "icl,shuffle_within"
  return c
