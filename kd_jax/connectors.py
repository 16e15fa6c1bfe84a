"""Connector modules of feature distillation: small networks between the student's features
and the teacher's, trained with the student through its optimizer and kept in its
checkpoints, but no part of the exported student.

  HintRegressor  FitNets' regressor from the student's guided layer to the teacher's hint
  ReviewFusion   ReviewKD's attention-based fusion of the student's stages, deep to shallow
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kd_jax import layers
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
