"""Array functions under kd_jax's layers, in the forms XLA:CPU runs fastest.

Batch normalisation (alone or fused with ReLU and the pool), the global average pool, and
the 3x3 convolution (dense or grouped, depthwise included) two ways: XLA's own, and
oneDNN's (`kd_jax.native`, CPU only), with, for inference, a folded batch norm's bias, a
residual and ReLU in the same oneDNN call; and the depthwise convolution as shifted
multiply-adds, the form XLA:CPU runs where oneDNN is not used. Most have a written gradient
(BENCHMARKS.md says why each looks as it does). Each equals its plain formulation in values
and gradients (tests/test_ops.py, tests/test_layers.py). Channels-last arrays throughout.
And `after`, which orders two computations XLA would otherwise run at once.
"""

import functools

import jax
import jax.numpy as jnp

from kd_jax import native


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
  return _normalize_gradients(dy_NxC, x_hat_NxC, inv_std_C, scale_C, dbias_C, dscale_C, x_NxC.dtype)


def _normalize_gradients(dy, x_hat, inv_std_C, scale_C, dbias_C, dscale_C, x_dtype):
  """(dx, dscale, dbias) of batch norm from dy at its output and dy's two sums over the rows.

  dbias_C = sum(dy) and dscale_C = sum(dy * x_hat) over all rows (every axis but the last).
  """
  rows = dy.size // dy.shape[-1]
  dx = (scale_C * inv_std_C) * (dy - dbias_C / rows - x_hat * (dscale_C / rows))
  return dx.astype(x_dtype), dscale_C.astype(scale_C.dtype), dbias_C.astype(scale_C.dtype)


normalize_with_batch_stats.defvjp(_normalize_forward, _normalize_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_relu_pool(
    x_BxHxWxC: jax.Array, scale_C: jax.Array, bias_C: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """global_avg_pool(relu(batch norm of x with its own statistics)), fused.

  A network's last batch norm, ReLU and pool, as `normalize_with_batch_stats`, ReLU and
  `global_avg_pool` compute them. Fused, one pass over x takes the batch statistics and
  one more pools, counting each image's active units per channel and summing their
  normalised inputs on the way; from those the gradient needs one pass over x, where
  autodiff through the three took six over x-sized arrays (BENCHMARKS.md).

  Args:
    x_BxHxWxC: the batch norm's input.
    scale_C: per-channel scale.
    bias_C: per-channel bias.
    epsilon: added to the variance.

  Returns:
    (pooled_BxC in x's dtype, batch mean_C, batch variance_C); the statistics carry no
    gradient (they only feed the running averages).
  """
  return _normalize_relu_pool_forward(x_BxHxWxC, scale_C, bias_C, epsilon)[0]


def _sums_over_height(*terms_BxHxWxC: jax.Array) -> list[jax.Array]:
  """Each term summed over its height axis, (B, W, C) each, in one variadic reduction.

  XLA:CPU runs it as one pass over the terms' common inputs, where reductions apart (or
  YNNPACK's) each read them again, and one over height and width at once ran a third
  slower (BENCHMARKS.md). Fed by a matrix product, which it cannot fuse; XLA:CPU would fuse
  a cheaper producer into it, and a depthwise convolution recomputed there was slower.
  """
  zero = jnp.zeros((), terms_BxHxWxC[0].dtype)
  return list(
      jax.lax.reduce(
          terms_BxHxWxC,
          (zero,) * len(terms_BxHxWxC),
          lambda a, b: tuple(u + v for u, v in zip(a, b)),
          (1,),
      )
  )


def _normalize_relu_pool_forward(x_BxHxWxC, scale_C, bias_C, epsilon):
  batch, height, width, _ = x_BxHxWxC.shape
  x32 = x_BxHxWxC.astype(jnp.promote_types(x_BxHxWxC.dtype, jnp.float32))
  rows = batch * height * width
  # The batch statistics as _normalize_forward computes them, from one pass.
  sum_C, sum_of_squares_C = (s.sum(axis=(0, 1)) for s in _sums_over_height(x32, x32 * x32))
  mean_C = sum_C / rows
  var_C = jnp.maximum(0.0, sum_of_squares_C / rows - mean_C * mean_C)
  inv_std_C = jax.lax.rsqrt(var_C + epsilon)
  x_hat = (x32 - mean_C) * inv_std_C
  relu = jnp.maximum(x_hat * scale_C + bias_C, 0.0)
  active = (relu > 0).astype(relu.dtype)
  relu_sum_BxC, active_BxC, active_x_hat_BxC = (
      s.sum(axis=1) for s in _sums_over_height(relu, active, active * x_hat)
  )
  pooled_BxC = (relu_sum_BxC / (height * width)).astype(x_BxHxWxC.dtype)
  residuals = (x_BxHxWxC, mean_C, inv_std_C, scale_C, bias_C, active_BxC, active_x_hat_BxC)
  return (pooled_BxC, mean_C, var_C), residuals


def _normalize_relu_pool_backward(epsilon, residuals, cotangents):
  del epsilon  # only in inv_std
  x_BxHxWxC, mean_C, inv_std_C, scale_C, bias_C, active_BxC, active_x_hat_BxC = residuals
  _, height, width, _ = x_BxHxWxC.shape
  # The gradient reaching each unit through the pool, before the ReLU's mask.
  dpool_BxC = cotangents[0].astype(mean_C.dtype) / (height * width)
  # The sums over all rows of the masked gradient and of it times x_hat, by image.
  dbias_C = (dpool_BxC * active_BxC).sum(axis=0)
  dscale_C = (dpool_BxC * active_x_hat_BxC).sum(axis=0)
  x_hat = (x_BxHxWxC.astype(mean_C.dtype) - mean_C) * inv_std_C
  dy = jnp.where(x_hat * scale_C + bias_C > 0, dpool_BxC[:, None, None, :], 0.0)
  return _normalize_gradients(dy, x_hat, inv_std_C, scale_C, dbias_C, dscale_C, x_BxHxWxC.dtype)


normalize_relu_pool.defvjp(_normalize_relu_pool_forward, _normalize_relu_pool_backward)


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


def conv3x3_lax(x_BxHxWxC: jax.Array, kernel_3x3xKxD: jax.Array, stride: int = 1) -> jax.Array:
  """3x3 convolution, padding 1, as XLA's convolution.

  The kernel is HWIO with K = C / G input channels for G groups (XLA's
  feature_group_count): K = C is a dense convolution, K = 1 a depthwise one.
  """
  return jax.lax.conv_general_dilated(
      x_BxHxWxC,
      kernel_3x3xKxD,
      window_strides=(stride, stride),
      padding=((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x_BxHxWxC.shape[-1] // kernel_3x3xKxD.shape[2],
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_onednn(x_BxHxWxC: jax.Array, kernel_3x3xKxD: jax.Array, stride: int) -> jax.Array:
  """3x3 convolution, padding 1, float32, by oneDNN on CPU (`kd_jax.native`), gradients too.

  On the teacher's layers oneDNN ran 1.4-4x faster than XLA:CPU's convolution, and
  on the student's depthwise layers forward and backward 3-4x faster than
  `depthwise_conv_shifted` (BENCHMARKS.md). Only where `native.available()`, on CPU.

  Args:
    x_BxHxWxC: input images.
    kernel_3x3xKxD: the filters, HWIO, grouped as in `conv3x3_lax`.
    stride: the same along height and width.

  Returns:
    The convolved images, equal to XLA's convolution up to float rounding.
  """
  return native.conv3x3(x_BxHxWxC, kernel_3x3xKxD, stride)


def _conv3x3_onednn_forward(x_BxHxWxC, kernel_3x3xKxD, stride):
  return conv3x3_onednn(x_BxHxWxC, kernel_3x3xKxD, stride), (x_BxHxWxC, kernel_3x3xKxD)


def _conv3x3_onednn_backward(stride, residuals, dy):
  x_BxHxWxC, kernel_3x3xKxD = residuals
  return (
      native.conv3x3_input_gradient(dy, kernel_3x3xKxD, x_BxHxWxC.shape, stride),
      native.conv3x3_kernel_gradient(x_BxHxWxC, dy, kernel_3x3xKxD.shape, stride),
  )


conv3x3_onednn.defvjp(_conv3x3_onednn_forward, _conv3x3_onednn_backward)


def conv3x3_bias_lax(
    x_BxHxWxC: jax.Array,
    kernel_3x3xKxD: jax.Array,
    bias_D: jax.Array,
    residual: jax.Array | None,
    stride: int,
    relu: bool,
) -> jax.Array:
  """conv3x3_lax(x, kernel, stride) + bias (+ residual), then ReLU if `relu`.

  A convolution followed by an inference-mode batch norm folded into its kernel and
  bias, as in a residual block; XLA's operations.
  """
  y = conv3x3_lax(x_BxHxWxC, kernel_3x3xKxD, stride) + bias_D
  if residual is not None:
    y = y + residual
  return jax.nn.relu(y) if relu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def conv3x3_bias_onednn(
    x_BxHxWxC: jax.Array,
    kernel_3x3xKxD: jax.Array,
    bias_D: jax.Array,
    residual: jax.Array | None,
    stride: int,
    relu: bool,
) -> jax.Array:
  """`conv3x3_bias_lax` as one oneDNN call (`kd_jax.native`), float32, on CPU.

  Bias, residual and ReLU are applied as the convolution writes its output, which saves a
  pass over it per layer (a frozen teacher's forward pass ran ~15% faster, BENCHMARKS.md).
  Meant for inference; differentiated, it takes the ReLU's mask from its own output and
  XLA's gradient of the rest. Only where `native.available()`, on CPU.
  """
  return native.conv3x3_inference(x_BxHxWxC, kernel_3x3xKxD, bias_D, residual, stride, relu)


def _conv3x3_bias_onednn_forward(x_BxHxWxC, kernel_3x3xKxD, bias_D, residual, stride, relu):
  y = conv3x3_bias_onednn(x_BxHxWxC, kernel_3x3xKxD, bias_D, residual, stride, relu)
  return y, (x_BxHxWxC, kernel_3x3xKxD, bias_D, residual, y)


def _conv3x3_bias_onednn_backward(stride, relu, residuals, dy):
  *linear_inputs, y = residuals
  if relu:
    # The mask of the output computed, not of a recomputation: the two can round apart
    # where the input to the ReLU is within rounding of zero.
    dy = jnp.where(y > 0, dy, 0.0)
  _, vjp = jax.vjp(lambda *args: conv3x3_bias_lax(*args, stride, False), *linear_inputs)
  return vjp(dy)


conv3x3_bias_onednn.defvjp(_conv3x3_bias_onednn_forward, _conv3x3_bias_onednn_backward)


def _shifted_sum(
    x_pad: jax.Array, kernel_3x3xC: jax.Array, stride: int, out_h: int, out_w: int
) -> jax.Array:
  """sum_{i,j} x_pad[:, h*s + i, w*s + j, :] * kernel[i, j] for each output pixel (h, w)."""

  def tap(i, j):
    rows = slice(i, i + (out_h - 1) * stride + 1, stride)
    cols = slice(j, j + (out_w - 1) * stride + 1, stride)
    return x_pad[:, rows, cols, :] * kernel_3x3xC[i, j]

  return sum(tap(i, j) for i in range(3) for j in range(3))


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


def after(x: jax.Array, dependency: jax.Array) -> jax.Array:
  """x (B, ...), made to depend on `dependency` (B, ...): XLA starts x's users after it.

  XLA:CPU runs operations that do not depend on each other at the same time; on a
  few cores that can slow both, as when oneDNN's threads and XLA's share them (the
  online step runs ~10% faster with its student waiting for the teacher, BENCHMARKS.md),
  so the train step orders them so on CPU; other devices gain nothing from it.
  Each example of x gains 0 * the sum of its row of `dependency` (both share the
  leading batch axis, so a batch split across devices needs no communication), which
  XLA keeps, as 0 * a is NaN for a non-finite a: a non-finite row turns its example
  of x into NaN.
  """
  row_sums_B = jnp.sum(dependency.reshape(dependency.shape[0], -1), axis=1)
  zeros_B = jnp.zeros((), x.dtype) * row_sums_B.astype(x.dtype)
  return x + zeros_B.reshape((-1,) + (1,) * (x.ndim - 1))
