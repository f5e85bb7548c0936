"""Chat with a model: load the embedded default model (SmolLM2-135M-Instruct) and answer one chat prompt.

  python -m subl_jax.main --config=configs/chat.py --workdir=runs/chat

`arg` (after a colon) replaces the prompt, e.g. `--config=configs/chat.py:"Name your favorite tree."`.
"""

from subl_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.defaults()
  c.job = "chat"
  c.model.spec = "smollm2"
  if arg:
    c.chat.prompt = arg
  return c
