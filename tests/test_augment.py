"""On-device augmentation: the ImageNet-style random resized crop and flip."""

import jax
import numpy as np
import pytest

from kd_jax.data import augment
from kd_jax.errors import UserInputError


def test_resized_crop_keeps_shape_and_values_and_draws_per_image():
  constant = np.full((4, 16, 16, 3), 77, np.uint8)
  out = np.asarray(augment.random_resized_crop_flip(jax.random.key(0), constant))
  assert out.shape == constant.shape and out.dtype == np.float32
  # Interpolation weights sum to one: a flat image stays flat at any crop.
  np.testing.assert_allclose(out, 77.0, atol=1e-3)

  # A ramp shows where each crop fell: images of one batch get their own crop.
  ramp = np.broadcast_to(np.arange(16, dtype=np.uint8)[None, None, :, None] * 16, (8, 16, 16, 3))
  crops = np.asarray(augment.random_resized_crop_flip(jax.random.key(1), ramp))
  assert 0.0 <= crops.min() and crops.max() <= 255.0
  assert len({tuple(np.round(c[0, :, 0], 2)) for c in crops}) == len(crops)
  # The same key gives the same views (the offline cache relies on it).
  np.testing.assert_array_equal(
      crops, np.asarray(augment.random_resized_crop_flip(jax.random.key(1), ramp))
  )
  # Flipped views run right to left; a crop never reverses the ramp itself.
  directions = np.sign(crops[:, 0, -1, 0] - crops[:, 0, 0, 0])
  assert set(directions) <= {-1.0, 1.0} and len(set(directions)) == 2


def test_unknown_augmentation_names_the_choices():
  choices = "crop_flip, resized_crop_flip, translate_flip, none"
  with pytest.raises(UserInputError, match=f"use one of {choices}"):
    augment.get_augmentation("mixup")


def test_given_stats_override_the_computed_ones_or_are_refused():
  assert augment.given_stats({"mean": (), "std": ()}, 3) is None
  mean, std = augment.given_stats({"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}, 3)
  assert mean.dtype == std.dtype == np.float32
  np.testing.assert_allclose(std, [0.229, 0.224, 0.225], rtol=1e-6)
  with pytest.raises(UserInputError, match="one value per image channel"):
    augment.given_stats({"mean": (0.5,), "std": (0.2,)}, 3)
  with pytest.raises(UserInputError, match="0..1 scale"):
    augment.given_stats({"mean": (124.0, 116.0, 104.0), "std": (58.0, 57.0, 57.0)}, 3)


def _flipped(image, flip):
  return image[:, ::-1] if flip else image


def test_translate_flip_shifts_by_at_most_two_into_a_mirrored_border():
  images = np.random.default_rng(2).integers(0, 256, (16, 6, 7, 3), dtype=np.uint8)
  out = np.asarray(augment.AUGMENTATIONS["translate_flip"](jax.random.key(0), images))
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
  offsets, flips = set(), set()
  for pad, result in zip(padded, out):
    found = [
        (dy, dx, flip)
        for dy in range(5)
        for dx in range(5)
        for flip in (False, True)
        if np.array_equal(result, _flipped(pad[dy : dy + 6, dx : dx + 7], flip))
    ]
    assert found, "not a crop of the mirrored-border image"
    offsets.add(found[0][:2])
    flips.add(found[0][2])
  assert len(offsets) > 3 and flips == {False, True}  # the draws vary
