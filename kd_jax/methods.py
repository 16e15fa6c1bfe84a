"""Distillation methods: the objective a student step minimises, from config.

  kd   Hinton et al.: (1 - alpha) CE + alpha T^2 KL(teacher || student)
  dkd  decoupled KD (Zhao et al., 2022): dkd_ce_weight CE + w(e) (a TCKD + b NCKD),
       w(e) rising linearly to 1 over the first dkd_warmup_epochs epochs

Either can standardise the logits inside the distillation term (Sun et al.,
2024), and `loss_scale` multiplies the whole objective (logit
standardisation's recipe is CE 1 + KD 9: alpha 0.9 with loss_scale 10).
Every weight that changes over the run is computed from the step number, so
the jitted step never recompiles.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from kd_jax import losses, schedules
from kd_jax.errors import UserInputError

METHODS = ("kd", "dkd")

# objective(student_logits_BxC, teacher_logits_BxC, labels_B, step) -> (loss, parts)
Objective = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict]]


def check(distill_config) -> None:
  """Rejects an unknown method or out-of-range weight before any work is done."""
  if distill_config.method not in METHODS:
    raise UserInputError(
        f"unknown distill.method {distill_config.method!r}; use one of {', '.join(METHODS)}"
    )
  if not 0.0 <= distill_config.alpha <= 1.0:
    raise UserInputError(f"distill.alpha={distill_config.alpha} must lie in [0, 1]")


def make_objective(distill_config, steps_per_epoch: int, epochs: int) -> Objective:
  """The distillation objective of `distill_config` for a run of `epochs`."""
  check(distill_config)
  temperature_fn = schedules.temperature_schedule(distill_config, steps_per_epoch, epochs)
  standardize = distill_config.logit_standardization
  scale = distill_config.loss_scale

  def kd(student_logits_BxC, teacher_logits_BxC, labels_B, step):
    temperature = temperature_fn(step)
    loss, parts = losses.distillation_loss(
        student_logits_BxC,
        teacher_logits_BxC,
        labels_B,
        temperature,
        distill_config.alpha,
        logit_standardization=standardize,
    )
    return scale * loss, {**parts, "temperature": temperature}

  def dkd(student_logits_BxC, teacher_logits_BxC, labels_B, step):
    temperature = temperature_fn(step)
    epoch = step // steps_per_epoch + 1  # 1-based, as in the paper's code
    warmup = jnp.minimum(epoch / distill_config.dkd_warmup_epochs, 1.0)
    ce = losses.cross_entropy(student_logits_BxC, labels_B)
    decoupled = losses.dkd_loss(
        student_logits_BxC,
        teacher_logits_BxC,
        labels_B,
        alpha=distill_config.dkd_alpha,
        beta=distill_config.dkd_beta,
        temperature=temperature,
        logit_standardization=standardize,
    )
    loss = scale * (distill_config.dkd_ce_weight * ce + warmup * decoupled)
    return loss, {"ce": ce, "dkd": decoupled, "temperature": temperature}

  return {"kd": kd, "dkd": dkd}[distill_config.method]


def cross_entropy_objective(student_logits_BxC, teacher_logits_BxC, labels_B, step):
  """Labels only: what the teacher and the baseline minimise."""
  del teacher_logits_BxC, step  # Unused: no teacher.
  return losses.cross_entropy(student_logits_BxC, labels_B), {}
