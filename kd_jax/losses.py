"""Distillation losses: Hinton et al.'s KD, decoupled KD (DKD) and logit standardisation on
logits; FitNets, attention transfer, ReviewKD's hierarchical context loss and CRD's NCE loss on
intermediate features.

Feature maps are channels-last (B, H, W, C). No gradient reaches the teacher's side of any loss.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Official LS code (sunshangquan/logit-standardization-KD) adds this to the std.
_STANDARDIZE_EPS = 1e-7


def softmax_with_temperature(logits: jax.Array, temperature) -> jax.Array:
  """Softmax of `logits / temperature` over the last axis.

  A temperature above 1 softens the distribution and exposes the teacher's
  "dark knowledge": the relative probabilities of the wrong classes.
  """
  return jax.nn.softmax(logits / temperature, axis=-1)


def cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array, label_smoothing=0.0) -> jax.Array:
  """Mean cross-entropy of integer labels.

  With `label_smoothing` s, the target puts 1 - s on the label and spreads s
  evenly over all classes, as PyTorch's `cross_entropy(label_smoothing=s)`.
  """
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B).mean()
  targets_BxC = optax.smooth_labels(
      jax.nn.one_hot(labels_B, logits_BxC.shape[-1], dtype=logits_BxC.dtype), label_smoothing
  )
  return optax.softmax_cross_entropy(logits_BxC, targets_BxC).mean()


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


def _as_float32(x: jax.Array) -> jax.Array:
  """x in at least float32: feature losses reduce over many elements, bfloat16 features too."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _pooling_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) weights of PyTorch's adaptive average pooling along one axis.

  Output i averages inputs floor(i * size_in / size_out) to ceil((i + 1) * size_in /
  size_out) - 1, so windows overlap where size_out does not divide size_in.
  """
  matrix = np.zeros((size_out, size_in), np.float32)
  for i in range(size_out):
    start, end = (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def _adaptive_avg_pool(x_BxHxWxC: jax.Array, height: int, width: int) -> jax.Array:
  """Average pool of feature maps to (B, height, width, C), as PyTorch's adaptive_avg_pool2d."""
  rows_IxH = _pooling_matrix(x_BxHxWxC.shape[1], height)
  cols_JxW = _pooling_matrix(x_BxHxWxC.shape[2], width)
  return jnp.einsum("ih,bhwc,jw->bijc", rows_IxH, x_BxHxWxC, cols_JxW)


def _check_pairs(student_features: Sequence[jax.Array], teacher_features: Sequence[jax.Array]):
  if len(student_features) != len(teacher_features) or not student_features:
    raise ValueError(
        f"{len(student_features)} student and {len(teacher_features)} teacher feature maps: "
        "a feature loss needs the same number of each, at least one"
    )


def _mse(student: jax.Array, teacher: jax.Array) -> jax.Array:
  if student.shape != teacher.shape:
    raise ValueError(f"student features {student.shape} and teacher features {teacher.shape}")
  return jnp.mean((_as_float32(student) - jax.lax.stop_gradient(_as_float32(teacher))) ** 2)


def fitnet_loss(student_hint: jax.Array, teacher_hint: jax.Array) -> jax.Array:
  """FitNets' hint loss: the mean squared error between the regressed student and teacher hints.

  Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015). The student's guided layer
  must already have passed through the learned regressor, so that both have one shape.
  """
  return _mse(student_hint, teacher_hint)


def _attention_map(features_BxHxWxC: jax.Array, p) -> jax.Array:
  """Mean over channels of |f|^p, flattened to (B, H * W) and L2-normalised per example."""
  map_BxN = jnp.mean(jnp.abs(_as_float32(features_BxHxWxC)) ** p, axis=-1)
  map_BxN = map_BxN.reshape(map_BxN.shape[0], -1)
  # As PyTorch's F.normalize: a norm below 1e-12 divides by 1e-12 (an all-zero map stays 0).
  norm_Bx1 = jnp.linalg.norm(map_BxN, axis=-1, keepdims=True)
  return map_BxN / jnp.maximum(norm_Bx1, 1e-12)


def attention_transfer_loss(
    student_features: Sequence[jax.Array], teacher_features: Sequence[jax.Array], *, p=2.0
) -> jax.Array:
  """Attention transfer: squared differences of normalised attention maps, summed over pairs.

  Zagoruyko and Komodakis, "Paying More Attention to Attention" (ICLR 2017). Per pair of
  feature maps (B, H, W, C), the attention map is the mean over channels of |f|^p, flattened
  and L2-normalised per example; the pair's loss is the mean over examples and positions of
  the squared difference of the two maps. Where the spatial sizes differ, the larger feature
  map is first average-pooled to the smaller's size (RepDistiller's AT). Channel counts may
  differ. The caller multiplies by the method's weight (1000 in RepDistiller).
  """
  _check_pairs(student_features, teacher_features)
  total = 0.0
  for student_BxHxWxC, teacher_BxHxWxC in zip(student_features, teacher_features):
    height = min(student_BxHxWxC.shape[1], teacher_BxHxWxC.shape[1])
    width = min(student_BxHxWxC.shape[2], teacher_BxHxWxC.shape[2])
    if student_BxHxWxC.shape[1:3] != (height, width):
      student_BxHxWxC = _adaptive_avg_pool(_as_float32(student_BxHxWxC), height, width)
    if teacher_BxHxWxC.shape[1:3] != (height, width):
      teacher_BxHxWxC = _adaptive_avg_pool(_as_float32(teacher_BxHxWxC), height, width)
    student_map = _attention_map(student_BxHxWxC, p)
    teacher_map = jax.lax.stop_gradient(_attention_map(teacher_BxHxWxC, p))
    total += jnp.mean((student_map - teacher_map) ** 2)
  return total


# ReviewKD's pyramid: (pooled size, weight) of each level below the full map, whose weight is 1.
_HCL_LEVELS = ((4, 1 / 2), (2, 1 / 4), (1, 1 / 8))


def hierarchical_context_loss(
    student_features: Sequence[jax.Array], teacher_features: Sequence[jax.Array]
) -> jax.Array:
  """ReviewKD's hierarchical context loss (HCL), summed over pairs of equal-shaped maps.

  Chen et al., "Distilling Knowledge via Knowledge Review" (CVPR 2021). Per pair, the mean
  squared error of the maps (weight 1) plus those of their 4x4, 2x2 and 1x1 average pools
  (weights 1/2, 1/4, 1/8; a level only where it is smaller than the map), divided by the sum
  of the weights used. A 1x1 map (a pooled embedding) is its own MSE. For maps of 8x8 or
  larger this is ReviewKD's code; on 4x4 and 2x2 maps ReviewKD gives the levels it keeps
  1/2, 1/4 instead of their own 1/4, 1/8.
  """
  _check_pairs(student_features, teacher_features)
  total = 0.0
  for student_BxHxWxC, teacher_BxHxWxC in zip(student_features, teacher_features):
    loss, weight_sum = _mse(student_BxHxWxC, teacher_BxHxWxC), 1.0
    for size, weight in _HCL_LEVELS:
      if size < min(student_BxHxWxC.shape[1:3]):
        loss += weight * _mse(
            _adaptive_avg_pool(_as_float32(student_BxHxWxC), size, size),
            _adaptive_avg_pool(_as_float32(teacher_BxHxWxC), size, size),
        )
        weight_sum += weight
    total += loss / weight_sum
  return total


def _crd_scores(anchor_BxD: jax.Array, candidates_BxKxD: jax.Array, temperature) -> jax.Array:
  """Inner products of each anchor with its candidates over the temperature, (B, K)."""
  candidates_BxKxD = jax.lax.stop_gradient(_as_float32(candidates_BxKxD))
  return jnp.einsum("bd,bkd->bk", _as_float32(anchor_BxD), candidates_BxKxD) / temperature


def crd_normalizer(
    anchor_BxD: jax.Array, candidates_BxKxD: jax.Array, *, num_data: int, temperature=0.07
) -> jax.Array:
  """CRD's normalisation constant Z: num_data times the mean of exp(<anchor, candidate> / T).

  The Monte Carlo estimate of the partition function over the whole dataset (Wu et al., 2018),
  taken over every anchor-candidate pair of a batch. CRD takes it once, from the first
  batch, and keeps it for the run. No gradient flows through it.
  """
  scores_BxK = _crd_scores(anchor_BxD, candidates_BxKxD, temperature)
  return jax.lax.stop_gradient(num_data * jnp.mean(jnp.exp(scores_BxK)))


def crd_loss(
    anchor_BxD: jax.Array,
    candidates_BxKxD: jax.Array,
    *,
    num_data: int,
    normalizer,
    temperature=0.07,
) -> jax.Array:
  """CRD's NCE loss for one direction of contrast, batch mean.

  Tian et al., "Contrastive Representation Distillation" (ICLR 2020), Eqs. (18)-(19). Each
  anchor (an L2-normalised embedding of one network) has candidates from the memory bank of
  the other network: its own example's entry first (the positive), then N = K - 1 entries of
  other examples drawn as negatives. With P = exp(<anchor, candidate> / temperature) / Z
  (Z = `normalizer`, see `crd_normalizer`) and a dataset of M = `num_data` examples, the
  critic is h = P / (P + N / M), and the loss is -log h(positive) - sum of log(1 - h) over
  the negatives. CRD sums it over both directions (student anchors against the teacher's
  bank, and the reverse). No gradient reaches the candidates.
  """
  scores_BxK = _crd_scores(anchor_BxD, candidates_BxKxD, temperature)
  log_p_BxK = scores_BxK - jnp.log(normalizer)
  log_noise = jnp.log((candidates_BxKxD.shape[1] - 1) / num_data)  # log(N / M)
  # In log space: log h = log P - log(P + N/M), log(1 - h) = log(N/M) - log(P + N/M).
  log_denominator_BxK = jnp.logaddexp(log_p_BxK, log_noise)
  log_h_positive_B = log_p_BxK[:, 0] - log_denominator_BxK[:, 0]
  log_not_h_negatives_B = jnp.sum(log_noise - log_denominator_BxK[:, 1:], axis=-1)
  return -jnp.mean(log_h_positive_B + log_not_h_negatives_B)
