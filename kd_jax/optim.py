"""Optimisers from config: Adam, AdamW or SGD, with clipping and weight decay, and lookahead."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from kd_jax import schedules
from kd_jax.errors import UserInputError

OPTIMIZERS = ("adam", "adamw", "sgd")


def make_optimizer(
    optimizer_config,
    steps_per_epoch: int,
    epochs: int,
    batch_size: int,
    norm_biases: optax.Params | None = None,
    whitening_biases: optax.Params | None = None,
) -> optax.GradientTransformation:
  """Builds a stage's optax optimiser from its `optimizer` config.

  `name`: 'adam', 'adamw' or 'sgd' (with `momentum`, optionally `nesterov`).
  `weight_decay` is decoupled for AdamW and an L2 term added to the gradient
  for Adam and SGD, as PyTorch's `weight_decay` argument does. A positive
  `grad_clip_norm` clips the global gradient norm first. `batch_size` is the
  stage's global batch (see `schedules.peak_learning_rate`).

  SGD's `norm_bias_lr_multiplier` multiplies the gradients of the parameters
  that `norm_biases` (a tree of bools shaped as the parameters) marks, before
  weight decay: their learning rate grows by it, their decay per step does not
  (airbench's bias_scaler). A positive `whitening_bias_epochs` stops the
  parameters that `whitening_biases` marks after that many epochs: no update,
  no decay (airbench's whitening_bias_epochs). A positive `lookahead_steps`
  wraps the result in `lookahead`.
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
    if name == "sgd" and optimizer_config.norm_bias_lr_multiplier != 1:
      multiplier = optax.scale(optimizer_config.norm_bias_lr_multiplier)
      optimizer = optax.chain(optax.masked(multiplier, norm_biases), optimizer)
  else:
    raise UserInputError(f"unknown optimizer.name {name!r}; use one of {', '.join(OPTIMIZERS)}")
  if optimizer_config.whitening_bias_epochs > 0:
    last_step = int(optimizer_config.whitening_bias_epochs * steps_per_epoch)
    freeze = optax.scale_by_schedule(lambda count: (count < last_step).astype(jnp.float32))
    optimizer = optax.chain(optimizer, optax.masked(freeze, whitening_biases))
  if optimizer_config.grad_clip_norm > 0:
    optimizer = optax.chain(optax.clip_by_global_norm(optimizer_config.grad_clip_norm), optimizer)
  if optimizer_config.lookahead_steps:
    optimizer = lookahead(
        optimizer,
        optimizer_config.lookahead_steps,
        optimizer_config.lookahead_decay,
        steps_per_epoch,
        epochs,
        int(optimizer_config.lookahead_start_epochs * steps_per_epoch),
    )
  return optimizer


class LookaheadState(NamedTuple):
  """The inner optimiser's state, the averaged ("slow") parameters and the steps taken."""

  inner: optax.OptState
  slow: optax.Params
  count: jax.Array


def lookahead(
    inner: optax.GradientTransformation,
    every: int,
    decay: float,
    steps_per_epoch: int,
    epochs: int,
    start_step: int = 0,
) -> optax.GradientTransformation:
  """airbench's lookahead: every `every` steps the weights jump to a moving average of themselves.

  It starts after `start_step`: the first step k that `every` divides after it
  takes the weights as they are (slow = fast); at each such k after that,
  slow = w slow + (1 - w) fast with w = decay^every (k / total steps)^3, and the
  parameters become slow: early on the average forgets at once, late it holds
  several syncs. Once started, every epoch also ends on the average as it is,
  the last one included, so the trained parameters are the average. Works with
  any `inner`; the slow copy lives in the optimizer state.
  """
  total_steps = steps_per_epoch * epochs

  def init_fn(params):
    # A copy: the train step donates the parameters, which must not share buffers with it.
    slow = jax.tree.map(jnp.copy, params)
    return LookaheadState(inner.init(params), slow, jnp.zeros((), jnp.int32))

  def update_fn(grads, state, params):
    updates, inner_state = inner.update(grads, state.inner, params)
    count = state.count + 1
    started = count > start_step
    at_sync = started & (count % every == 0)
    # The first sync has no average to keep; a sync at an epoch's end alone keeps it whole.
    weight = decay**every * (count / total_steps) ** 3 * (count - every > start_step)
    weight = jnp.where(at_sync, weight, 1.0)
    sync = at_sync | (started & (count % steps_per_epoch == 0))
    fast = optax.apply_updates(params, updates)
    slow = jax.tree.map(
        lambda s, f: jnp.where(sync, weight * s + (1 - weight) * f, s).astype(s.dtype),
        state.slow,
        fast,
    )
    updates = jax.tree.map(lambda u, s, p: jnp.where(sync, s - p, u), updates, slow, params)
    return updates, LookaheadState(inner_state, slow, count)

  return optax.GradientTransformation(init_fn, update_fn)
