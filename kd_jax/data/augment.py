"""On-device augmentation and normalisation of uint8 image batches.

These run inside the jitted train step, so the dataset crosses to the device
once, as uint8, and each step costs no host work. Randomness comes from a key
the step derives from (seed, step), which makes every run reproducible.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

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


def random_crop_flip(
    key: jax.Array, images_BxHxWxC: jax.Array, padding: int = CROP_PADDING
) -> jax.Array:
  """Zero-pads by `padding`, crops back to size at a random offset, flips half.

  The standard CIFAR augmentation (PyTorch's RandomCrop(32, padding=4) followed
  by RandomHorizontalFlip), one independent draw per image.
  """
  batch, height, width, channels = images_BxHxWxC.shape
  crop_key, flip_key = jax.random.split(key)
  offsets_Bx2 = jax.random.randint(crop_key, (batch, 2), 0, 2 * padding + 1)
  flips_B = jax.random.bernoulli(flip_key, 0.5, (batch,))
  padded = jnp.pad(images_BxHxWxC, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

  def crop_one(image, offset_2, flip):
    crop = jax.lax.dynamic_slice(image, (offset_2[0], offset_2[1], 0), (height, width, channels))
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(crop_one)(padded, offsets_Bx2, flips_B)


def get_augmentation(kind: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The augmentation named by config.data.augment, as f(key, images) -> images."""
  if kind == "crop_flip":
    return random_crop_flip
  if kind == "none":
    return lambda key, images: images
  raise UserInputError(f"unknown data.augment {kind!r}; use 'crop_flip' or 'none'")
