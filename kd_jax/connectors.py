"""Connector modules of feature distillation: small networks between the student's features
and the teacher's, trained with the student through its optimizer and kept in its
checkpoints, but no part of the exported student.

  HintRegressor  FitNets' regressor from the student's guided layer to the teacher's hint
"""

from collections.abc import Sequence

import jax
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
