"""Tests for kd_jax.evaluate's cost figures: MACs against hand counts, FLOPs beside them."""

import jax
import numpy as np

from kd_jax import evaluate, network


def _conv(out_size, cin, cout, kernel=3, groups=1):
  """MACs of a convolution with a square output of `out_size`, as published tables count."""
  return out_size * out_size * cout * kernel * kernel * cin // groups


# resnet20 on 32x32 RGB images, 10 classes: stem, three stages of three blocks (two 3x3
# convolutions each; the first of stages 2 and 3 strided, with a 1x1 projection), linear.
RESNET20_MACS = (
    _conv(32, 3, 16)
    + 6 * _conv(32, 16, 16)
    + _conv(16, 16, 32) + _conv(16, 16, 32, kernel=1) + 5 * _conv(16, 32, 32)
    + _conv(8, 32, 64) + _conv(8, 32, 64, kernel=1) + 5 * _conv(8, 64, 64)
    + 64 * 10
)
# dsconv_student on 32x32 RGB images, 10 classes: three depthwise 3x3 + pointwise blocks,
# the first strided, then linear.
STUDENT_MACS = (
    _conv(16, 3, 3, groups=3) + _conv(16, 3, 64, kernel=1)
    + _conv(16, 64, 64, groups=64) + _conv(16, 64, 128, kernel=1)
    + _conv(16, 128, 128, groups=128) + _conv(16, 128, 256, kernel=1)
    + 256 * 10
)


def _forward(model_name):
  """The model's inference on XLA's convolutions (what the costs are counted on), and weights."""
  net, variables = network.create_network(model_name, num_classes=10, in_channels=3, seed=0)
  portable = net.portable()
  return lambda variables, images: portable.apply(variables, images, train=False)[0], variables


def test_resnet20_macs_match_the_hand_count():
  assert round(RESNET20_MACS / 1e6, 1) == 40.8  # as the published tables give it
  forward, variables = _forward("resnet20")
  jaxpr = jax.make_jaxpr(forward)(variables, np.zeros((2, 32, 32, 3), np.float32)).jaxpr
  assert evaluate.count_macs(jaxpr) == 2 * RESNET20_MACS


def test_student_costs_per_image_count_every_layer():
  forward, variables = _forward("dsconv_student")
  costs = evaluate.forward_costs(forward, variables, np.zeros((1, 32, 32, 3), np.float32))
  assert costs["macs"] == STUDENT_MACS
  # XLA counts a multiply and an add per MAC (none for padding), plus the batch norms and
  # ReLUs: every layer is in it, none hidden in a native call.
  assert 1.5 * STUDENT_MACS <= costs["flops"] <= 3 * STUDENT_MACS


def _uint8_images(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror():
  net, variables = network.create_network("dsconv_student", num_classes=5, in_channels=3, seed=0)
  mean_C, std_C = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
  plain = evaluate.make_forward(net, mean_C, std_C)
  images = _uint8_images((3, 8, 8, 3))
  expected = 0.5 * (plain(variables, images) + plain(variables, images[:, :, ::-1]))
  flipped = evaluate.make_forward(net, mean_C, std_C, tta="flip")(variables, images)
  np.testing.assert_allclose(np.asarray(flipped), np.asarray(expected), rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(flipped), np.asarray(plain(variables, images)))


def test_flip_translate_tta_is_airbench94s_six_views():
  net, variables = network.create_network("dsconv_student", num_classes=5, in_channels=3, seed=1)
  mean_C, std_C = np.zeros(3, np.float32), np.ones(3, np.float32)
  plain = evaluate.make_forward(net, mean_C, std_C)
  images = _uint8_images((2, 8, 8, 3), seed=1)
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")

  def mirrored(x):
    return 0.5 * (plain(variables, x) + plain(variables, x[:, :, ::-1]))

  shifted = 0.5 * (mirrored(padded[:, :8, :8]) + mirrored(padded[:, 2:, 2:]))
  expected = 0.5 * mirrored(images) + 0.5 * shifted
  tta = evaluate.make_forward(net, mean_C, std_C, tta="flip_translate")(variables, images)
  np.testing.assert_allclose(np.asarray(tta), np.asarray(expected), rtol=1e-5, atol=1e-6)
