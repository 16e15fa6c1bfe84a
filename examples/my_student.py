"""A student of your own for kd_jax: copy this file, change the layers, point kd_jax at it.

kd_jax calls the factory `make_student(num_classes=..., in_channels=..., rngs=...)` and
distils into the flax.nnx.Module it returns. The module maps float32 images
(batch, height, width, channels), already normalised, to logits (batch, num_classes),
and holds only parameters and batch-norm statistics (no dropout random state). From the
repository root:

  PYTHONPATH=examples python launch.py --config=configs/quickstart.py --workdir=/tmp/kd_own \
      --config.student.model=my_student:make_student
"""

import jax
from flax import nnx


class TinyConvNet(nnx.Module):
  """Two strided 3x3 conv-BN-ReLU layers, global average pool, linear."""

  def __init__(self, num_classes: int, in_channels: int, rngs: nnx.Rngs, width: int = 32):
    self.conv1 = nnx.Conv(in_channels, width, kernel_size=(3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(width, rngs=rngs)
    self.conv2 = nnx.Conv(
        width, 2 * width, kernel_size=(3, 3), strides=2, use_bias=False, rngs=rngs
    )
    self.bn2 = nnx.BatchNorm(2 * width, rngs=rngs)
    self.fc = nnx.Linear(2 * width, num_classes, rngs=rngs)

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Logits (B, num_classes) of images (B, H, W, C)."""
    x = nnx.relu(self.bn1(self.conv1(x_BxHxWxC)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.fc(x.mean(axis=(1, 2)))


def make_student(*, num_classes: int, in_channels: int, rngs: nnx.Rngs) -> nnx.Module:
  """The factory kd_jax calls: --config.student.model=my_student:make_student."""
  return TinyConvNet(num_classes, in_channels, rngs)
