"""AdamW + global-norm clipping + warmup-cosine schedule, as the original (docs/original.md, Training recipe).

  * AdamW(b1, b2, eps, weight_decay) with decay on every parameter except biases. Norm scales ARE
    decayed: the original excluded names containing `LayerNorm.weight`, which Qwen2's
    `*layernorm.weight` never matches.
  * global-norm clipping at `optim.clip`, applied to the gradient before Adam.
  * HF `get_cosine_schedule_with_warmup` stretched over `optim.horizon` times the run:
      total  = floor(horizon * steps),  warmup = floor(warmup_ratio * total)
      lr(s)  = lr * s / warmup                                    for s < warmup
             = lr * 0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))   afterwards (0 past total)
    where s = number of updates already applied (the first update uses lr(0) = 0, as HF does).
    Training stops at `steps`, so with horizon 1.35 the last lr is ~0.17 * peak.
"""

import math

import jax
import jax.numpy as jnp
import optax


def schedule_lengths(optim, steps: int) -> tuple[int, int]:
  """(warmup, total) in optimizer steps."""
  total = max(1, math.floor(optim.horizon * steps + 1e-9))   # 1e-9: 1.35*100 must not round to 134
  return math.floor(optim.warmup_ratio * total + 1e-9), total


def make_schedule(optim, steps: int):
  """optax schedule: update count -> learning rate (see module docstring)."""
  warmup, total = schedule_lengths(optim, steps)
  peak = optim.lr

  def schedule(count):
    s = jnp.asarray(count, jnp.float32)
    warm = peak * s / max(1, warmup)
    progress = jnp.clip((s - warmup) / max(1, total - warmup), 0.0, 1.0)
    cos = peak * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(s < warmup, warm, cos)
  return schedule


def decay_mask(params):
  """True for parameters that get weight decay: everything but biases."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not _leaf_name(path).endswith("bias"), params)


def _leaf_name(path) -> str:
  last = path[-1] if path else None
  for attr in ("key", "name", "idx"):
    if hasattr(last, attr):
      return str(getattr(last, attr))
  return str(last)


def make_optimizer(config) -> optax.GradientTransformation:
  """clip_by_global_norm(optim.clip) -> AdamW(schedule, wd on non-bias params)."""
  o = config.optim
  return optax.chain(
      optax.clip_by_global_norm(o.clip),
      optax.adamw(make_schedule(o, config.steps), b1=o.b1, b2=o.b2, eps=o.eps,
                  weight_decay=o.weight_decay, mask=decay_mask),
  )
