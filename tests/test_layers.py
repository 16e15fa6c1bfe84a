"""Tests for kd_jax.layers: the modules against nnx's and XLA's, on either convolutions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import normal, random_cotangent, requires_native, values_and_grads
from kd_jax import layers, ops

_TOL = dict(rtol=1e-5, atol=1e-5)


def _lowers_to_convolution(fn, x, platform):
  """Whether fn, lowered for `platform` (as kd_jax.export does), holds an XLA convolution."""
  exported = jax.export.export(jax.jit(fn), platforms=(platform,))(x)
  return "stablehlo.convolution" in exported.mlir_module()


def _calls_onednn(fn, *args, target="kd_jax_onednn_conv3x3"):
  """Whether fn, lowered for this machine's CPU, calls kd_jax's oneDNN convolution `target`."""
  return target in jax.jit(fn).lower(*args).as_text()


def _on(layer, convolutions):
  """`layer` with its 3x3 convolutions set to `convolutions`, as a network sets them."""
  layers.use_convolutions(layer, convolutions)
  return layer


def test_depthwise_module_matches_grouped_conv_and_nnx_conv_init():
  layer = layers.DepthwiseConv(4, strides=2, rngs=nnx.Rngs(0))
  reference = nnx.Conv(4, 4, (3, 3), feature_group_count=4, use_bias=False, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(layer.kernel[...], reference.kernel[...])
  x = normal((2, 9, 9, 4))
  expected = ops.conv3x3_lax(x, layer.kernel[...], 2)
  # XLA's: the shifted sum on CPU, the grouped convolution on other platforms.
  assert layer.convolutions == "xla"
  np.testing.assert_allclose(layer(x), expected, **_TOL)
  assert not _calls_onednn(layer, x)
  assert not _lowers_to_convolution(layer, x, "cpu")
  assert _lowers_to_convolution(layer, x, "cuda")


@requires_native
def test_depthwise_module_on_onednn_matches_grouped_conv():
  layer = _on(layers.DepthwiseConv(4, strides=2, rngs=nnx.Rngs(0)), "onednn")
  x = normal((2, 9, 9, 4))
  np.testing.assert_allclose(layer(x), ops.conv3x3_lax(x, layer.kernel[...], 2), **_TOL)
  assert _calls_onednn(layer, x)


def _pointwise_via_lax(x, kernel, stride):
  return jax.lax.conv_general_dilated(
      x,
      kernel,
      window_strides=(stride, stride),
      padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_matches_lax_conv(stride):
  layer = layers.PointwiseConv(5, 3, strides=stride, rngs=nnx.Rngs(0))
  x = normal((2, 7, 6, 5))
  kernel = layer.kernel[...]
  expected, (dx_expected, dk_expected) = values_and_grads(_pointwise_via_lax, x, kernel, stride)
  np.testing.assert_allclose(layer(x), expected, **_TOL)

  cotangent = random_cotangent(expected.shape)
  grads, dx = nnx.grad(lambda layer, x: jnp.sum(layer(x) * cotangent), argnums=(0, 1))(layer, x)
  np.testing.assert_allclose(dx, dx_expected, **_TOL)
  np.testing.assert_allclose(grads["kernel"][...], dk_expected, **_TOL)


def test_pointwise_init_and_size_match_nnx_conv():
  layer = layers.PointwiseConv(6, 4, rngs=nnx.Rngs(0))
  reference = nnx.Conv(6, 4, (1, 1), use_bias=False, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(layer.kernel[...], reference.kernel[...])


@pytest.mark.parametrize(
    "convolutions", ["xla", pytest.param("onednn", marks=requires_native)]
)
@pytest.mark.parametrize("cin, cout, strides, size", [(3, 16, 1, 10), (20, 24, 2, 9)])
def test_conv3x3_matches_nnx_conv_either_way(convolutions, cin, cout, strides, size):
  layer = _on(layers.conv3x3(cin, cout, strides=strides, rngs=nnx.Rngs(0)), convolutions)
  reference = nnx.Conv(
      cin, cout, (3, 3), strides, padding=((1, 1), (1, 1)), use_bias=False, rngs=nnx.Rngs(0)
  )
  np.testing.assert_array_equal(layer.kernel[...], reference.kernel[...])
  x = normal((2, size, size, cin))
  cotangent = random_cotangent(reference(x).shape)

  def values_and_grads(conv):
    return nnx.value_and_grad(lambda conv, x: jnp.sum(conv(x) * cotangent), argnums=(0, 1))(
        conv, x
    )

  (value, (grads, dx)), (value_ref, (grads_ref, dx_ref)) = map(
      values_and_grads, (layer, reference)
  )
  np.testing.assert_allclose(value, value_ref, rtol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(grads["kernel"][...], grads_ref["kernel"][...], rtol=1e-5, atol=1e-4)
  # XLA's convolution on every platform, or oneDNN's.
  assert _calls_onednn(layer, x) == (convolutions == "onednn")
  if convolutions == "xla":
    assert _lowers_to_convolution(layer, x, "cpu") and _lowers_to_convolution(layer, x, "cuda")


def _conv_of_kind(kind, strides):
  """A bias-free convolution of `kind` to 8 channels, from 8 (depthwise) or 6 channels."""
  if kind == "dense":
    return layers.conv3x3(6, 8, strides=strides, rngs=nnx.Rngs(0))
  if kind == "depthwise":
    return layers.DepthwiseConv(8, strides=strides, rngs=nnx.Rngs(0))
  return layers.PointwiseConv(6, 8, strides=strides, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "convolutions", ["xla", pytest.param("onednn", marks=requires_native)]
)
@pytest.mark.parametrize(
    "kind, strides, activation, with_residual",
    [
        ("dense", 1, "relu", True),
        ("dense", 2, None, False),
        ("depthwise", 1, "relu", True),
        ("depthwise", 2, "relu6", False),
        ("pointwise", 1, "relu", True),
    ],
)
def test_conv_bn_equals_the_modules_and_folds_into_onednn_in_inference(
    convolutions, kind, strides, activation, with_residual
):
  conv = _on(_conv_of_kind(kind, strides), convolutions)
  bn = layers.batch_norm(8, rngs=nnx.Rngs(0))
  bn.scale[...] = jnp.asarray(normal((8,), seed=3)) + 2.0
  bn.bias[...] = jnp.asarray(normal((8,), seed=4))
  bn.mean[...], bn.var[...] = jnp.full((8,), 0.5), jnp.full((8,), 2.0)
  # Large enough that ReLU6 clips some outputs.
  x = normal((2, 8, 8, 8 if kind == "depthwise" else 6)) * 4.0
  residual = normal((2, 8 // strides, 8 // strides, 8), seed=5) if with_residual else None

  for mode in ("train", "eval"):
    getattr(bn, mode)()
    graphdef, state = nnx.split((conv, bn))

    def conv_bn(state, x, graphdef=graphdef):
      modules = nnx.merge(graphdef, state)
      return layers.conv_bn(*modules, x, activation=activation, residual=residual)

    y = bn(conv(x))
    y = y if residual is None else y + residual
    expected = {None: y, "relu": nnx.relu(y), "relu6": nnx.relu6(y)}[activation]
    np.testing.assert_allclose(conv_bn(state, x), expected, rtol=1e-5, atol=1e-4)
    # The batch norm is folded into oneDNN's 3x3 convolutions in inference, and only there.
    folds = mode == "eval" and convolutions == "onednn" and kind != "pointwise"
    target = "kd_jax_onednn_conv3x3_inference"
    assert _calls_onednn(conv_bn, state, x, target=target) == folds


def _batch_norm_pair(features):
  """kd_jax's BatchNorm and nnx.BatchNorm with the same settings and a non-trivial state."""
  ours = layers.batch_norm(features, rngs=nnx.Rngs(0))
  reference = nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
  for bn in (ours, reference):
    bn.scale[...] = jnp.asarray(normal((features,), seed=3)) + 2.0
    bn.bias[...] = jnp.asarray(normal((features,), seed=4))
    bn.mean[...] = jnp.full((features,), 0.5)
    bn.var[...] = jnp.full((features,), 2.0)
  return ours, reference


def _train_call_and_grads(bn, x, cotangent, call=lambda bn, x: bn(x)):
  """Output, gradients (x, scale, bias) and updated running stats of one training call."""
  graph, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)

  def loss(x, params):
    model = nnx.merge(graph, params, stats, copy=True)
    out = call(model, x)
    return jnp.sum(out.astype(jnp.float32) * cotangent), (out, nnx.state(model, nnx.BatchStat))

  (_, (out, new_stats)), (dx, dparams) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      x, params
  )
  return out, dx, dparams["scale"][...], dparams["bias"][...], new_stats


def test_batch_norm_matches_nnx_batch_norm_in_training():
  ours, reference = _batch_norm_pair(6)
  # Off-centre, so that the mean and variance terms of the gradient matter.
  x = jnp.asarray(normal((4, 5, 3, 6))) * 3.0 + 1.5
  cotangent = random_cotangent((4, 5, 3, 6))
  got = _train_call_and_grads(ours, x, cotangent)
  want = _train_call_and_grads(reference, x, cotangent)
  for name, a, b in zip(("output", "dx", "dscale", "dbias"), got[:4], want[:4]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
  for name in ("mean", "var"):
    np.testing.assert_allclose(got[4][name][...], want[4][name][...], rtol=1e-6, err_msg=name)


def test_batch_norm_matches_nnx_batch_norm_in_eval_and_bfloat16():
  ours, reference = _batch_norm_pair(3)
  x = jnp.asarray(normal((8, 2, 2, 3))) + 1.0
  ours.eval()
  reference.eval()
  np.testing.assert_allclose(ours(x), reference(x), rtol=1e-6)
  ours.train()
  reference.train()
  ours.dtype = reference.dtype = jnp.bfloat16  # as network.create_network sets it
  x16 = x.astype(jnp.bfloat16)
  out, dx, *_ = _train_call_and_grads(ours, x16, random_cotangent(x.shape))
  out_ref, dx_ref, *_ = _train_call_and_grads(reference, x16, random_cotangent(x.shape))
  assert out.dtype == out_ref.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
  # Within a bfloat16 rounding (8 significant bits) of each other.
  bf16 = dict(rtol=2**-7, atol=2**-7)
  np.testing.assert_allclose(out.astype(np.float32), out_ref.astype(np.float32), **bf16)
  np.testing.assert_allclose(dx.astype(np.float32), dx_ref.astype(np.float32), **bf16)


def test_batch_norm_relu_pool_matches_nnx_batch_norm_relu_and_mean():
  ours, reference = _batch_norm_pair(6)
  x = jnp.asarray(normal((4, 5, 3, 6))) * 3.0 + 1.5
  cotangent = random_cotangent((4, 6))
  got = _train_call_and_grads(ours, x, cotangent, lambda bn, x: bn.relu_pool(x))
  want = _train_call_and_grads(
      reference, x, cotangent, lambda bn, x: jnp.mean(nnx.relu(bn(x)), axis=(1, 2))
  )
  for name, a, b in zip(("output", "dx", "dscale", "dbias"), got[:4], want[:4]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
  for name in ("mean", "var"):
    np.testing.assert_allclose(got[4][name][...], want[4][name][...], rtol=1e-6, err_msg=name)
  ours.eval()
  reference.eval()
  np.testing.assert_allclose(
      ours.relu_pool(x), jnp.mean(nnx.relu(reference(x)), axis=(1, 2)), rtol=1e-6, atol=1e-6
  )


def test_dsconv_shape_and_batch_norm_settings():
  block = layers.DSConv(3, 8, strides=2, rngs=nnx.Rngs(0))
  out = block(jnp.ones((2, 9, 9, 3)))
  assert out.shape == (2, 5, 5, 8)
  assert (out >= 0).all()
  assert block.bn1.momentum == 0.9 and block.bn1.epsilon == 1e-5


def test_dsconv_pool_ends_in_the_mean_of_its_output():
  x = jnp.asarray(normal((2, 6, 6, 3)))
  pooled_block, plain_block = (layers.DSConv(3, 8, rngs=nnx.Rngs(0)) for _ in range(2))
  pooled = pooled_block(x, pool=True)
  np.testing.assert_allclose(pooled, jnp.mean(plain_block(x), axis=(1, 2)), rtol=1e-5, atol=1e-6)
  # Both paths update the running statistics alike.
  np.testing.assert_allclose(pooled_block.bn2.var[...], plain_block.bn2.var[...], rtol=1e-6)


@pytest.mark.parametrize("block_cls", [layers.BasicBlock, layers.WideBasicBlock])
@pytest.mark.parametrize("cin, cout, stride, has_shortcut", [(4, 4, 1, False), (4, 8, 2, True)])
def test_residual_blocks(block_cls, cin, cout, stride, has_shortcut):
  block = block_cls(cin, cout, strides=stride, rngs=nnx.Rngs(0))
  assert (block.shortcut is not None) == has_shortcut
  out = block(normal((2, 8, 8, cin)))
  assert out.shape == (2, 8 // stride, 8 // stride, cout)


def test_whitening_layer_gives_patches_identity_covariance():
  # Correlated channels and neighbouring pixels, as in real images.
  rng = np.random.default_rng(0)
  noise = rng.standard_normal((64, 13, 13, 3))
  images = noise[:, :-1, :-1] + noise[:, 1:, 1:] + 0.5 * noise[..., ::-1][:, :-1, :-1]
  images = (images @ np.array([[1.0, 0.8, 0.2], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])).astype(
      np.float32
  )
  patches = np.asarray(layers.image_patches(jnp.asarray(images), 2)).reshape(-1, 12)
  layer = layers.PatchWhitening(3, patch=2, rngs=nnx.Rngs(0))
  layer.fit(patches.T.astype(np.float64) @ patches / len(patches))
  whitened = np.asarray(layer(jnp.asarray(images))).reshape(-1, 24)
  covariance = whitened[:, :12].T @ whitened[:, :12] / len(whitened)
  np.testing.assert_allclose(covariance, np.eye(12), atol=5e-3)
  np.testing.assert_allclose(whitened[:, 12:], -whitened[:, :12], atol=1e-5)  # the negatives


def test_image_patches_are_the_windows_an_hwio_kernel_sees():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
  kernel = rng.standard_normal((2, 2, 3, 4)).astype(np.float32)
  convolved = jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  patches = layers.image_patches(jnp.asarray(x), 2)
  np.testing.assert_allclose(
      np.asarray(patches @ kernel.reshape(12, 4)).reshape(convolved.shape),
      np.asarray(convolved),
      rtol=1e-5,
      atol=1e-5,
  )
