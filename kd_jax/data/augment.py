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


# torchvision's RandomResizedCrop defaults: area fraction and aspect-ratio range.
RESIZED_CROP_SCALE = (0.08, 1.0)
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)


def random_resized_crop_flip(key: jax.Array, images_BxHxWxC: jax.Array) -> jax.Array:
  """A random area (8-100%) and aspect ratio (3/4-4/3) of each image, resized back, half flipped.

  The standard ImageNet augmentation (torchvision's RandomResizedCrop and
  RandomHorizontalFlip), one independent draw per image, bilinear with
  antialiasing. Where torchvision redraws a crop that does not fit, this
  clips it to the image, so every draw is one fixed-shape computation.
  Returns float32 images on the uint8 scale (0..255).
  """
  batch, height, width, channels = images_BxHxWxC.shape
  area_key, ratio_key, y_key, x_key, flip_key = jax.random.split(key, 5)
  area_B = jax.random.uniform(area_key, (batch,), minval=RESIZED_CROP_SCALE[0], maxval=1.0)
  log_ratio_B = jax.random.uniform(
      ratio_key,
      (batch,),
      minval=jnp.log(RESIZED_CROP_RATIO[0]),
      maxval=jnp.log(RESIZED_CROP_RATIO[1]),
  )
  ratio_B = jnp.exp(log_ratio_B)
  crop_h_B = jnp.clip(jnp.sqrt(area_B * height * width / ratio_B), 1.0, height)
  crop_w_B = jnp.clip(jnp.sqrt(area_B * height * width * ratio_B), 1.0, width)
  top_B = jax.random.uniform(y_key, (batch,)) * (height - crop_h_B)
  left_B = jax.random.uniform(x_key, (batch,)) * (width - crop_w_B)
  flips_B = jax.random.bernoulli(flip_key, 0.5, (batch,))

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

  return jax.vmap(crop_one)(images_BxHxWxC, top_B, left_B, crop_h_B, crop_w_B, flips_B)


AUGMENTATIONS = {
    "crop_flip": random_crop_flip,
    "resized_crop_flip": random_resized_crop_flip,
    "none": lambda key, images: images,
}


def get_augmentation(kind: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The augmentation named by config.data.augment, as f(key, images) -> images."""
  if kind not in AUGMENTATIONS:
    raise UserInputError(f"unknown data.augment {kind!r}; use one of {', '.join(AUGMENTATIONS)}")
  return AUGMENTATIONS[kind]
