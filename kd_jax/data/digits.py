"""scikit-learn's bundled handwritten digits: data that needs no download."""

import numpy as np
from sklearn import datasets as sk_datasets
from sklearn import model_selection

from kd_jax.data import Dataset
from kd_jax.data import resize

_TEST_FRACTION = 0.2
_SEED = 0
# load_digits gives 4-bit intensities.
_MAX_VALUE = 16


def load(image_size: int) -> Dataset:
  """Loads the 1,797 8x8 digits, split 80/20 stratified by class, always alike.

  Args:
    image_size: side to resize the images to; 0 keeps 8.

  Returns:
    The dataset, uint8 images of shape N x S x S x 1 scaled to 0..255.
  """
  digits = sk_datasets.load_digits()
  images = np.rint(digits.images * (255 / _MAX_VALUE)).astype(np.uint8)
  images = resize.resize_images(images[..., None], image_size)
  labels = digits.target.astype(np.int32)
  train_images, test_images, train_labels, test_labels = model_selection.train_test_split(
      images, labels, test_size=_TEST_FRACTION, stratify=labels, random_state=_SEED
  )
  return Dataset(
      train_images=train_images,
      train_labels=train_labels,
      test_images=test_images,
      test_labels=test_labels,
      class_names=tuple(str(name) for name in digits.target_names),
  )
