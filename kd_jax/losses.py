"""Distillation losses: Hinton et al.'s temperature-scaled KL plus cross-entropy."""

import jax
import jax.numpy as jnp
import optax


def softmax_with_temperature(logits: jax.Array, temperature) -> jax.Array:
  """Softmax of `logits / temperature` over the last axis.

  A temperature above 1 softens the distribution and exposes the teacher's
  "dark knowledge": the relative probabilities of the wrong classes.
  """
  return jax.nn.softmax(logits / temperature, axis=-1)


def cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
  """Mean cross-entropy of integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B).mean()


def kl_divergence(
    teacher_logits_BxC: jax.Array, student_logits_BxC: jax.Array, temperature
) -> jax.Array:
  """KL(softmax(teacher/T) || softmax(student/T)), summed over classes, batch mean.

  The same as PyTorch's `kl_div(log_softmax(s/T), softmax(t/T), 'batchmean')`.
  Working in log space keeps it finite for logits of any size.
  """
  student_log_probs = jax.nn.log_softmax(student_logits_BxC / temperature, axis=-1)
  teacher_log_probs = jax.nn.log_softmax(teacher_logits_BxC / temperature, axis=-1)
  return optax.losses.kl_divergence_with_log_targets(student_log_probs, teacher_log_probs).mean()


def distillation_loss(
    student_logits_BxC: jax.Array,
    teacher_logits_BxC: jax.Array,
    labels_B: jax.Array,
    temperature,
    alpha,
):
  """(1 - alpha) * CE(student, labels) + alpha * T^2 * KL(teacher || student).

  The T^2 factor keeps the soft term's gradients on the same scale as the hard
  term's when T changes (Hinton et al., 2015). No gradient reaches the teacher.

  Returns:
    (total, parts): the scalar loss to minimise, and a dict with its unweighted
    parts "ce" and "kl" for logging.
  """
  teacher_logits_BxC = jax.lax.stop_gradient(teacher_logits_BxC)
  ce = cross_entropy(student_logits_BxC, labels_B)
  kl = kl_divergence(teacher_logits_BxC, student_logits_BxC, temperature)
  total = (1.0 - alpha) * ce + alpha * temperature**2 * kl
  return total, {"ce": ce, "kl": kl}
