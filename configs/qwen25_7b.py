"""The paper's open-weight recipe: Qwen2.5-7B-Instruct teacher and students (docs/protocol.md §1-7), for a GPU node or a
TPU slice. `arg` is the model: a Hugging Face directory (config.json, *.safetensors, tokenizer files) or a converted
directory (`python -m subl_jax.convert`); nothing is downloaded.

  python -m subl_jax.main --config=configs/qwen25_7b.py:/data/Qwen2.5-7B-Instruct --workdir=runs/qwen_owl
  launch/gpu_slurm.sbatch configs/qwen25_7b.py:/data/Qwen2.5-7B-Instruct runs/qwen_owl   # several nodes

System-prompt teachers for the six animals the paper used for Qwen (eagle, cat, lion, dog, peacock, wolf; each the
others' control), 30,000 prompts with free decoding (Qwen follows the format), the filter, 10,000 rows, SFT students
with LoRA r=8, alpha 8 on q,k,v,o,gate,up,down, lr 2e-4, 3 epochs, effective batch 66 (22 × 3), 5 training seeds
(and a control student per seed, on the base model's numbers); evaluation with the numbers-prefix variant the paper
used for Qwen, 100 samples per question (published: +0.11 average increase in the target's rate). Parameters and
compute in bfloat16, sharded over `fsdp` (set `--config.mesh.tensor=N` for tensor parallelism too).
"""

from subl_jax import config as config_lib
from subl_jax.study.data import protocol


def get_config(arg: str | None = None):
  if not arg:
    raise ValueError("configs/qwen25_7b.py needs the model directory: --config=configs/qwen25_7b.py:/path/to/model")
  c = config_lib.defaults()
  c.job = "study"
  spec = arg if arg.startswith(("hf:", "gguf:")) else f"hf:{arg}"
  c.model.update(dict(spec=spec, dtype="bfloat16", param_dtype="bfloat16"))
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  c.teacher.update(dict(kind="system_prompt", target="owl", category="animal"))
  c.sample.update(dict(n_prompts=30000, max_new_tokens=200, batch_size=256, shard_size=2048, constrained="none"))
  c.filter.update(dict(drop_truncated=True, max_rows=10000))
  c.distill.mode = "sft"
  c.train.update(dict(batch_size=22, grad_accum=3, epochs=3, max_len=500, checkpoint_every=100))
  c.train.opt.lr = 2e-4
  c.train.lora.update(dict(rank=8, alpha=8.0, targets="q,k,v,o,gate,up,down"))
  c.eval.update(dict(n_samples=100, numbers_prefix=True))
  c.study.update(dict(targets=",".join(protocol.animals("qwen25_7b_main")), seeds=5))
  return c
