"""Resizing of uint8 images with OpenCV, shared by all sources."""

import cv2
import numpy as np


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Resizes an H x W x C image to height x width (a no-op at that size).

  INTER_AREA averages over the source pixels when shrinking, which avoids the
  aliasing of INTER_LINEAR there; INTER_LINEAR is the smoother choice when
  growing.

  Args:
    image: H x W x C array.
    height: target height.
    width: target width.

  Returns:
    A height x width x C array of the same dtype.
  """
  if image.shape[:2] == (height, width):
    return image
  shrinking = height <= image.shape[0] and width <= image.shape[1]
  interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
  resized = cv2.resize(image, (width, height), interpolation=interpolation)
  # cv2.resize drops the channel axis of single-channel images.
  return resized.reshape(height, width, image.shape[2])


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
  """Resizes N x H x W x C images to size x size; size 0 keeps them."""
  if not size or images.shape[1:3] == (size, size):
    return images
  return np.stack([resize_image(image, size, size) for image in images])


def resize_and_center_crop(image: np.ndarray, size: int, crop_fraction: float) -> np.ndarray:
  """The central size x size of an image whose shorter side is resized to size / crop_fraction.

  ImageNet's evaluation view (shorter side 256, centre 224 at 0.875), which
  keeps the aspect ratio where `resize_image` would squash it.
  """
  height, width = image.shape[:2]
  shorter = round(size / crop_fraction)
  if height <= width:
    new_height, new_width = shorter, max(shorter, round(width * shorter / height))
  else:
    new_height, new_width = max(shorter, round(height * shorter / width)), shorter
  resized = resize_image(image, new_height, new_width)
  top, left = (new_height - size) // 2, (new_width - size) // 2
  return resized[top : top + size, left : left + size]
