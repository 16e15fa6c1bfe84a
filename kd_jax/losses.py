"""Distillation losses: Hinton et al.'s KD, decoupled KD (DKD) and logit standardisation."""

import jax
import jax.numpy as jnp
import optax

# Official LS code (sunshangquan/logit-standardization-KD) adds this to the std.
_STANDARDIZE_EPS = 1e-7


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


def logit_standardize(logits_BxC: jax.Array) -> jax.Array:
  """Z-score of each row of logits: (z - mean) / (std + 1e-7) over the class axis.

  Sun et al., "Logit Standardization in Knowledge Distillation" (CVPR 2024). The
  std uses Bessel's correction (ddof=1) as torch.std does in the paper's code.
  Standardising lets the student match the teacher's logit relations without
  having to match its logit range.
  """
  mean_Bx1 = logits_BxC.mean(axis=-1, keepdims=True)
  std_Bx1 = logits_BxC.std(axis=-1, ddof=1, keepdims=True)
  return (logits_BxC - mean_Bx1) / (std_Bx1 + _STANDARDIZE_EPS)


def distillation_loss(
    student_logits_BxC: jax.Array,
    teacher_logits_BxC: jax.Array,
    labels_B: jax.Array,
    temperature,
    alpha,
    *,
    logit_standardization: bool = False,
):
  """(1 - alpha) * CE(student, labels) + alpha * T^2 * KL(teacher || student).

  The T^2 factor keeps the soft term's gradients on the same scale as the hard
  term's when T changes (Hinton et al., 2015). No gradient reaches the teacher.
  With `logit_standardization`, both sets of logits pass through
  `logit_standardize` before the KL term; the CE term always sees the raw
  student logits, as in the paper's code.

  Returns:
    (total, parts): the scalar loss to minimise, and a dict with its unweighted
    parts "ce" and "kl" for logging.
  """
  teacher_logits_BxC = jax.lax.stop_gradient(teacher_logits_BxC)
  ce = cross_entropy(student_logits_BxC, labels_B)
  if logit_standardization:
    kl = kl_divergence(
        logit_standardize(teacher_logits_BxC), logit_standardize(student_logits_BxC), temperature
    )
  else:
    kl = kl_divergence(teacher_logits_BxC, student_logits_BxC, temperature)
  total = (1.0 - alpha) * ce + alpha * temperature**2 * kl
  return total, {"ce": ce, "kl": kl}


def _target_and_rest_log_probs(scaled_logits_BxC: jax.Array, is_target_BxC: jax.Array):
  """Log-probabilities for DKD's two views of one softmax.

  Returns:
    (log_b_Bx2, log_rest_BxC): log of the binary distribution [p_target,
    1 - p_target], and log of the softmax over the non-target classes (its
    target entry is finite but meaningless: callers must mask it).
  """
  # Both distributions are shift-invariant. Subtracting the row max first keeps the
  # log-sum-exps below near 0 rather than near the logits' own size: float32
  # rounding of e.g. 1e3 + log(sum) made the error ~20x larger (float64 reference).
  scaled_logits_BxC = scaled_logits_BxC - jax.lax.stop_gradient(
      scaled_logits_BxC.max(axis=-1, keepdims=True)
  )
  target_B = jnp.sum(jnp.where(is_target_BxC, scaled_logits_BxC, 0.0), axis=-1)
  # log(1 - p_target) as a difference of log-sum-exps: in float32, 1 - p_target
  # rounds to 0 once below ~6e-8, while its log (-17 there, far lower for large
  # logits) still carries the TCKD signal.
  rest_lse_B = jax.nn.logsumexp(jnp.where(is_target_BxC, -jnp.inf, scaled_logits_BxC), axis=-1)
  all_lse_B = jnp.logaddexp(target_B, rest_lse_B)
  log_b_Bx2 = jnp.stack([target_B - all_lse_B, rest_lse_B - all_lse_B], axis=-1)
  log_rest_BxC = scaled_logits_BxC - rest_lse_B[:, None]
  return log_b_Bx2, log_rest_BxC


def dkd_loss(
    student_logits_BxC: jax.Array,
    teacher_logits_BxC: jax.Array,
    labels_B: jax.Array,
    *,
    alpha,
    beta,
    temperature,
    logit_standardization: bool = False,
) -> jax.Array:
  """Decoupled KD: alpha * T^2 * TCKD + beta * T^2 * NCKD, batch mean.

  Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022). At temperature T,
  TCKD is KL(b_teacher || b_student) between the binary distributions
  b = [p_target, 1 - p_target], and NCKD is the KL between the teacher's and
  the student's softmax over the non-target classes only. Classic KD is
  TCKD + (1 - p_target_teacher) * NCKD; DKD frees NCKD's weight from the
  teacher's confidence.

  Unlike the official code, which subtracts 1000 from the target logit, the
  target class is masked out exactly, so the loss stays right for logits of any
  size. No gradient reaches the teacher. With `logit_standardization`, both
  sets of logits pass through `logit_standardize` first (Sun et al., 2024).

  Returns:
    The scalar DKD loss; the caller adds cross-entropy and any warm-up factor.
  """
  teacher_logits_BxC = jax.lax.stop_gradient(teacher_logits_BxC)
  if logit_standardization:
    student_logits_BxC = logit_standardize(student_logits_BxC)
    teacher_logits_BxC = logit_standardize(teacher_logits_BxC)
  num_classes = student_logits_BxC.shape[-1]
  is_target_BxC = labels_B[:, None] == jnp.arange(num_classes)
  student_log_b_Bx2, student_log_rest_BxC = _target_and_rest_log_probs(
      student_logits_BxC / temperature, is_target_BxC
  )
  teacher_log_b_Bx2, teacher_log_rest_BxC = _target_and_rest_log_probs(
      teacher_logits_BxC / temperature, is_target_BxC
  )
  tckd_B = optax.losses.kl_divergence_with_log_targets(student_log_b_Bx2, teacher_log_b_Bx2)
  # The target entries are masked after the product, and the teacher's target
  # entry is zeroed before exp so that a dominant target logit cannot overflow
  # it to inf (inf * 0 = NaN survives the mask).
  teacher_log_rest_BxC = jnp.where(is_target_BxC, 0.0, teacher_log_rest_BxC)
  nckd_BxC = jnp.exp(teacher_log_rest_BxC) * (teacher_log_rest_BxC - student_log_rest_BxC)
  nckd_B = jnp.sum(jnp.where(is_target_BxC, 0.0, nckd_BxC), axis=-1)
  return temperature**2 * (alpha * tckd_B + beta * nckd_B).mean()
