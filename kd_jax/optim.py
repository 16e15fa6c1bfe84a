"""Optimisers from config: Adam, AdamW or SGD, with clipping and weight decay."""

import optax

from kd_jax import schedules
from kd_jax.errors import UserInputError

OPTIMIZERS = ("adam", "adamw", "sgd")


def make_optimizer(
    optimizer_config, steps_per_epoch: int, epochs: int, batch_size: int
) -> optax.GradientTransformation:
  """Builds a stage's optax optimiser from its `optimizer` config.

  `name`: 'adam', 'adamw' or 'sgd' (with `momentum`, optionally `nesterov`).
  `weight_decay` is decoupled for AdamW and an L2 term added to the gradient
  for Adam and SGD, as PyTorch's `weight_decay` argument does. A positive
  `grad_clip_norm` clips the global gradient norm first. `batch_size` is the
  stage's global batch (see `schedules.peak_learning_rate`).
  """
  lr = schedules.learning_rate_schedule(optimizer_config, steps_per_epoch, epochs, batch_size)
  name = optimizer_config.name
  decay = optimizer_config.weight_decay
  if name == "adamw":
    optimizer = optax.adamw(lr, weight_decay=decay)
  elif name in ("adam", "sgd"):
    if name == "adam":
      update = optax.adam(lr)
    else:
      update = optax.sgd(
          lr, momentum=optimizer_config.momentum or None, nesterov=optimizer_config.nesterov
      )
    optimizer = optax.chain(optax.add_decayed_weights(decay), update) if decay else update
  else:
    raise UserInputError(f"unknown optimizer.name {name!r}; use one of {', '.join(OPTIMIZERS)}")
  if optimizer_config.grad_clip_norm > 0:
    optimizer = optax.chain(optax.clip_by_global_norm(optimizer_config.grad_clip_norm), optimizer)
  return optimizer
