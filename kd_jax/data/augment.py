"""Augmentation and normalisation of uint8 image batches.

They run inside the jitted train step (`view`), for data held in memory and
streamed alike: the step is one program whichever kind feeds it, so both
train to the same numbers, on every backend, and each step costs no host
work. Only a resized crop, which must see the image at its own resolution,
is made on the host when streamed (`draws_on_host`, `Augmentation.apply_host`).
Randomness comes from a key derived from (seed, step), which makes every run
reproducible.
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.data import resize
from kd_jax.errors import UserInputError

CROP_PADDING = 4


def pixel_histograms(images_NxHxWxC: np.ndarray) -> np.ndarray:
  """Counts of each uint8 value per channel, C x 256 (they add up across shares)."""
  return np.stack(
      [
          np.bincount(images_NxHxWxC[..., c].ravel(), minlength=256)
          for c in range(images_NxHxWxC.shape[-1])
      ]
  ).astype(np.int64)


def given_stats(data_config, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
  """data.mean and data.std as float32 arrays, or None when they are to be computed.

  Raises:
    UserInputError: unless both are empty or both give `channels` values on the
      0..1 scale, every std above 0.
  """
  mean, std = tuple(data_config.get("mean", ())), tuple(data_config.get("std", ()))
  if not mean and not std:
    return None
  for name, values in (("mean", mean), ("std", std)):
    if len(values) != channels:
      raise UserInputError(
          f"data.{name}={values} must give one value per image channel ({channels}), "
          "or leave data.mean and data.std both empty to compute them"
      )
  if not all(0 <= m <= 1 for m in mean) or not all(0 < s <= 1 for s in std):
    raise UserInputError(
        f"data.mean={mean} and data.std={std} must be on the 0..1 scale (e.g. ImageNet's "
        "(0.485, 0.456, 0.406) and (0.229, 0.224, 0.225)), every std above 0"
    )
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def normalization_stats(histograms_Cx256: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std, on the 0..1 scale, as float32, from pixel histograms.

  The sums are exact integers, so every way of splitting the data gives the
  same statistics to the last bit.
  """
  values = np.arange(256, dtype=np.float64) / 255.0
  count_C = histograms_Cx256.sum(axis=-1)
  mean = histograms_Cx256 @ values / count_C
  variance = np.maximum(histograms_Cx256 @ values**2 / count_C - mean**2, 0.0)
  return mean.astype(np.float32), np.maximum(np.sqrt(variance), 1e-3).astype(np.float32)


def normalize(images_BxHxWxC: jax.Array, mean_C, std_C) -> jax.Array:
  """uint8 images to float32 with zero mean and unit variance per channel."""
  return (images_BxHxWxC.astype(jnp.float32) / 255.0 - mean_C) / std_C


def step_key(seed: int, step) -> jax.Array:
  """The key of a step's augmentation draws: a pure function of (seed, step)."""
  return jax.random.fold_in(jax.random.key(seed), step)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """A random augmentation whose per-image decisions are drawn once and applied anywhere.

  `draw(key, batch)` gives a batch's decisions as arrays with the batch first;
  `apply(images, draws)` applies them on the device to a batch of uint8
  images. Calling it, `augmentation(key, images)`, draws and applies on the
  device in one go. `apply_host(image, draw, size)`, set only where the
  decisions must meet each image at its own resolution (a resized crop),
  applies one image's decisions with OpenCV and NumPy, giving size x size
  uint8: a streamed pipeline then augments on the host instead.
  """

  draw: Callable[[jax.Array, int], dict[str, jax.Array]]
  apply: Callable[[jax.Array, dict[str, jax.Array]], jax.Array]
  apply_host: Callable[[np.ndarray, dict[str, np.ndarray], int], np.ndarray] | None = None

  def __call__(self, key: jax.Array, images_BxHxWxC: jax.Array) -> jax.Array:
    return self.apply(images_BxHxWxC, self.draw(key, images_BxHxWxC.shape[0]))


def view(
    augmentation: Augmentation, seed: int, step, images_BxHxWxC: jax.Array, mean_C, std_C
) -> jax.Array:
  """The student's view at `step`: the batch augmented with (seed, step)'s draws, normalised."""
  return normalize(augmentation(step_key(seed, step), images_BxHxWxC), mean_C, std_C)


# airbench's translation: up to 2 pixels, into a mirrored border.
TRANSLATE_PADDING = 2


def crop_flip_draws(
    key: jax.Array, batch: int, padding: int = CROP_PADDING
) -> dict[str, jax.Array]:
  """Per image: a crop offset in 0..2 * padding on each axis, and whether to flip."""
  crop_key, flip_key = jax.random.split(key)
  return {
      "offset_Bx2": jax.random.randint(crop_key, (batch, 2), 0, 2 * padding + 1),
      "flip_B": jax.random.bernoulli(flip_key, 0.5, (batch,)),
  }


def crop_flip(
    images_BxHxWxC: jax.Array,
    draws: dict[str, jax.Array],
    padding: int = CROP_PADDING,
    mode: str = "constant",
) -> jax.Array:
  """Pads by `padding`, crops back to size at the drawn offsets, flips the drawn images.

  With zeros (`mode` "constant") and CROP_PADDING, the standard CIFAR augmentation
  (PyTorch's RandomCrop(32, padding=4) followed by RandomHorizontalFlip); with
  "reflect" and TRANSLATE_PADDING, airbench's translate-and-flip.
  """
  _, height, width, channels = images_BxHxWxC.shape
  p = padding
  padded = jnp.pad(images_BxHxWxC, ((0, 0), (p, p), (p, p), (0, 0)), mode=mode)

  def crop_one(image, offset_2, flip):
    crop = jax.lax.dynamic_slice(image, (offset_2[0], offset_2[1], 0), (height, width, channels))
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(crop_one)(padded, draws["offset_Bx2"], draws["flip_B"])


def random_crop_flip(key: jax.Array, images_BxHxWxC: jax.Array) -> jax.Array:
  """`crop_flip` with decisions drawn from `key`, one independent draw per image."""
  return AUGMENTATIONS["crop_flip"](key, images_BxHxWxC)


# torchvision's RandomResizedCrop defaults: area fraction and aspect-ratio range.
RESIZED_CROP_SCALE = (0.08, 1.0)
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)


def resized_crop_draws(key: jax.Array, batch: int) -> dict[str, jax.Array]:
  """Per image: the crop's area fraction, log aspect ratio, place (0..1 of the slack) and flip.

  Fractions rather than pixels, so the same decisions crop an image of any size.
  """
  area_key, ratio_key, y_key, x_key, flip_key = jax.random.split(key, 5)
  return {
      "area_B": jax.random.uniform(area_key, (batch,), minval=RESIZED_CROP_SCALE[0], maxval=1.0),
      "log_ratio_B": jax.random.uniform(
          ratio_key,
          (batch,),
          minval=np.log(RESIZED_CROP_RATIO[0]),
          maxval=np.log(RESIZED_CROP_RATIO[1]),
      ),
      "y_B": jax.random.uniform(y_key, (batch,)),
      "x_B": jax.random.uniform(x_key, (batch,)),
      "flip_B": jax.random.bernoulli(flip_key, 0.5, (batch,)),
  }


def _crop_box(xp, height: int, width: int, draws: dict) -> tuple:
  """(top, left, crop height, crop width) in pixels of `draws` on a height x width image.

  `xp` is numpy or jax.numpy: the host and the device share this arithmetic.
  A crop that does not fit is clipped to the image (torchvision redraws it),
  so every draw is one fixed-shape computation.
  """
  ratio = xp.exp(draws["log_ratio_B"])
  crop_h = xp.clip(xp.sqrt(draws["area_B"] * height * width / ratio), 1.0, height)
  crop_w = xp.clip(xp.sqrt(draws["area_B"] * height * width * ratio), 1.0, width)
  return draws["y_B"] * (height - crop_h), draws["x_B"] * (width - crop_w), crop_h, crop_w


def resized_crop_flip(images_BxHxWxC: jax.Array, draws: dict[str, jax.Array]) -> jax.Array:
  """The drawn area (8-100%) and aspect ratio (3/4-4/3) of each image, resized back, flipped if drawn.

  The standard ImageNet augmentation (torchvision's RandomResizedCrop and
  RandomHorizontalFlip), bilinear with antialiasing, at sub-pixel precision.
  Returns float32 images on the uint8 scale (0..255).
  """
  _, height, width, channels = images_BxHxWxC.shape
  top_B, left_B, crop_h_B, crop_w_B = _crop_box(jnp, height, width, draws)

  def crop_one(image, top, left, crop_h, crop_w, flip):
    scale_2 = jnp.stack([height / crop_h, width / crop_w])
    resized = jax.image.scale_and_translate(
        image.astype(jnp.float32),
        (height, width, channels),
        spatial_dims=(0, 1),
        scale=scale_2,
        translation=-jnp.stack([top, left]) * scale_2,
        method="linear",
    )
    return jnp.where(flip, resized[:, ::-1], resized)

  return jax.vmap(crop_one)(images_BxHxWxC, top_B, left_B, crop_h_B, crop_w_B, draws["flip_B"])


def resized_crop_flip_host(image: np.ndarray, draw: dict[str, np.ndarray], size: int) -> np.ndarray:
  """`resized_crop_flip` of one image at its own resolution, to size x size uint8.

  The crop box is the device's, rounded to whole pixels of the original
  image, and OpenCV resizes it: the same decisions as on the device, but not
  the same pixels (the device crops the image already resized to size x size).
  """
  height, width = image.shape[:2]
  top, left, crop_h, crop_w = (float(v) for v in _crop_box(np, height, width, draw))
  crop_h, crop_w = max(1, round(crop_h)), max(1, round(crop_w))
  top, left = min(round(top), height - crop_h), min(round(left), width - crop_w)
  crop = resize.resize_image(image[top : top + crop_h, left : left + crop_w], size, size)
  return np.ascontiguousarray(crop[:, ::-1] if draw["flip_B"] else crop)


def random_resized_crop_flip(key: jax.Array, images_BxHxWxC: jax.Array) -> jax.Array:
  """`resized_crop_flip` with decisions drawn from `key`, one independent draw per image."""
  return AUGMENTATIONS["resized_crop_flip"](key, images_BxHxWxC)


AUGMENTATIONS = {
    "crop_flip": Augmentation(crop_flip_draws, crop_flip),
    "resized_crop_flip": Augmentation(
        resized_crop_draws, resized_crop_flip, resized_crop_flip_host
    ),
    "translate_flip": Augmentation(
        functools.partial(crop_flip_draws, padding=TRANSLATE_PADDING),
        functools.partial(crop_flip, padding=TRANSLATE_PADDING, mode="reflect"),
    ),
    "none": Augmentation(lambda key, batch: {}, lambda images, draws: images),
}


def get_augmentation(kind: str) -> Augmentation:
  """The augmentation named by config.data.augment."""
  if kind not in AUGMENTATIONS:
    raise UserInputError(f"unknown data.augment {kind!r}; use one of {', '.join(AUGMENTATIONS)}")
  return AUGMENTATIONS[kind]


@functools.cache
def _draw_on_cpu(kind: str, seed: int, batch: int) -> Callable:
  return jax.jit(lambda step: AUGMENTATIONS[kind].draw(step_key(seed, step), batch))


def draws_on_host(kind: str, seed: int, step: int, batch: int) -> dict[str, np.ndarray]:
  """The decisions the device would draw for `step`, computed on the CPU, as NumPy arrays.

  JAX's random bits do not depend on the backend, so a streamed pipeline
  that crops on the host (`Augmentation.apply_host`) makes the decisions
  that the in-memory path makes inside its train step.
  """
  step = jax.device_put(np.int32(step), jax.devices("cpu")[0])
  return jax.device_get(_draw_on_cpu(kind, seed, batch)(step))
