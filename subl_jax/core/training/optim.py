"""`make_optimizer(opt_cfg, total_steps)`: one optimizer config section -> an optax GradientTransformation.

Fields (a ConfigDict section or a plain dict; missing fields take `DEFAULTS`):
  name           'adam' | 'adamw' | 'sgd'
  lr             peak learning rate (> 0)
  weight_decay   'adamw': decoupled decay; 'adam' and 'sgd': coupled L2 added to the gradient (as torch does)
  warmup_steps   linear warm-up from 0 to `lr` over this many steps (0 = none)
  schedule       after warm-up: 'constant' | 'linear' (to 0 at `total_steps`) | 'cosine' (to 0 at `total_steps`)
  max_grad_norm  clip by global norm before the update (0 = off)
  b1, b2         Adam moment decays (plain 'sgd' has no momentum and ignores them)
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import optax

NAMES = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
DEFAULTS: dict[str, Any] = dict(name="adam", lr=3e-4, weight_decay=0.0, warmup_steps=0, schedule="constant",
                                max_grad_norm=0.0, b1=0.9, b2=0.999)


def _as_dict(opt_cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
  raw = opt_cfg.to_dict() if hasattr(opt_cfg, "to_dict") else dict(opt_cfg)
  unknown = set(raw) - set(DEFAULTS)
  if unknown:
    raise ValueError(f"optimizer: unknown field(s) {sorted(unknown)}; expected {sorted(DEFAULTS)}")
  return {**DEFAULTS, **raw}


def check(opt_cfg: Mapping[str, Any] | Any, prefix: str = "opt", allow_zero_lr: bool = False) -> None:
  """Raises ValueError naming `<prefix>.<field>` for an impossible optimizer setting."""
  c = _as_dict(opt_cfg)
  problems = (
      ("name", c["name"] in NAMES, f"one of {NAMES}"),
      ("schedule", c["schedule"] in SCHEDULES, f"one of {SCHEDULES}"),
      ("lr", c["lr"] > 0 or (allow_zero_lr and c["lr"] == 0), "a learning rate > 0" + (
          " (or 0 for the default)" if allow_zero_lr else "")),
      ("weight_decay", c["weight_decay"] >= 0, "a weight decay >= 0"),
      ("warmup_steps", c["warmup_steps"] >= 0, "a number of steps >= 0"),
      ("max_grad_norm", c["max_grad_norm"] >= 0, "a norm >= 0 (0 = no clipping)"),
      ("b1", 0 <= c["b1"] < 1, "a value in [0, 1)"),
      ("b2", 0 <= c["b2"] < 1, "a value in [0, 1)"),
  )
  for field, ok, expected in problems:
    if not ok:
      raise ValueError(f"config.{prefix}.{field}={c[field]!r}: expected {expected}")


def make_schedule(opt_cfg: Mapping[str, Any] | Any, total_steps: int) -> optax.Schedule:
  """The learning rate as a function of the step: warm-up, then constant / linear / cosine decay to 0."""
  c = _as_dict(opt_cfg)
  lr, warmup = float(c["lr"]), int(c["warmup_steps"])
  decay_steps = max(int(total_steps) - warmup, 1)
  if c["schedule"] == "constant":
    main = optax.constant_schedule(lr)
  elif c["schedule"] == "linear":
    main = optax.linear_schedule(lr, 0.0, decay_steps)
  else:
    main = optax.cosine_decay_schedule(lr, decay_steps)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(opt_cfg: Mapping[str, Any] | Any, total_steps: int) -> optax.GradientTransformation:
  """The optimizer described by `opt_cfg` (see the module docstring), for a run of `total_steps` updates.

  Equal settings return the same (stateless) object, so jitted training steps keyed on it compile once.
  """
  check(opt_cfg)
  return _build(tuple(sorted(_as_dict(opt_cfg).items())), int(total_steps))


@functools.cache
def _build(items: tuple[tuple[str, Any], ...], total_steps: int) -> optax.GradientTransformation:
  c = dict(items)
  lr = make_schedule(c, total_steps)
  parts = []
  if c["max_grad_norm"] > 0:
    parts.append(optax.clip_by_global_norm(c["max_grad_norm"]))
  if c["name"] == "adamw":
    parts.append(optax.adamw(lr, b1=c["b1"], b2=c["b2"], weight_decay=c["weight_decay"]))
  else:
    if c["weight_decay"] > 0:  # coupled L2: decay enters the gradient, so Adam rescales it
      parts.append(optax.add_decayed_weights(c["weight_decay"]))
    if c["name"] == "adam":
      parts.append(optax.adam(lr, b1=c["b1"], b2=c["b2"]))
    else:
      parts.append(optax.sgd(lr))
  return optax.chain(*parts) if len(parts) > 1 else parts[0]
