"""Connector modules of feature distillation: small networks between the student's features
and the teacher's, trained with the student through its optimizer and kept in its
checkpoints, but no part of the exported student.

  HintRegressor     FitNets' regressor from the student's guided layer to the teacher's hint
  ContrastiveHeads  CRD's embedding heads on both networks and its memory of every example
  ReviewFusion      ReviewKD's attention-based fusion of the student's stages, deep to shallow
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
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
    # set_value: traced, it costs less than `[...] =` (see layers.BatchNorm).
    self.normalizers.set_value(jnp.stack([student_normalizer, teacher_normalizer]))
    self.student_memory.set_value(remember(self.student_memory[...], index_B, student_BxD))
    self.teacher_memory.set_value(remember(self.teacher_memory[...], index_B, teacher_BxD))
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


# ReviewKD's code caps the fusion's width at 512 channels.
REVIEWKD_MAX_MID_CHANNELS = 512


def _resize_nearest(x_BxHxWxC: jax.Array, height: int, width: int) -> jax.Array:
  """x resized to (B, height, width, C) by nearest neighbour, as PyTorch's mode="nearest".

  Output row i reads input row floor(i * H / height), and likewise the columns.
  """
  rows = np.arange(height) * x_BxHxWxC.shape[1] // height
  cols = np.arange(width) * x_BxHxWxC.shape[2] // width
  return x_BxHxWxC[:, rows][:, :, cols]


class AttentionFusion(nnx.Module):
  """ReviewKD's attention-based fusion (ABF) of one student stage with the deeper stages.

  A 1x1 convolution and batch norm take the stage's features to `mid_channels`. With
  `fuse`, the deeper fusion's mix, resized (nearest) to this stage's size, joins them: a
  1x1 convolution of the two, concatenated, and a sigmoid give two weights per position,
  and the mix is their weighted sum. The mix, resized to `out_size` (the teacher's stage),
  goes on to the next shallower fusion, and through a 3x3 convolution and batch norm to
  `out_channels` (the teacher's) it is this stage's output.
  """

  def __init__(
      self,
      in_channels: int,
      mid_channels: int,
      out_channels: int,
      out_size: Sequence[int],
      *,
      fuse: bool,
      rngs: nnx.Rngs,
  ):
    """Creates the fusion; `fuse` is false for the deepest stage, which has nothing deeper."""
    self.reduce = layers.PointwiseConv(in_channels, mid_channels, rngs=rngs)
    self.reduce_bn = layers.batch_norm(mid_channels, rngs=rngs)
    # A 1x1 convolution with a bias, as a dense layer over the channels.
    self.attention = nnx.Linear(2 * mid_channels, 2, rngs=rngs) if fuse else None
    self.expand = layers.conv3x3(mid_channels, out_channels, rngs=rngs)
    self.expand_bn = layers.batch_norm(out_channels, rngs=rngs)
    self.out_size = tuple(out_size)

  def __call__(
      self, x_BxHxWxC: jax.Array, deeper_mix_BxhxwxM: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """(this stage's output, its mix for the next shallower fusion), both of `out_size`."""
    mix_BxHxWxM = self.reduce_bn(self.reduce(x_BxHxWxC))
    if self.attention is not None:
      deeper_BxHxWxM = _resize_nearest(deeper_mix_BxhxwxM, *mix_BxHxWxM.shape[1:3])
      joint_BxHxWx2M = jnp.concatenate([mix_BxHxWxM, deeper_BxHxWxM], axis=-1)
      own_BxHxWx1, deeper_BxHxWx1 = jnp.split(nnx.sigmoid(self.attention(joint_BxHxWx2M)), 2, -1)
      mix_BxHxWxM = mix_BxHxWxM * own_BxHxWx1 + deeper_BxHxWxM * deeper_BxHxWx1
    mix_BxTxUxM = _resize_nearest(mix_BxHxWxM, *self.out_size)
    return self.expand_bn(self.expand(mix_BxTxUxM)), mix_BxTxUxM


class ReviewFusion(nnx.Module):
  """ReviewKD's student side: one AttentionFusion per stage, run from the deepest up.

  Chen et al., "Distilling Knowledge via Knowledge Review" (CVPR 2021). Each output has the
  shape of its teacher stage; through the mixes, a shallow stage's output draws on the
  deeper stages too (the paper's knowledge review). The mixes are min(512, the deepest
  stage's channels) wide, as in ReviewKD's code.
  """

  def __init__(
      self,
      student_shapes: Sequence[Sequence[int]],
      teacher_shapes: Sequence[Sequence[int]],
      *,
      rngs: nnx.Rngs,
  ):
    """Creates the fusions.

    Args:
      student_shapes: (..., H, W, C) of each student stage, shallowest first.
      teacher_shapes: (..., H, W, C) of the teacher stage each is distilled to.
      rngs: random key source for the parameter inits.
    """
    mid_channels = min(REVIEWKD_MAX_MID_CHANNELS, student_shapes[-1][-1])
    deepest = len(student_shapes) - 1
    self.fusions = nnx.List(
        [
            AttentionFusion(
                student[-1], mid_channels, teacher[-1], teacher[-3:-1], fuse=k < deepest, rngs=rngs
            )
            for k, (student, teacher) in enumerate(zip(student_shapes, teacher_shapes, strict=True))
        ]
    )

  def __call__(self, features: Sequence[jax.Array]) -> list[jax.Array]:
    """The student's stage features (shallowest first) fused, shaped as the teacher's stages."""
    outputs, mix = [], None
    for k in reversed(range(len(self.fusions))):
      output, mix = self.fusions[k](features[k], mix)
      outputs.append(output)
    return outputs[::-1]
