"""The README's main command: load the embedded default model (SmolLM2-135M-Instruct) and answer a chat prompt.

  python -m subl_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

`arg` (after a colon) replaces the prompt, e.g. `--config=configs/quickstart.py:"Name your favorite tree."`.
"""

from subl_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.defaults()
  c.job = "chat"
  c.model.spec = "smollm2"
  if arg:
    c.chat.prompt = arg
  return c
