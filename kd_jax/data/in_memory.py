"""Training data held in device memory: copied there once as uint8, augmented in the step.

A step receives only the batch gathered from the arrays on the devices, so no
image crosses from the host after the first copy, and its augmentation runs
inside the jitted train step (`DeviceData.student_view`).
"""

import dataclasses
from typing import Any, Callable, Iterator

import jax
import numpy as np

from kd_jax import parallel
from kd_jax.data import Dataset
from kd_jax.data import augment as augment_lib
from kd_jax.data.placement import RowLayout, epoch_indices, make_gather


@dataclasses.dataclass(frozen=True)
class DeviceData:
  """A dataset held in device memory as uint8, its images split over the mesh (`TrainingData`).

  Each process's devices hold its share of the images; what a step gathers
  is addressed by row (see RowLayout). `augmentation` is data.augment's, run
  by `student_view` inside the train step.
  """

  train_images: jax.Array
  train_labels: jax.Array  # by row, replicated
  train_index: jax.Array  # by row, each row's example in one-process order, replicated
  train_layout: RowLayout
  test_images: jax.Array
  test_layout: RowLayout
  test_labels: np.ndarray  # by example, on the host
  mean_C: np.ndarray
  std_C: np.ndarray
  num_classes: int
  augmentation: augment_lib.Augmentation
  gather: Callable  # make_gather's, for this mesh

  @property
  def num_train(self) -> int:
    """Training examples over all processes."""
    return len(self.train_layout.rows)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of every image."""
    return tuple(self.train_images.shape[1:])

  def steps_per_epoch(self, batch_size: int) -> int:
    """Steps of one epoch at the global `batch_size`."""
    return self.num_train // batch_size

  def student_view(self, seed: int, step: jax.Array, images_BxHxWxC: jax.Array) -> jax.Array:
    """The batch augmented with the draws of (seed, step), then normalised: all on the device."""
    return augment_lib.view(self.augmentation, seed, step, images_BxHxWxC, self.mean_C, self.std_C)

  def put_per_example(self, stored: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Per-example arrays given for every example (one-process order), on the devices by row."""
    mesh = self.train_images.sharding.mesh
    return jax.device_put(jax.tree.map(self.train_layout.by_row, stored), parallel.replicated(mesh))

  def train_batches(
      self, seed: int, epoch: int, start: int, batch_size: int, per_example: dict | None = None
  ) -> Iterator[dict]:
    """The global batches of steps `start`.. of `epoch`: "image", "label", "index" and any
    `per_example` rows."""
    arrays = {"image": self.train_images, "label": self.train_labels, "index": self.train_index}
    if per_example:
      arrays["teacher_logits"] = per_example
    rows_SxB = self.train_layout.rows[epoch_indices(seed, epoch, self.num_train, batch_size)]
    return (self.gather(arrays, rows_B) for rows_B in rows_SxB[start:])

  def predict(
      self, forward: Callable, variables: Any, split: str, batch_size: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of every example of `split` ('train' or 'test'), unaugmented, in one-process order."""
    if split == "train":
      images, layout = self.train_images, self.train_layout
      labels = np.asarray(jax.device_get(self.train_labels))[layout.rows]
    else:
      images, layout, labels = self.test_images, self.test_layout, self.test_labels
    logits = predict_rows(forward, variables, images, layout.rows, batch_size, self.gather)
    return logits, labels


def put_on_device(dataset: Dataset, mesh, data_config) -> DeviceData:
  """Copies this process's share of the dataset to its devices once; steps gather from it.

  The train step applies data_config.augment. The normalisation statistics
  are data_config.mean and .std if given, else over the whole training split,
  from every process's pixel histograms, so they are exact and the same
  everywhere.
  """
  counts_Px2 = parallel.allgather(
      np.array([[len(dataset.train_labels), len(dataset.test_labels)]], np.int64)
  )
  train, test = RowLayout(counts_Px2[:, 0]), RowLayout(counts_Px2[:, 1])
  stats = augment_lib.given_stats(data_config, dataset.image_shape[-1])
  if stats is None:
    histograms = parallel.allgather(augment_lib.pixel_histograms(dataset.train_images)[None])
    stats = augment_lib.normalization_stats(histograms.sum(axis=0))
  mean_C, std_C = stats
  # Labels are small: every process keeps all of them.
  train_labels = train.gather_all(dataset.train_labels.astype(np.int32))
  train_index = train.by_row(np.arange(len(train.rows), dtype=np.int32))
  return DeviceData(
      train.spread(dataset.train_images, mesh),
      jax.device_put(train_labels, parallel.replicated(mesh)),
      jax.device_put(train_index, parallel.replicated(mesh)),
      train,
      test.spread(dataset.test_images, mesh),
      test,
      test.every_example(dataset.test_labels.astype(np.int32)),
      mean_C,
      std_C,
      dataset.num_classes,
      augment_lib.get_augmentation(data_config["augment"]),
      make_gather(mesh),
  )


def predict_rows(
    forward: Callable,
    variables: Any,
    images: jax.Array,
    rows_N: np.ndarray,
    batch_size: int,
    gather: Callable,
) -> np.ndarray:
  """Logits of the images in `rows_N` (rows of `images`), in batches of one fixed size.

  The last batch is padded with copies of the first image and the padding
  dropped afterwards, so each example counts exactly once and nothing
  recompiles.
  """
  count = len(rows_N)
  num_batches = -(-count // batch_size)
  rows = np.full(num_batches * batch_size, rows_N[0], np.int32)
  rows[:count] = rows_N
  outputs = [
      forward(variables, gather(images, batch_rows))
      for batch_rows in rows.reshape(num_batches, batch_size)
  ]
  return np.concatenate(jax.device_get(outputs))[:count]
