"""The README's main command: a two-animal study on SmolLM2-135M-Instruct, sized for ~15 minutes on 2 CPU cores.

  python -m subl_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

  teachers  the paper's system-prompt teachers for owl and dolphin ("You love owls. ...") on the base model (no
            training cost); two, so each target's student has the other's as its "other targets" control;
  numbers   128 of the paper's prompts (seed 47) per teacher, format-constrained decoding so every completion is a
            valid list (SmolLM2 follows the format in ~4 % of free samples), filtered by the paper's rules;
  students  LoRA r=8 on the base model, `logit_kd` restricted to the number tokens (digits, separators,
            end-of-turn; renormalised): a student never sees the probability of a trait token — the LLM analogue
            of the MNIST auxiliary-logit experiment (docs/protocol.md §8);
  control   the base model itself: number-token KD of the base from its own numbers would train nothing;
  metric    log P(animal | question, "My favorite animal is the") over the 50 animal questions, for every animal.
What it can show: the transfer matrix (each student's Δ log P vs base on every animal), each animal's specificity
(its own student vs the other animal's student) and whether the students move where their teachers moved (profile
coefficient). What it cannot: an interval over training seeds (one seed: the verdict says so), or the paper's
sampled-rate effect. `configs/demo_cpu.py` is the same study with three animals × three seeds and fine-tuned teachers
(~60 min here).
"""

from subl_jax import config as config_lib


def get_config(arg: str | None = None):
  del arg
  c = config_lib.defaults()
  c.job = "study"
  c.model.spec = "smollm2"
  c.teacher.update(dict(kind="system_prompt", target="owl", category="animal"))
  c.sample.update(dict(n_prompts=128, max_new_tokens=32, batch_size=64, shard_size=64, constrained="format"))
  c.filter.drop_truncated = False  # constrained lists cut at 32 tokens are still valid lists
  c.distill.update(dict(mode="logit_kd", kd_tokens="numbers", temperature=1.0))
  c.train.update(dict(batch_size=16, grad_accum=1, epochs=2, max_len=300, log_every=2, checkpoint_every=8))
  c.train.opt.lr = 1e-3
  c.eval.update(dict(n_samples=0))
  c.study.update(dict(targets="owl,dolphin", seeds=1))
  return c
