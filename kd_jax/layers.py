"""Convolution building blocks for the teacher and student models.

All layers take and return channels-last arrays (B, H, W, C) and follow the
PyTorch layer semantics of the reference implementations (padding=1 for 3x3
convolutions, BatchNorm with PyTorch's defaults), so parameter counts and
output shapes match the published models.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

# PyTorch's BatchNorm2d defaults; its momentum=0.1 weighs the new batch, Flax's
# momentum weighs the running average, hence 0.9.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# Equals nnx.Conv's default kernel init, so every conv starts the same way.
_KERNEL_INIT = nnx.initializers.lecun_normal()


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_with_batch_stats(
    x_NxC: jax.Array, scale_C: jax.Array, bias_C: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Batch normalisation of the rows of x with their own statistics.

  The forward pass is nnx.BatchNorm's in training mode (statistics in at least
  float32, variance as E[x^2] - E[x]^2 clipped at 0); the backward pass is the
  textbook closed form with two reductions, where autodiff of the forward pass
  leaves XLA:CPU about twice the work (BENCHMARKS.md).

  Args:
    x_NxC: the rows to normalise, one column per feature.
    scale_C: per-feature scale.
    bias_C: per-feature bias.
    epsilon: added to the variance.

  Returns:
    (y_NxC in x's dtype, batch mean_C, batch variance_C); the statistics carry
    no gradient (they only feed the running averages).
  """
  return _normalize_forward(x_NxC, scale_C, bias_C, epsilon)[0]


def _normalize_forward(x_NxC, scale_C, bias_C, epsilon):
  x32_NxC = x_NxC.astype(jnp.promote_types(x_NxC.dtype, jnp.float32))
  mean_C = x32_NxC.mean(axis=0)
  var_C = jnp.maximum(0.0, jnp.mean(x32_NxC * x32_NxC, axis=0) - mean_C * mean_C)
  inv_std_C = jax.lax.rsqrt(var_C + epsilon)
  y_NxC = ((x32_NxC - mean_C) * (inv_std_C * scale_C) + bias_C).astype(x_NxC.dtype)
  return (y_NxC, mean_C, var_C), (x_NxC, mean_C, inv_std_C, scale_C)


def _normalize_backward(epsilon, residuals, cotangents):
  del epsilon  # only in inv_std
  x_NxC, mean_C, inv_std_C, scale_C = residuals
  # The statistics' cotangents are zero: they only feed the running averages.
  dy_NxC = cotangents[0].astype(mean_C.dtype)
  x_hat_NxC = (x_NxC.astype(mean_C.dtype) - mean_C) * inv_std_C
  dbias_C = dy_NxC.sum(axis=0)
  dscale_C = (dy_NxC * x_hat_NxC).sum(axis=0)
  rows = x_NxC.shape[0]
  dx_NxC = (scale_C * inv_std_C) * (dy_NxC - dbias_C / rows - x_hat_NxC * (dscale_C / rows))
  return (
      dx_NxC.astype(x_NxC.dtype),
      dscale_C.astype(scale_C.dtype),
      dbias_C.astype(scale_C.dtype),
  )


normalize_with_batch_stats.defvjp(_normalize_forward, _normalize_backward)


class BatchNorm(nnx.BatchNorm):
  """nnx.BatchNorm over the last axis, with a hand-written training-mode gradient.

  Same state, statistics and results as nnx.BatchNorm (tests/test_layers.py);
  in training mode it normalises with `normalize_with_batch_stats`.
  """

  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalises x (..., C): with the batch's statistics in training mode, else the running ones."""
    if self.use_running_average:
      return super().__call__(x)
    x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
    y_NxC, mean_C, var_C = normalize_with_batch_stats(
        x.reshape(-1, x.shape[-1]), scale, bias, self.epsilon
    )
    # As nnx.BatchNorm: the running averages take no gradient.
    mean_C, var_C = jax.lax.stop_gradient((mean_C, var_C))
    self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * mean_C
    self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * var_C
    return y_NxC.reshape(x.shape)


def batch_norm(num_features: int, *, rngs: nnx.Rngs) -> BatchNorm:
  """Returns a BatchNorm with PyTorch's default momentum and epsilon."""
  return BatchNorm(num_features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)


def global_avg_pool(x_BxHxWxC: jax.Array) -> jax.Array:
  """Mean over the spatial axes, (B, H, W, C) -> (B, C), accumulated in at least float32.

  The models pool with it where RepDistiller's AvgPool2d(8) assumes 32x32 inputs.
  """
  return _spatial_mean(x_BxHxWxC, x_BxHxWxC.shape[1:3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _spatial_mean(x_BxHxWxC: jax.Array, height_width: tuple[int, int]) -> jax.Array:
  height, width = height_width
  x32 = x_BxHxWxC.astype(jnp.promote_types(x_BxHxWxC.dtype, jnp.float32))
  # Rows as explicit adds, which XLA:CPU fuses into one pass with what produced x; its
  # reduction over the two middle axes ran at a third of that speed (BENCHMARKS.md).
  rows_BxWxC = sum(x32[:, h] for h in range(height))
  return (rows_BxWxC.sum(axis=1) / (height * width)).astype(x_BxHxWxC.dtype)


def _spatial_mean_forward(x_BxHxWxC, height_width):
  return _spatial_mean(x_BxHxWxC, height_width), None


def _spatial_mean_backward(height_width, _, dy_BxC):
  height, width = height_width
  batch, channels = dy_BxC.shape
  # The broadcast autodiff of a mean would give; autodiff of the row sum pads each row.
  dx = jnp.broadcast_to(
      dy_BxC[:, None, None, :] / (height * width), (batch, height, width, channels)
  )
  return (dx.astype(dy_BxC.dtype),)


_spatial_mean.defvjp(_spatial_mean_forward, _spatial_mean_backward)


def _pad_hw(x_BxHxWxC: jax.Array) -> jax.Array:
  return jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))


def _conv3x3_lax(x_BxHxWxC: jax.Array, kernel_3x3xCxD: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x_BxHxWxC,
      kernel_3x3xCxD,
      window_strides=(1, 1),
      padding=((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )


# Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional
# Neural Networks", 2016): output tile = A^T [(G g G^T) * (B^T d B)] A for each 4x4 input
# tile d and 3x3 filter g, 16 products per 2x2 outputs instead of 36.
_WINOGRAD_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_WINOGRAD_AT = ((1, 1, 1, 0), (0, 1, -1, -1))


def _combine(coefficients: tuple[int, ...], terms: list[jax.Array]) -> jax.Array:
  """sum_i coefficients[i] * terms[i], skipping the zero coefficients."""
  return sum(c * t for c, t in zip(coefficients, terms) if c)


@jax.custom_vjp
def conv3x3_winograd(x_BxHxWxC: jax.Array, kernel_3x3xCxD: jax.Array) -> jax.Array:
  """3x3 convolution, stride 1, padding 1, by Winograd's F(2x2, 3x3).

  The sixteen products per tile are sixteen matrix products over all tiles at once, and the
  input and output transforms sums of strided slices that XLA fuses into single passes. On
  XLA:CPU this beats its 3x3 convolution from 32 channels on (which keeps to one core here);
  with 16 or fewer channels the products are too narrow (BENCHMARKS.md). The backward pass
  is XLA's own convolution gradient: autodiff through the transforms was slower.

  Args:
    x_BxHxWxC: input images; H and W even.
    kernel_3x3xCxD: the filters, HWIO.

  Returns:
    The convolved images (B, H, W, D), equal to XLA's convolution up to float rounding.
  """
  batch, height, width, channels = x_BxHxWxC.shape
  tiles_shape = (batch, height // 2, width // 2)
  x_pad = _pad_hw(x_BxHxWxC)
  # d[r][c][b, p, q] = x_pad[b, 2p + r, 2q + c]: element (r, c) of every 4x4 input tile.
  d = [[x_pad[:, r : r + height : 2, c : c + width : 2, :] for c in range(4)] for r in range(4)]
  bt_d = [
      [_combine(_WINOGRAD_BT[i], [d[r][c] for r in range(4)]) for c in range(4)] for i in range(4)
  ]
  # The filter transform G g G^T as sums too: as an einsum XLA:CPU ran it as slow, oddly laid
  # out matrix products.
  g_rows = [_combine(_WINOGRAD_G[i], [kernel_3x3xCxD[r] for r in range(3)]) for i in range(4)]
  filters = [
      [_combine(_WINOGRAD_G[j], [g_rows[i][s] for s in range(3)]) for j in range(4)]
      for i in range(4)
  ]
  products = [
      [
          (_combine(_WINOGRAD_BT[j], bt_d[i]).reshape(-1, channels) @ filters[i][j]).reshape(
              *tiles_shape, -1
          )
          for j in range(4)
      ]
      for i in range(4)
  ]
  at_m = [
      [_combine(_WINOGRAD_AT[a], [products[i][j] for i in range(4)]) for j in range(4)]
      for a in range(2)
  ]
  outputs = [_combine(_WINOGRAD_AT[b], at_m[a]) for a in range(2) for b in range(2)]
  # out[:, 2p + a, 2q + b] = outputs[2a + b][:, p, q]; the transpose fuses with the sums above.
  outputs_2x2xBxPxQxD = jnp.stack(outputs).reshape(2, 2, *outputs[0].shape)
  return outputs_2x2xBxPxQxD.transpose(2, 3, 0, 4, 1, 5).reshape(batch, height, width, -1)


def _conv3x3_winograd_forward(x_BxHxWxC, kernel_3x3xCxD):
  return conv3x3_winograd(x_BxHxWxC, kernel_3x3xCxD), (x_BxHxWxC, kernel_3x3xCxD)


def _conv3x3_winograd_backward(residuals, dy_BxHxWxD):
  _, conv_vjp = jax.vjp(_conv3x3_lax, *residuals)
  return conv_vjp(dy_BxHxWxD)


conv3x3_winograd.defvjp(_conv3x3_winograd_forward, _conv3x3_winograd_backward)


# Output tiles from which kd_jax takes Winograd's form on CPU (batch 128 at 8x8). Below, a
# layer saves at most ~1 ms per step for ~0.17 s more compile time, which small problems
# (evaluation batches, short runs, tests) do not earn back (BENCHMARKS.md).
_WINOGRAD_MIN_TILES = 2048


class Conv3x3(nnx.Conv):
  """nnx.Conv with a 3x3 kernel, padding 1 and no bias; on CPU, Winograd's where it pays.

  Same parameters and results as nnx.Conv (tests/test_layers.py). On CPU, float32
  convolutions at stride 1 with even height and width, more than 16 channels in or out and
  at least _WINOGRAD_MIN_TILES 2x2 output tiles run as `conv3x3_winograd`.
  """

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Applies the convolution to channels-last images."""
    x, kernel = self.promote_dtype((x_BxHxWxC, self.kernel[...]), dtype=self.dtype)
    batch, height, width, _ = x.shape
    if (
        self.strides in (1, (1, 1))
        and x.dtype == jnp.float32
        and height % 2 == 0
        and width % 2 == 0
        and max(self.in_features, self.out_features) > 16
        and batch * (height // 2) * (width // 2) >= _WINOGRAD_MIN_TILES
    ):
      # Chosen when lowering for a platform, so that an exported model takes each
      # platform's own (the TensorFlow and JAX exports hold CPU and CUDA).
      return jax.lax.platform_dependent(x, kernel, cpu=conv3x3_winograd, default=_conv3x3_lax)
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


def _shifted_sum(
    x_pad: jax.Array, kernel_3x3xC: jax.Array, stride: int, out_h: int, out_w: int
) -> jax.Array:
  """sum_{i,j} x_pad[:, h*s + i, w*s + j, :] * kernel[i, j] for each output pixel (h, w)."""

  def tap(i, j):
    rows = slice(i, i + (out_h - 1) * stride + 1, stride)
    cols = slice(j, j + (out_w - 1) * stride + 1, stride)
    return x_pad[:, rows, cols, :] * kernel_3x3xC[i, j]

  return sum(tap(i, j) for i in range(3) for j in range(3))


@jax.custom_vjp
def _depthwise_stride1(x_BxHxWxC: jax.Array, kernel_3x3xC: jax.Array) -> jax.Array:
  _, height, width, _ = x_BxHxWxC.shape
  return _shifted_sum(_pad_hw(x_BxHxWxC), kernel_3x3xC, 1, height, width)


def _depthwise_stride1_forward(x_BxHxWxC, kernel_3x3xC):
  return _depthwise_stride1(x_BxHxWxC, kernel_3x3xC), (x_BxHxWxC, kernel_3x3xC)


def _depthwise_stride1_backward(residuals, dy_BxHxWxC):
  x_BxHxWxC, kernel_3x3xC = residuals
  _, height, width, _ = x_BxHxWxC.shape
  # The transposed convolution as the same shifted sum over the padded cotangent with
  # the kernel flipped. Autodiff's transpose instead pads each tap's cotangent and adds
  # the nine, and XLA:CPU fused the batch-norm backward into every one of them.
  dy_pad = _pad_hw(dy_BxHxWxC)
  dx_BxHxWxC = _shifted_sum(dy_pad, kernel_3x3xC[::-1, ::-1], 1, height, width)
  dkernel_3x3xC = _depthwise_kernel_gradient(_pad_hw(x_BxHxWxC), dy_BxHxWxC)
  return dx_BxHxWxC, dkernel_3x3xC


# Rows of a depthwise kernel-gradient tap summed in one elementwise pass; a divisor of the
# height, so at most this many (static) slices per tap.
_MAX_ROWS_PER_PASS = 16


def _depthwise_kernel_gradient(x_pad: jax.Array, dy_BxHxWxC: jax.Array) -> jax.Array:
  """dk[i, j, c] = sum_{b,h,w} x_pad[b, h + i, w + j, c] * dy[b, h, w, c] for a 3x3 kernel.

  Each tap first sums groups of rows with explicit adds of row slices, which XLA:CPU fuses
  into one pass that reads x_pad in place, and only then reduces what is left. Reducing
  each tap's full product directly made XLA:CPU copy out each shifted slice of x_pad for
  the reduction (eight copies of the layer's input per layer; BENCHMARKS.md).
  """
  _, height, width, channels = dy_BxHxWxC.shape
  rows = max(k for k in range(1, _MAX_ROWS_PER_PASS + 1) if height % k == 0)

  def tap_partial_sums(i, j):
    # Row h = q * rows + r of the tap's product lands in partial sum q.
    return sum(
        x_pad[:, i + r : i + r + height : rows, j : j + width, :] * dy_BxHxWxC[:, r::rows]
        for r in range(rows)
    )

  partial_sums = jnp.stack([tap_partial_sums(i, j) for i in range(3) for j in range(3)], axis=1)
  return partial_sums.sum(axis=(0, 2, 3)).reshape(3, 3, channels)


_depthwise_stride1.defvjp(_depthwise_stride1_forward, _depthwise_stride1_backward)


def depthwise_conv_shifted(
    x_BxHxWxC: jax.Array, kernel_3x3x1xC: jax.Array, stride: int
) -> jax.Array:
  """3x3 depthwise convolution (padding 1) as nine shifted multiply-adds.

  Computes out[h, w] = sum_{i,j} pad(x)[h*s + i, w*s + j] * k[i, j] per
  channel. On CPU this is far faster than XLA's grouped convolution, forward
  and backward; at stride 1 the backward pass is written out (the transposed
  shifted sum, and the kernel gradient from row-wise partial sums).

  Args:
    x_BxHxWxC: input images.
    kernel_3x3x1xC: one 3x3 filter per channel.
    stride: spatial stride (same in both directions).

  Returns:
    The convolved images, shape (B, (H-1)//stride + 1, (W-1)//stride + 1, C).
  """
  kernel_3x3xC = kernel_3x3x1xC[:, :, 0]
  if stride == 1:
    return _depthwise_stride1(x_BxHxWxC, kernel_3x3xC)
  _, height, width, _ = x_BxHxWxC.shape
  out_h = (height - 1) // stride + 1
  out_w = (width - 1) // stride + 1
  return _shifted_sum(_pad_hw(x_BxHxWxC), kernel_3x3xC, stride, out_h, out_w)


def depthwise_conv_grouped(
    x_BxHxWxC: jax.Array, kernel_3x3x1xC: jax.Array, stride: int
) -> jax.Array:
  """3x3 depthwise convolution (padding 1) as an XLA grouped convolution.

  Same result as `depthwise_conv_shifted`; the faster choice on accelerators.

  Args:
    x_BxHxWxC: input images.
    kernel_3x3x1xC: one 3x3 filter per channel.
    stride: spatial stride (same in both directions).

  Returns:
    The convolved images, shape (B, (H-1)//stride + 1, (W-1)//stride + 1, C).
  """
  return jax.lax.conv_general_dilated(
      x_BxHxWxC,
      kernel_3x3x1xC,
      window_strides=(stride, stride),
      padding=((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x_BxHxWxC.shape[-1],
  )


class DepthwiseConv(nnx.Module):
  """Bias-free 3x3 depthwise convolution, one filter per channel, padding 1."""

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
    # XLA's CPU grouped convolution is ~40x slower than the shifted sum. The choice is made
    # when lowering for a platform, so that an exported model takes each platform's own.
    return jax.lax.platform_dependent(
        x_BxHxWxC,
        kernel,
        cpu=functools.partial(depthwise_conv_shifted, stride=self.strides),
        default=functools.partial(depthwise_conv_grouped, stride=self.strides),
    )


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

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Applies the block to channels-last images."""
    x = nnx.relu(self.bn1(self.depthwise(x_BxHxWxC)))
    return nnx.relu(self.bn2(self.pointwise(x)))


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
    out = nnx.relu(self.bn1(self.conv1(x_BxHxWxC)))
    out = self.bn2(self.conv2(out))
    residual = x_BxHxWxC if self.shortcut is None else self.shortcut(x_BxHxWxC)
    return nnx.relu(out + residual)


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
    out = nnx.relu(self.bn2(self.conv1(preact)))
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
    out = nnx.relu(self.bn1(self.conv1(x_BxHxWxC)))
    out = nnx.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    residual = x_BxHxWxC if self.shortcut is None else self.shortcut(x_BxHxWxC)
    return nnx.relu(out + residual)


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
    out = x_BxHxWxC if self.expand is None else nnx.relu6(self.expand(x_BxHxWxC))
    out = nnx.relu6(self.bn(self.depthwise(out)))
    out = self.project_bn(self.project(out))
    return x_BxHxWxC + out if self.residual else out
