"""AdamW with global-norm clipping and the learning-rate schedules OneGen runs use."""

from __future__ import annotations

import optax


def learning_rate_schedule(lr: float, total_steps: int, schedule: str,
                           warmup_steps: int = 0) -> optax.Schedule:
  """"linear": lr decays linearly to 0 over total_steps, no warmup (the reference's setting);
  "warmup_cosine": linear warmup to lr over warmup_steps, then cosine decay to 0."""
  if schedule == "linear":
    return optax.linear_schedule(lr, 0.0, max(total_steps, 1))
  if schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1))
  if schedule == "constant":
    return optax.constant_schedule(lr)
  raise ValueError(f"schedule={schedule!r}; expected 'linear', 'warmup_cosine' or 'constant'")


def adamw(schedule: optax.Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.0, clip_norm: float | None = 1.0) -> optax.GradientTransformation:
  """Clip by global norm (when clip_norm is set), then AdamW (reference: 0.9, 0.999, 1e-8, wd 0)."""
  opt = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  return optax.chain(optax.clip_by_global_norm(clip_norm), opt) if clip_norm else opt
