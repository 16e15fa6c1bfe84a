"""Connector modules of feature distillation: small networks between the student's features
and the teacher's, trained with the student through its optimizer and kept in its
checkpoints, but no part of the exported student.

  HintRegressor     FitNets' regressor from the student's guided layer to the teacher's hint
  ContrastiveHeads  CRD's embedding heads on both networks and its memory of every example
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kd_jax import layers, losses
from kd_jax.errors import UserInputError


class HintRegressor(nnx.Module):
  """FitNets' regressor (RepDistiller's ConvReg): a convolution, batch norm and ReLU.

  The convolution maps the student's channels to the teacher's and its spatial size
  (height s) to the teacher's (height t): a 1x1 convolution where s = t, 3x3 with
  stride 2 where s = 2t, 4x4 transposed with stride 2 where 2s = t, else (s > t) an
  unpadded (1 + s - t) x (1 + s - t) one. The ReLU matches a hint taken after one.
  """

  def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], *, rngs: nnx.Rngs):
    """Creates the regressor.

    Args:
      student_shape: (..., H, W, C) of the student's guided layer.
      teacher_shape: (..., H, W, C) of the teacher's hint layer.
      rngs: random key source for the parameter inits.

    Raises:
      UserInputError: where the student's map is smaller than the teacher's, other than by 2x.
    """
    (s_h, s_w, s_c), (t_h, t_w, t_c) = student_shape[-3:], teacher_shape[-3:]
    if (s_h, s_w) == (t_h, t_w):
      self.conv = nnx.Conv(s_c, t_c, kernel_size=(1, 1), rngs=rngs)
    elif (s_h, s_w) == (2 * t_h, 2 * t_w):
      self.conv = nnx.Conv(
          s_c, t_c, kernel_size=(3, 3), strides=2, padding=((1, 1), (1, 1)), rngs=rngs
      )
    elif (2 * s_h, 2 * s_w) == (t_h, t_w):
      self.conv = nnx.ConvTranspose(
          s_c, t_c, kernel_size=(4, 4), strides=(2, 2), padding="SAME", rngs=rngs
      )
    elif s_h >= t_h and s_w >= t_w:
      kernel = (1 + s_h - t_h, 1 + s_w - t_w)
      self.conv = nnx.Conv(s_c, t_c, kernel_size=kernel, padding="VALID", rngs=rngs)
    else:
      raise UserInputError(
          f"distill.method=fitnet: the student's guided layer is {s_h}x{s_w} and the teacher's "
          f"hint {t_h}x{t_w}; the regressor maps a larger map, an equal one or one half the "
          "size: pick a teacher and student whose stage2 sizes fit"
      )
    self.bn = layers.batch_norm(t_c, rngs=rngs)

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """The student's guided layer regressed to the shape of the teacher's hint."""
    return nnx.relu(self.bn(self.conv(x_BxHxWxC)))


class MemoryBank(nnx.BatchStat):
  """State that a step rewrites but the optimizer does not train (CRD's memories).

  A kind of batch statistic, so it travels, and is checkpointed, with the connectors'
  batch statistics.
  """


# CRD's recipe (Tian et al., 2020; RepDistiller's defaults): embedding size, the memory's
# momentum, and the NCE temperature.
CRD_DIM = 128
CRD_MOMENTUM = 0.5
CRD_TEMPERATURE = 0.07


def l2_normalize(x_BxD: jax.Array) -> jax.Array:
  """Each row divided by its L2 norm, in float32 (RepDistiller's Normalize: no epsilon)."""
  x_BxD = x_BxD.astype(jnp.float32)
  return x_BxD / jnp.sqrt(jnp.sum(x_BxD * x_BxD, axis=-1, keepdims=True))


class ContrastiveHeads(nnx.Module):
  """CRD's connectors (RepDistiller's CRDLoss): two embedding heads and a memory.

  Each head is a linear map of a network's pooled features to CRD_DIM, L2-normalised.
  The memory holds one embedding per training example for each network, drawn uniformly
  from [-b, b] (b = 1 / sqrt(CRD_DIM / 3)) at first; each step contrasts the batch's
  embeddings with the other network's memories and then moves the batch's own memories
  towards its embeddings. The NCE normalisers Z, one per direction, are taken from the
  first step and kept (negative: not taken yet). The heads compute in float32: their
  scores are divided by a temperature of 0.07 and exponentiated.
  """

  def __init__(self, student_dim: int, teacher_dim: int, num_data: int, *, rngs: nnx.Rngs):
    """Creates the heads and a memory of `num_data` examples."""
    self.student_head = nnx.Linear(student_dim, CRD_DIM, rngs=rngs)
    self.teacher_head = nnx.Linear(teacher_dim, CRD_DIM, rngs=rngs)
    bound = 1 / math.sqrt(CRD_DIM / 3)
    memories_2xNxD = jax.random.uniform(
        rngs.params(), (2, num_data, CRD_DIM), minval=-bound, maxval=bound
    )
    self.student_memory = MemoryBank(memories_2xNxD[0])
    self.teacher_memory = MemoryBank(memories_2xNxD[1])
    # Student anchors', teacher anchors'. Strictly float32, as the step returns them: a weak
    # type here would make the step's second call compile it again.
    self.normalizers = MemoryBank(jnp.full((2,), -1.0, jnp.float32))

  def __call__(
      self, student_BxF: jax.Array, teacher_BxF: jax.Array, index_B: jax.Array, negatives_BxN
  ) -> jax.Array:
    """CRD's loss over both directions for a batch, and the memory updated with it.

    Args:
      student_BxF, teacher_BxF: the two networks' pooled features of the batch.
      index_B: each example's row in the memory (its place in the training set).
      negatives_BxN: the rows each example is contrasted with as negatives.
    """
    student_BxD = l2_normalize(self.student_head(student_BxF.astype(jnp.float32)))
    teacher_BxD = l2_normalize(self.teacher_head(teacher_BxF.astype(jnp.float32)))
    rows_BxK = jnp.concatenate([index_B[:, None], negatives_BxN], axis=1)  # the positive first
    student_loss, student_normalizer = _nce(
        student_BxD, self.teacher_memory[...], rows_BxK, self.normalizers[0]
    )
    teacher_loss, teacher_normalizer = _nce(
        teacher_BxD, self.student_memory[...], rows_BxK, self.normalizers[1]
    )
    self.normalizers[...] = jnp.stack([student_normalizer, teacher_normalizer])
    self.student_memory[...] = remember(self.student_memory[...], index_B, student_BxD)
    self.teacher_memory[...] = remember(self.teacher_memory[...], index_B, teacher_BxD)
    return student_loss + teacher_loss


def _nce(anchor_BxD, memory_NxD, rows_BxK, normalizer):
  """CRD's loss of one direction, anchors against their rows of the other network's memory,
  and its normaliser: the one kept, else this batch's."""
  candidates_BxKxD = memory_NxD[rows_BxK]
  given = dict(num_data=memory_NxD.shape[0], temperature=CRD_TEMPERATURE)
  first = losses.crd_normalizer(anchor_BxD, candidates_BxKxD, **given)
  normalizer = jnp.where(normalizer < 0, first, normalizer)
  return losses.crd_loss(anchor_BxD, candidates_BxKxD, normalizer=normalizer, **given), normalizer


def remember(memory_NxD: jax.Array, index_B: jax.Array, embeddings_BxD: jax.Array) -> jax.Array:
  """The memory with the rows `index_B` moved to normalise(m * row + (1 - m) * embedding).

  m = CRD_MOMENTUM. No gradient flows into the memory.
  """
  embeddings_BxD = jax.lax.stop_gradient(embeddings_BxD)
  mixed_BxD = CRD_MOMENTUM * memory_NxD[index_B] + (1 - CRD_MOMENTUM) * embeddings_BxD
  return memory_NxD.at[index_B].set(l2_normalize(mixed_BxD))
