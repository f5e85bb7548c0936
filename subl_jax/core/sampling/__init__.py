"""Batched sampling: one jitted prefill and one jitted `lax.while_loop` decode over a preallocated KV cache.

`generate` is the entry point (token-id prompts in, new tokens and the model's log-probabilities out); `draw` holds
the per-row token choice (temperature / top-k / top-p / allowed-token mask), `loop` the two jitted programs.
"""

from subl_jax.core.sampling.generation import BUCKET, Generation, common_prefix_len, generate, left_pad

__all__ = ["BUCKET", "Generation", "common_prefix_len", "generate", "left_pad"]
