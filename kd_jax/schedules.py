"""Schedules of the learning rate and the distillation temperature.

Both are functions of the step number, evaluated inside the jitted train step,
so neither a new learning rate nor a new temperature ever recompiles it.
"""

from typing import Callable

import jax.numpy as jnp
import optax

from kd_jax.errors import UserInputError

Schedule = Callable[[jnp.ndarray], jnp.ndarray]

LEARNING_RATE_SCHEDULES = ("cosine", "linear", "step", "constant")
TEMPERATURE_SCHEDULES = ("constant", "linear", "cosine")


def peak_learning_rate(optimizer_config, batch_size: int) -> float:
  """`learning_rate`, scaled linearly to the global batch if `reference_batch_size` is set.

  Goyal et al.'s rule, which published ImageNet recipes state their rates
  under ("0.2 at batch 512"): the same recipe then runs on any device count.
  """
  reference = optimizer_config.reference_batch_size
  if not reference:
    return optimizer_config.learning_rate
  return optimizer_config.learning_rate * batch_size / reference


def learning_rate_schedule(
    optimizer_config, steps_per_epoch: int, epochs: int, batch_size: int
) -> Schedule:
  """The learning rate per step, from a stage's `optimizer` config.

  `schedule`: 'cosine' (linear warm-up over `warmup_epochs` from
  `start_lr_fraction` of the peak, then cosine decay to `end_lr_fraction` of the
  peak over the rest of the run), 'linear' (the same warm-up, then a straight
  line down to `end_lr_fraction`: airbench's triangle), 'step' (multiply
  by `decay_factor` at each epoch in `decay_epochs`) or 'constant'. The peak
  is `peak_learning_rate` for the stage's global `batch_size`.
  """
  lr = peak_learning_rate(optimizer_config, batch_size)
  total_steps = max(steps_per_epoch * epochs, 1)
  kind = optimizer_config.schedule
  warmup_steps = min(int(optimizer_config.warmup_epochs * steps_per_epoch), total_steps - 1)
  start = lr * optimizer_config.start_lr_fraction if warmup_steps else lr
  end = lr * optimizer_config.end_lr_fraction
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=start,
        peak_value=lr,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=end,
    )
  if kind == "linear":
    return optax.join_schedules(
        [
            optax.linear_schedule(start, lr, warmup_steps),
            optax.linear_schedule(lr, end, total_steps - warmup_steps),
        ],
        [warmup_steps],
    )
  if kind == "step":
    boundaries = {
        int(e) * steps_per_epoch: optimizer_config.decay_factor
        for e in optimizer_config.decay_epochs
    }
    return optax.piecewise_constant_schedule(lr, boundaries)
  if kind == "constant":
    return optax.constant_schedule(lr)
  raise UserInputError(
      f"unknown optimizer.schedule {kind!r}; use one of {', '.join(LEARNING_RATE_SCHEDULES)}"
  )


def temperature_schedule(distill_config, steps_per_epoch: int, epochs: int) -> Schedule:
  """The distillation temperature per step, changing once per epoch.

  `temperature_schedule`: 'constant' (`temperature`), 'linear' (from
  `temperature_start` to `temperature_end`; 5 -> 1 is the guide's anneal
  T(e) = 1 + 4 (1 - e/E)) or 'cosine' (cosine from start to end).
  """
  kind = distill_config.temperature_schedule
  start, end = distill_config.temperature_start, distill_config.temperature_end
  if kind == "constant":
    by_epoch = optax.constant_schedule(distill_config.temperature)
  elif kind == "linear":
    by_epoch = optax.linear_schedule(start, end, transition_steps=epochs)
  elif kind == "cosine":
    by_epoch = optax.cosine_decay_schedule(start, decay_steps=epochs, alpha=end / start)
  else:
    raise UserInputError(
        f"unknown distill.temperature_schedule {kind!r}; "
        f"use one of {', '.join(TEMPERATURE_SCHEDULES)}"
    )
  return lambda step: by_epoch(step // steps_per_epoch)
