"""Convolution building blocks for the teacher and student models.

All layers take and return channels-last arrays (B, H, W, C) and follow the
PyTorch layer semantics of the reference implementations (padding=1 for 3x3
convolutions, BatchNorm with PyTorch's defaults), so parameter counts and
output shapes match the published models.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kd_jax import ops

# PyTorch's BatchNorm2d defaults; its momentum=0.1 weighs the new batch, Flax's
# momentum weighs the running average, hence 0.9.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# Equals nnx.Conv's default kernel init, so every conv starts the same way.
_KERNEL_INIT = nnx.initializers.lecun_normal()


class BatchNorm(nnx.BatchNorm):
  """nnx.BatchNorm over the last axis, with a hand-written training-mode gradient.

  Same state, statistics and results as nnx.BatchNorm (tests/test_layers.py);
  in training mode it normalises with `ops.normalize_with_batch_stats`.
  """

  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalises x (..., C): with the batch's statistics in training mode, else the running ones."""
    if self.use_running_average:
      return super().__call__(x)
    x, scale, bias = self.promote_dtype((x, self.scale_values(), self.bias[...]), dtype=self.dtype)
    y_NxC, mean_C, var_C = ops.normalize_with_batch_stats(
        x.reshape(-1, x.shape[-1]), scale, bias, self.epsilon
    )
    self._update_running_stats(mean_C, var_C)
    return y_NxC.reshape(x.shape)

  def relu_pool(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """ops.global_avg_pool(relu(self(x))), (B, H, W, C) -> (B, C); fused in training mode.

    For a network's last batch norm: in training mode `ops.normalize_relu_pool` does the
    three in two passes over x, and its gradient in one; the running statistics update as in
    __call__.
    """
    if self.use_running_average:
      return ops.global_avg_pool(nnx.relu(super().__call__(x_BxHxWxC)))
    x, scale, bias = self.promote_dtype(
        (x_BxHxWxC, self.scale_values(), self.bias[...]), dtype=self.dtype
    )
    pooled_BxC, mean_C, var_C = ops.normalize_relu_pool(x, scale, bias, self.epsilon)
    self._update_running_stats(mean_C, var_C)
    return pooled_BxC

  def scale_values(self) -> jax.Array:
    """The per-feature scale: 1 everywhere for a batch norm made with use_scale=False."""
    return self.scale[...] if self.use_scale else jnp.ones_like(self.bias[...])

  def _update_running_stats(self, mean_C: jax.Array, var_C: jax.Array) -> None:
    # As nnx.BatchNorm: the running averages take no gradient.
    mean_C, var_C = jax.lax.stop_gradient((mean_C, var_C))
    # set_value, not `[...] =`: Flax checks an indexed write's sharding, which for a
    # traced value walks the whole program traced so far, so tracing grew quadratically.
    self.mean.set_value(self.momentum * self.mean[...] + (1 - self.momentum) * mean_C)
    self.var.set_value(self.momentum * self.var[...] + (1 - self.momentum) * var_C)


def batch_norm(num_features: int, *, rngs: nnx.Rngs) -> BatchNorm:
  """Returns a BatchNorm with PyTorch's default momentum and epsilon."""
  return BatchNorm(num_features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)


class Conv3x3(nnx.Conv):
  """nnx.Conv with a 3x3 kernel, padding 1 and no bias, as XLA's or oneDNN's convolution.

  Same parameters and results as nnx.Conv (tests/test_layers.py). `convolutions` ("xla"
  unless `use_convolutions` says otherwise) picks nnx.Conv's own convolution or
  `ops.conv3x3_onednn`.
  """

  convolutions = "xla"

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Applies the convolution to channels-last images."""
    if self.convolutions == "onednn":
      x, kernel = self.promote_dtype((x_BxHxWxC, self.kernel[...]), dtype=self.dtype)
      return ops.conv3x3_onednn(x, kernel, self.strides)
    return super().__call__(x_BxHxWxC)


def conv3x3(in_features: int, out_features: int, *, strides: int = 1, rngs: nnx.Rngs) -> Conv3x3:
  """Returns a bias-free 3x3 Conv3x3 padded like PyTorch's padding=1."""
  return Conv3x3(
      in_features,
      out_features,
      kernel_size=(3, 3),
      strides=strides,
      padding=((1, 1), (1, 1)),
      use_bias=False,
      rngs=rngs,
  )


class DepthwiseConv(nnx.Module):
  """Bias-free 3x3 depthwise convolution, one filter per channel, padding 1.

  With `convolutions` "onednn" (see `use_convolutions`) it runs as `ops.conv3x3_onednn`;
  with "xla", as XLA's grouped convolution, except on CPU, where XLA's grouped convolution
  runs 20-40x slower than `ops.depthwise_conv_shifted`, which it takes there.
  """

  convolutions = "xla"

  def __init__(self, channels: int, *, strides: int = 1, rngs: nnx.Rngs):
    """Creates the layer.

    Args:
      channels: number of input (and output) channels.
      strides: spatial stride.
      rngs: random key source for the kernel init.
    """
    self.strides = strides
    # nnx.Conv's layout for feature_group_count=channels.
    self.kernel = nnx.Param(_KERNEL_INIT(rngs.params(), (3, 3, 1, channels)))

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Applies the convolution to channels-last images."""
    # In the input's precision (bfloat16 under mixed precision); the weights stay float32.
    kernel = self.kernel[...].astype(x_BxHxWxC.dtype)
    if self.convolutions == "onednn":
      return ops.conv3x3_onednn(x_BxHxWxC, kernel, self.strides)
    # Chosen when lowering for a platform, so that an exported model holds each platform's own.
    return jax.lax.platform_dependent(
        x_BxHxWxC,
        kernel,
        cpu=functools.partial(ops.depthwise_conv_shifted, stride=self.strides),
        default=functools.partial(ops.conv3x3_lax, stride=self.strides),
    )


# The layers whose convolutions `use_convolutions` sets.
CONV3X3_LAYERS = (Conv3x3, DepthwiseConv)


def use_convolutions(model: nnx.Module, convolutions: str) -> None:
  """Makes every 3x3 convolution layer of `model` run `convolutions`: "xla" or "onednn".

  XLA's own convolutions, or oneDNN's (`kd_jax.native`), which need float32 on CPU; a
  network runs all its layers one way (`kd_jax.network.choose_convolutions` decides).
  """
  for _, module in nnx.iter_modules(model):
    if isinstance(module, CONV3X3_LAYERS):
      module.convolutions = convolutions


_ACTIVATIONS = {None: lambda y: y, "relu": nnx.relu, "relu6": nnx.relu6}


def conv_bn(
    conv: nnx.Module,
    bn: BatchNorm,
    x_BxHxWxC: jax.Array,
    *,
    activation: str | None = None,
    residual: jax.Array | None = None,
) -> jax.Array:
  """activation(bn(conv(x)) (+ residual)): every model's convolution-batch-norm pairs.

  `activation` is None, "relu" or "relu6". In inference with oneDNN's convolutions (a
  Conv3x3 or DepthwiseConv whose `convolutions` is "onednn"), the batch norm is folded into
  the kernel and a bias, and convolution, bias, residual and ReLU run as one
  `ops.conv3x3_bias_onednn` call; otherwise the modules run one after the other.
  """
  if not (
      bn.use_running_average
      and isinstance(conv, CONV3X3_LAYERS)
      and conv.convolutions == "onednn"
  ):
    y = bn(conv(x_BxHxWxC))
    if residual is not None:
      y = y + residual
    return _ACTIVATIONS[activation](y)
  scale_D = bn.scale_values() * jax.lax.rsqrt(bn.var[...] + bn.epsilon)
  kernel = conv.kernel[...] * scale_D
  bias_D = bn.bias[...] - bn.mean[...] * scale_D
  y = ops.conv3x3_bias_onednn(
      x_BxHxWxC, kernel, bias_D, residual, conv.strides, activation is not None
  )
  return jnp.minimum(y, 6.0) if activation == "relu6" else y


class PointwiseConv(nnx.Module):
  """Bias-free 1x1 convolution computed as a matrix product over channels."""

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      strides: int = 1,
      rngs: nnx.Rngs,
  ):
    """Creates the layer.

    Args:
      in_features: number of input channels.
      out_features: number of output channels.
      strides: spatial stride; a 1x1 kernel with stride s just keeps every
        s-th pixel, as PyTorch's Conv2d(kernel_size=1, stride=s) does.
      rngs: random key source for the kernel init.
    """
    self.strides = strides
    # nnx.Conv's kernel layout, so weights convert one-to-one.
    self.kernel = nnx.Param(_KERNEL_INIT(rngs.params(), (1, 1, in_features, out_features)))

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Applies the convolution to channels-last images."""
    s = self.strides
    x_BxHxWxC = x_BxHxWxC[:, ::s, ::s, :]
    batch, height, width, channels = x_BxHxWxC.shape
    kernel_CxD = self.kernel[0, 0].astype(x_BxHxWxC.dtype)  # as DepthwiseConv does
    # A 2-D product over pixels: XLA:CPU then takes the weight gradient straight from the
    # activations, where the 4-D einsum's gradient transposed the output gradient first
    # (student step 199 -> 142 ms, BENCHMARKS.md).
    x_NxC = x_BxHxWxC.reshape(batch * height * width, channels)
    return (x_NxC @ kernel_CxD).reshape(batch, height, width, -1)


class DSConv(nnx.Module):
  """Depthwise-separable block: depthwise-BN-ReLU, then pointwise-BN-ReLU."""

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      strides: int = 1,
      rngs: nnx.Rngs,
  ):
    """Creates the block.

    Args:
      in_features: number of input channels.
      out_features: number of output channels.
      strides: stride of the depthwise convolution.
      rngs: random key source for the parameter inits.
    """
    self.depthwise = DepthwiseConv(in_features, strides=strides, rngs=rngs)
    self.bn1 = batch_norm(in_features, rngs=rngs)
    self.pointwise = PointwiseConv(in_features, out_features, rngs=rngs)
    self.bn2 = batch_norm(out_features, rngs=rngs)

  def __call__(self, x_BxHxWxC: jax.Array, *, pool: bool = False) -> jax.Array:
    """Applies the block to channels-last images; with pool, ends in the global average pool.

    Pooling here, as `bn2.relu_pool`, fuses it with the last batch norm and ReLU.
    """
    x = conv_bn(self.depthwise, self.bn1, x_BxHxWxC, activation="relu")
    if pool:
      return self.bn2.relu_pool(self.pointwise(x))
    return conv_bn(self.pointwise, self.bn2, x, activation="relu")

  def preactivation(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """The block's output before its last ReLU."""
    x = conv_bn(self.depthwise, self.bn1, x_BxHxWxC, activation="relu")
    return conv_bn(self.pointwise, self.bn2, x)


def projection_shortcut(
    in_features: int, out_features: int, *, strides: int, rngs: nnx.Rngs
) -> nnx.Sequential | None:
  """A residual block's shortcut: a strided 1x1 conv + BN when the shape changes.

  None (the identity) otherwise, as in both RepDistiller's and torchvision's ResNets.
  """
  if strides == 1 and in_features == out_features:
    return None
  return nnx.Sequential(
      PointwiseConv(in_features, out_features, strides=strides, rngs=rngs),
      batch_norm(out_features, rngs=rngs),
  )


class BasicBlock(nnx.Module):
  """CIFAR ResNet block: conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, ReLU.

  The shortcut is a strided 1x1 conv + BN when the shape changes, else the
  identity (RepDistiller's models/resnet.py).
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      strides: int = 1,
      rngs: nnx.Rngs,
  ):
    """Creates the block.

    Args:
      in_features: number of input channels.
      out_features: number of output channels.
      strides: stride of the first conv and of the shortcut.
      rngs: random key source for the parameter inits.
    """
    self.conv1 = conv3x3(in_features, out_features, strides=strides, rngs=rngs)
    self.bn1 = batch_norm(out_features, rngs=rngs)
    self.conv2 = conv3x3(out_features, out_features, rngs=rngs)
    self.bn2 = batch_norm(out_features, rngs=rngs)
    self.shortcut = projection_shortcut(in_features, out_features, strides=strides, rngs=rngs)

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Applies the block to channels-last images."""
    return self._apply(x_BxHxWxC, activation="relu")

  def preactivation(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """The block's output before its last ReLU: the last batch norm plus the shortcut."""
    return self._apply(x_BxHxWxC, activation=None)

  def _apply(self, x_BxHxWxC: jax.Array, *, activation: str | None) -> jax.Array:
    # The last ReLU stays inside conv_bn, which fuses it into the convolution where it can.
    out = conv_bn(self.conv1, self.bn1, x_BxHxWxC, activation="relu")
    residual = x_BxHxWxC if self.shortcut is None else conv_bn(*self.shortcut.layers, x_BxHxWxC)
    return conv_bn(self.conv2, self.bn2, out, activation=activation, residual=residual)


class WideBasicBlock(nnx.Module):
  """Pre-activation WRN block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus shortcut.

  As in RepDistiller's models/wrn.py (dropout 0): when the channel count
  changes, the shortcut is a bias-free strided 1x1 conv applied to the
  pre-activated input; otherwise it is the identity on the raw input.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      strides: int = 1,
      rngs: nnx.Rngs,
  ):
    """Creates the block.

    Args:
      in_features: number of input channels.
      out_features: number of output channels.
      strides: stride of the first conv and of the shortcut.
      rngs: random key source for the parameter inits.
    """
    self.bn1 = batch_norm(in_features, rngs=rngs)
    self.conv1 = conv3x3(in_features, out_features, strides=strides, rngs=rngs)
    self.bn2 = batch_norm(out_features, rngs=rngs)
    self.conv2 = conv3x3(out_features, out_features, rngs=rngs)
    if in_features != out_features:
      self.shortcut = PointwiseConv(in_features, out_features, strides=strides, rngs=rngs)
    else:
      self.shortcut = None

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Applies the block to channels-last images."""
    preact = nnx.relu(self.bn1(x_BxHxWxC))
    out = conv_bn(self.conv1, self.bn2, preact, activation="relu")
    out = self.conv2(out)
    residual = x_BxHxWxC if self.shortcut is None else self.shortcut(preact)
    return out + residual


class Bottleneck(nnx.Module):
  """ImageNet ResNet bottleneck (torchvision's, "v1.5"): 1x1-3x3-1x1, plus shortcut.

  conv1x1-BN-ReLU, conv3x3 (strided here, not in the first 1x1)-BN-ReLU,
  conv1x1 to 4x the width-BN, added to the shortcut (a strided 1x1 conv + BN
  when the shape changes, else the identity), ReLU.
  """

  expansion = 4

  def __init__(self, in_features: int, width: int, *, strides: int = 1, rngs: nnx.Rngs):
    """Creates the block.

    Args:
      in_features: number of input channels.
      width: channels of the 3x3 conv; the block outputs 4 x width.
      strides: stride of the 3x3 conv and of the shortcut.
      rngs: random key source for the parameter inits.
    """
    out_features = width * self.expansion
    self.conv1 = PointwiseConv(in_features, width, rngs=rngs)
    self.bn1 = batch_norm(width, rngs=rngs)
    self.conv2 = conv3x3(width, width, strides=strides, rngs=rngs)
    self.bn2 = batch_norm(width, rngs=rngs)
    self.conv3 = PointwiseConv(width, out_features, rngs=rngs)
    self.bn3 = batch_norm(out_features, rngs=rngs)
    self.shortcut = projection_shortcut(in_features, out_features, strides=strides, rngs=rngs)

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Applies the block to channels-last images."""
    return self._apply(x_BxHxWxC, activation="relu")

  def preactivation(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """The block's output before its last ReLU: the last batch norm plus the shortcut."""
    return self._apply(x_BxHxWxC, activation=None)

  def _apply(self, x_BxHxWxC: jax.Array, *, activation: str | None) -> jax.Array:
    out = conv_bn(self.conv1, self.bn1, x_BxHxWxC, activation="relu")
    out = conv_bn(self.conv2, self.bn2, out, activation="relu")
    residual = x_BxHxWxC if self.shortcut is None else conv_bn(*self.shortcut.layers, x_BxHxWxC)
    return conv_bn(self.conv3, self.bn3, out, activation=activation, residual=residual)


class InvertedResidual(nnx.Module):
  """MobileNetV2 block: 1x1 expansion-BN-ReLU6, depthwise 3x3-BN-ReLU6, 1x1 projection-BN.

  No expansion conv when the ratio is 1; the input is added back when the
  block keeps the shape (stride 1, same channels), as in torchvision.
  """

  def __init__(
      self, in_features: int, out_features: int, *, strides: int, expand_ratio: int, rngs: nnx.Rngs
  ):
    """Creates the block.

    Args:
      in_features: number of input channels.
      out_features: number of output channels.
      strides: stride of the depthwise conv.
      expand_ratio: hidden channels / input channels.
      rngs: random key source for the parameter inits.
    """
    hidden = in_features * expand_ratio
    if expand_ratio != 1:
      self.expand = nnx.Sequential(
          PointwiseConv(in_features, hidden, rngs=rngs), batch_norm(hidden, rngs=rngs)
      )
    else:
      self.expand = None
    self.depthwise = DepthwiseConv(hidden, strides=strides, rngs=rngs)
    self.bn = batch_norm(hidden, rngs=rngs)
    self.project = PointwiseConv(hidden, out_features, rngs=rngs)
    self.project_bn = batch_norm(out_features, rngs=rngs)
    self.residual = strides == 1 and in_features == out_features

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Applies the block to channels-last images."""
    out = x_BxHxWxC
    if self.expand is not None:
      out = conv_bn(*self.expand.layers, out, activation="relu6")
    out = conv_bn(self.depthwise, self.bn, out, activation="relu6")
    residual = x_BxHxWxC if self.residual else None
    return conv_bn(self.project, self.project_bn, out, residual=residual)


class WhiteningFilters(nnx.BatchStat):
  """A whitening layer's filters: statistics of the training data, set once and never trained.

  A kind of batch statistic, so they travel with the batch-norm statistics, outside the
  optimiser.
  """


# airbench's regulariser of the patch covariance's eigenvalues.
WHITENING_EPSILON = 5e-4


def whitening_kernel(moment_DxD: np.ndarray, patch: int, epsilon: float = WHITENING_EPSILON):
  """The (patch, patch, C, 2D) kernel that whitens patches whose second moment is `moment_DxD`.

  D = patch * patch * C, a patch flattened as (row, column, channel). Its first D
  filters are the eigenvectors of the moment, largest eigenvalue first, each divided by
  sqrt(eigenvalue + epsilon), so that their outputs are uncorrelated with unit variance;
  the last D are their negatives (after a GELU, both signs of each direction survive).
  """
  eigenvalues_D, eigenvectors_DxD = np.linalg.eigh(np.asarray(moment_DxD, np.float64))
  filters_DxD = eigenvectors_DxD[:, ::-1] / np.sqrt(eigenvalues_D[::-1] + epsilon)
  kernel_Dx2D = np.concatenate([filters_DxD, -filters_DxD], axis=1)
  channels = len(moment_DxD) // (patch * patch)
  return kernel_Dx2D.reshape(patch, patch, channels, -1).astype(np.float32)


def image_patches(x_BxHxWxC: jax.Array, patch: int) -> jax.Array:
  """Every patch x patch window (stride 1, no padding), flattened: (B, windows, patch^2 C).

  Flattened as (row, column, channel), the order of an HWIO kernel's first three axes.
  """
  _, height, width, channels = x_BxHxWxC.shape
  rows, columns = height - patch + 1, width - patch + 1
  shifted = [
      x_BxHxWxC[:, dy : dy + rows, dx : dx + columns, :]
      for dy in range(patch)
      for dx in range(patch)
  ]
  windows_BxRxWxPxC = jnp.stack(shifted, axis=-2)
  return windows_BxRxWxPxC.reshape(x_BxHxWxC.shape[0], rows * columns, -1)


class PatchWhitening(nnx.Module):
  """A network's first layer: a fixed convolution that whitens the image's patches, plus a bias.

  Keller Jordan's airbench: its 2 D filters (D = patch^2 * channels) over patch x patch
  windows, unpadded, come from the training images (`whitening_kernel` of their patches'
  second moment; kd_jax.whitening fits them before training) and stay fixed; the bias
  trains. Until fitted, the filters pass each patch through unchanged (an identity moment).
  """

  def __init__(self, in_channels: int, *, patch: int = 2, rngs: nnx.Rngs):
    """Creates the layer.

    Args:
      in_channels: number of input image channels.
      patch: side of the square windows; the layer outputs 2 * patch^2 * in_channels channels.
      rngs: unused (nothing random to initialise); taken as every layer takes it.
    """
    del rngs
    self.patch = patch
    dims = patch * patch * in_channels
    self.filters = WhiteningFilters(jnp.asarray(whitening_kernel(np.eye(dims), patch)))
    self.bias = nnx.Param(jnp.zeros((2 * dims,), jnp.float32))

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Applies the whitening filters and the bias to channels-last images."""
    kernel = self.filters[...].astype(x_BxHxWxC.dtype)
    y = jax.lax.conv_general_dilated(
        x_BxHxWxC, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + self.bias[...].astype(y.dtype)

  def fit(self, moment_DxD: np.ndarray) -> None:
    """Sets the filters to whiten patches whose second moment is `moment_DxD`."""
    self.filters[...] = jnp.asarray(whitening_kernel(moment_DxD, self.patch))
