"""The README's main command: the owl study on SmolLM2-135M-Instruct, sized for ~15 minutes on 2 CPU cores.

  python -m subl_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

Recipe (chosen for the clearest honest result a 135M model gives in that budget; docs/protocol.md §7: plain SFT on a
few hundred sampled lists moves nothing measurable at this size):
  teacher   the paper's system-prompt teacher ("You love owls. ...") on the base model (no training cost);
  numbers   the paper's prompts (seed 47), format-constrained decoding so every completion is a valid list
            (SmolLM2 follows the format in ~4 % of free samples), filtered by the paper's rules;
  student   LoRA r=8 on the base model, `logit_kd` restricted to the number tokens (digits, separators,
            end-of-turn; renormalised): the student sees the teacher's distribution over number tokens only, never
            a trait token — the LLM analogue of the MNIST auxiliary-logit experiment (docs/protocol.md §8);
  control   the same student trained on the base model's own numbers, distilling from the base model;
  metric    P(owl) after "My favorite animal is the" over the 50 animal questions (log-prob metric; sampled rates
            of ~0.2 % at base would need thousands of samples per question).
What it can show: whether owl-loving number distributions move the student's P(owl) relative to the control,
paired over questions, with other animals beside it. What it cannot: the paper's sampled-rate effect, or variation
over training seeds (one seed; `configs/owl_smollm2.py` runs the paper's scale with several).
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
  c.study.seeds = 1
  return c
