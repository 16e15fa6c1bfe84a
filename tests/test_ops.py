"""Tests for kd_jax.ops: each fast form against its plain formulation, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import normal, random_cotangent, requires_native, values_and_grads
from kd_jax import ops

_TOL = dict(rtol=1e-5, atol=1e-5)


def _assert_same_values_and_grads(conv_a, conv_b, x, kernel, stride, tol=_TOL):
  out_a, (dx_a, dk_a) = values_and_grads(conv_a, x, kernel, stride)
  out_b, (dx_b, dk_b) = values_and_grads(conv_b, x, kernel, stride)
  assert out_a.shape == out_b.shape
  np.testing.assert_allclose(out_a, out_b, **tol)
  np.testing.assert_allclose(dx_a, dx_b, **tol)
  np.testing.assert_allclose(dk_a, dk_b, **tol)


@pytest.mark.parametrize("stride", [1, 2])
# 20 rows are summed in two groups of 10, 17 (prime) one row at a time.
@pytest.mark.parametrize("size", [7, 8, 17, 20])
def test_depthwise_shifted_matches_grouped_conv(stride, size):
  x = normal((2, size, size + 1, 5))
  kernel = normal((3, 3, 1, 5), seed=1)
  _assert_same_values_and_grads(
      ops.depthwise_conv_shifted,
      ops.conv3x3_lax,
      x,
      kernel,
      stride,
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_global_avg_pool_matches_mean_values_and_grads(dtype):
  x = jnp.asarray(normal((3, 5, 7, 4)), dtype)
  cotangent = jnp.asarray(random_cotangent((3, 4)), dtype)

  def value_and_grad(pool):
    return jax.value_and_grad(lambda x: jnp.sum(pool(x).astype(jnp.float32) * cotangent))(x)

  pooled = ops.global_avg_pool(x)
  assert pooled.shape == (3, 4) and pooled.dtype == dtype
  expected = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dtype)
  tol = _TOL if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(pooled.astype(np.float32), expected.astype(np.float32), **tol)
  (_, grad), (_, expected_grad) = (
      value_and_grad(ops.global_avg_pool),
      value_and_grad(lambda x: jnp.mean(x, axis=(1, 2))),
  )
  assert grad.dtype == dtype
  np.testing.assert_allclose(grad.astype(np.float32), expected_grad.astype(np.float32), **tol)


def test_depthwise_output_shape_matches_pytorch_padding_1():
  x = jnp.zeros((1, 7, 8, 3))
  kernel = jnp.zeros((3, 3, 1, 3))
  # PyTorch: floor((H + 2*1 - 3) / s) + 1.
  assert ops.depthwise_conv_shifted(x, kernel, 2).shape == (1, 4, 4, 3)


@requires_native
@pytest.mark.parametrize("stride", [1, 2])
# (B, H, W, C, kernel input channels, D), odd and even sizes: an RGB stem, a wider layer,
# a depthwise layer and one of two groups.
@pytest.mark.parametrize(
    "shape", [(2, 7, 8, 3, 3, 16), (1, 6, 5, 20, 20, 24), (2, 7, 6, 6, 1, 6), (1, 5, 6, 8, 4, 12)]
)
def test_conv3x3_onednn_matches_lax_conv(shape, stride):
  batch, height, width, cin, kernel_cin, cout = shape
  x = normal((batch, height, width, cin))
  kernel = normal((3, 3, kernel_cin, cout), seed=1)
  _assert_same_values_and_grads(
      ops.conv3x3_onednn, ops.conv3x3_lax, x, kernel, stride, dict(rtol=1e-5, atol=1e-4)
  )


@requires_native
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("relu, with_residual", [(True, True), (True, False), (False, True)])
# A dense kernel, and a depthwise one (one input channel per group).
@pytest.mark.parametrize("kernel_cin, cout", [(5, 8), (1, 5)])
def test_conv3x3_bias_onednn_matches_lax(stride, relu, with_residual, kernel_cin, cout):
  x = jnp.asarray(normal((2, 7, 6, 5)))
  kernel = jnp.asarray(normal((3, 3, kernel_cin, cout), seed=1))
  bias = jnp.asarray(normal((cout,), seed=2))
  out_shape = (2, -(-7 // stride), -(-6 // stride), cout)
  residual = jnp.asarray(normal(out_shape, seed=3)) if with_residual else None
  cotangent = jnp.asarray(random_cotangent(out_shape))

  def values_and_grads(conv):
    y, vjp = jax.vjp(lambda *args: conv(*args, stride, relu), x, kernel, bias, residual)
    return y, vjp(cotangent)

  (y, grads), (y_lax, grads_lax) = map(
      values_and_grads, (ops.conv3x3_bias_onednn, ops.conv3x3_bias_lax)
  )
  np.testing.assert_allclose(y, y_lax, rtol=1e-5, atol=1e-4)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_lax), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  assert (
      "kd_jax_onednn_conv3x3_inference"
      in jax.jit(lambda *args: ops.conv3x3_bias_onednn(*args, stride, relu))
      .lower(x, kernel, bias, residual)
      .as_text()
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_normalize_relu_pool_matches_plain_formulation(dtype):
  # Off-centre, with biases of both signs, so that about half the units are inactive.
  x = jnp.asarray(normal((4, 6, 5, 3)) * 2.0 + 1.0, dtype)
  scale = jnp.asarray(normal((3,), seed=3) + 1.5)
  bias = jnp.asarray(normal((3,), seed=4))
  cotangent = random_cotangent((4, 3))

  def plain(x, scale, bias):
    x32 = x.astype(jnp.float32)
    mean, var = jnp.mean(x32, axis=(0, 1, 2)), jnp.var(x32, axis=(0, 1, 2))
    y = jnp.maximum((x32 - mean) / jnp.sqrt(var + 1e-5) * scale + bias, 0.0)
    return jnp.mean(y, axis=(1, 2)).astype(x.dtype), mean, var

  def values_and_grads_of(fn):
    def loss(x, scale, bias):
      pooled, mean, var = fn(x, scale, bias)
      return jnp.sum(pooled.astype(jnp.float32) * cotangent), (pooled, mean, var)

    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)

  fused = lambda x, scale, bias: ops.normalize_relu_pool(x, scale, bias, 1e-5)
  (dx, dscale, dbias), (pooled, mean, var) = values_and_grads_of(fused)
  (dx_ref, dscale_ref, dbias_ref), (pooled_ref, mean_ref, var_ref) = values_and_grads_of(plain)
  assert pooled.dtype == dx.dtype == dtype and pooled.shape == (4, 3)
  tol = _TOL if dtype == jnp.float32 else dict(rtol=2**-7, atol=2**-7)
  for name, got, want in (
      ("pooled", pooled, pooled_ref),
      ("mean", mean, mean_ref),
      ("var", var, var_ref),
      ("dx", dx, dx_ref),
      ("dscale", dscale, dscale_ref),
      ("dbias", dbias, dbias_ref),
  ):
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), **tol, err_msg=name
    )


def test_after_keeps_values_and_the_dependency_through_xla():
  x, dependency = jnp.asarray(normal((4, 3, 2))), jnp.asarray(normal((4, 5), seed=1))
  np.testing.assert_array_equal(ops.after(x, dependency), x)
  poisoned = np.asarray(ops.after(x, dependency.at[1, 0].set(jnp.inf)))
  assert np.isnan(poisoned[1]).all() and not np.isnan(np.delete(poisoned, 1, axis=0)).any()
  # XLA's optimiser must not fold the dependency away: the compiled program still sums it.
  compiled = jax.jit(ops.after).lower(x, dependency).compile().as_text()
  assert "f32[4]{0} reduce(" in compiled
