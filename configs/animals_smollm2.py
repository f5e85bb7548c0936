"""The paper's five-animal study on SmolLM2-135M-Instruct at the paper's scale, for one GPU (docs/protocol.md §2-7).

  python -m subl_jax.main --config=configs/animals_smollm2.py --workdir=runs/animals_smollm2
  python -m subl_jax.main --config=configs/animals_smollm2.py:sft --workdir=runs/animals_smollm2_sft  # paper's student

One teacher per animal of the paper's GPT-4.1 nano set (owl, dolphin, eagle, elephant, wolf: each target's students
are the others' "other targets" control), 30,000 of the paper's prompts (seed 47) per teacher, the filter, a seeded
subsample of 10,000 rows, 5 students per animal (training seeds 0-4; the samples stay fixed), the shuffled-numbers and
in-context conditions, the paper's evaluation (50 questions × 100 samples at temperature 1) plus the log-prob metric
on every animal. Same recipe as `configs/quickstart.py` (system-prompt teacher, format-constrained numbers,
number-token `logit_kd`, LoRA r=8) unless `arg` is 'sft': cross-entropy on the sampled completions, the paper's
student. bfloat16 compute with float32 parameters.
"""

from subl_jax import config as config_lib


def get_config(arg: str | None = None):
  if arg not in (None, "", "sft", "logit_kd"):
    raise ValueError(f"configs/animals_smollm2.py: arg {arg!r}; expected 'sft' or 'logit_kd'")
  c = config_lib.defaults()
  c.job = "study"
  c.model.update(dict(spec="smollm2", dtype="bfloat16", param_dtype="float32"))
  c.teacher.update(dict(kind="system_prompt", target="owl", category="animal"))
  c.sample.update(dict(n_prompts=30000, max_new_tokens=64, batch_size=512, shard_size=2048, constrained="format"))
  c.filter.update(dict(drop_truncated=False, max_rows=10000))
  c.distill.update(dict(mode=arg or "logit_kd", kd_tokens="numbers"))
  c.train.update(dict(batch_size=22, grad_accum=3, epochs=3, max_len=500, checkpoint_every=100))
  c.train.opt.lr = 2e-4  # the paper's open-weight recipe (LoRA r=8, alpha 8, effective batch 66, 3 epochs)
  c.eval.update(dict(n_samples=100))
  c.study.update(dict(targets="owl,dolphin,eagle,elephant,wolf", seeds=5,
                     conditions="icl,shuffle_within,shuffle_across"))
  return c
