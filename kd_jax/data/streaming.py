"""Streamed data: images read and decoded on the host while the devices train.

For datasets larger than memory (data.in_memory=false, or 'auto' over the
budget). A grain pipeline maps each step to its batch: the step's examples
are decoded with OpenCV by a pool of threads (OpenCV releases the GIL) and
resized, and the batch sent to the devices, with `data.prefetch` batches in
flight there, so the devices never wait on the host while it keeps up.

The same data in the same order as in memory: each step's examples are
`placement.epoch_indices(seed, epoch)`, and the train step augments them as
it augments in-memory batches, with the draws of (seed, step). So on one
process a streamed run is an in-memory run: the same batches into the same
step program, hence the same numbers, to the last bit wherever the backend is
deterministic (two programs, one augmenting and one not, are fused
differently by the compiler, and training amplifies their last-bit
differences).
resized_crop_flip is the exception: it crops each image at its own
resolution here, with the draws the step would make
(`augment.draws_on_host`), where in memory it crops the already resized
image (the same boxes, different pixels). With several processes each one
streams only its own share, shuffled on its own: their global batches differ
from an in-memory run's, which mixes all shares.

A batch is a pure function of (seed, step), so the stream's position is the
train step that the checkpoint already holds: a resumed run starts the
stream at its step and goes on exactly as if never stopped.
"""

import os
from typing import Any, Callable, Iterator

import jax
import numpy as np
from tqdm import tqdm

from kd_jax import parallel
from kd_jax.data import StreamedDataset, resize
from kd_jax.data import augment as augment_lib
from kd_jax.errors import UserInputError
from kd_jax.data.placement import RowLayout, epoch_indices

try:
  import grain  # pylint: disable=g-import-not-at-top
except ImportError as e:  # kd_jax imports this module only for a streamed run
  raise UserInputError(
      "streaming the data (data.in_memory=false, or auto with data too big for memory) needs "
      f"the {e.name or 'grain'} package, which is not installed: pip install grain, "
      "or set data.in_memory=true"
  ) from None


def stream_order(
    seed: int, epoch: int, counts_P: np.ndarray, process: int, batch_size: int
) -> np.ndarray:
  """This process's examples of each step of `epoch`, steps x (batch_size / processes), by local index.

  One process: `placement.epoch_indices`, the in-memory order. Several: each
  shuffles its own share, with as many steps as the smallest share allows.
  """
  if len(counts_P) == 1:
    return epoch_indices(seed, epoch, int(counts_P[0]), batch_size)
  local_batch = batch_size // len(counts_P)
  steps = int(counts_P.min()) // local_batch
  order = np.random.default_rng([seed, epoch, process]).permutation(int(counts_P[process]))
  return order[: steps * local_batch].reshape(steps, local_batch).astype(np.int32)


class StreamedData:
  """The training and test splits streamed from their sources (`TrainingData`).

  The step augments (data.augment's augmentation) and normalises, as for
  in-memory data (`student_view`); a resized crop alone is made on the host,
  as each batch is made, and the step then only normalises. Normalisation
  statistics are data.mean and data.std if given, else from the pixel
  histograms of up to data.stats_images training images spread evenly over
  the split (all of them, and so the in-memory statistics exactly, for
  smaller splits).
  """

  def __init__(self, dataset: StreamedDataset, mesh, data_config):
    self._dataset, self._mesh = dataset, mesh
    self._augment = data_config.augment
    augmentation = augment_lib.get_augmentation(self._augment)
    # Either the host crops (at each image's own size) and the step only
    # normalises, or the host resizes and the step augments as in memory.
    self._host_augmentation = augmentation.apply_host
    self._step_augmentation = (
        augment_lib.AUGMENTATIONS["none"] if augmentation.apply_host else augmentation
    )
    self._threads = int(data_config.get("workers", 0)) or os.cpu_count() or 1
    self._prefetch = int(data_config.get("prefetch", 2))
    if self._prefetch < 1:
      raise UserInputError(f"data.prefetch={self._prefetch} must be at least 1")
    self._eval_crop = float(data_config.get("eval_crop", 1.0))
    counts_Px2 = parallel.allgather(np.array([[len(dataset.train), len(dataset.test)]], np.int64))
    self._train_counts, self._test_counts = counts_Px2[:, 0], counts_Px2[:, 1]
    self.train_layout = RowLayout(self._train_counts)
    self.test_layout = RowLayout(self._test_counts)
    self.num_classes = dataset.num_classes
    self.image_shape = dataset.image_shape
    stats = augment_lib.given_stats(data_config, self.image_shape[-1])
    if stats is None:
      stats = self._normalization_stats(int(data_config.get("stats_images", 50000)))
    self.mean_C, self.std_C = stats

  @property
  def num_train(self) -> int:
    """Training examples over all processes."""
    return int(self._train_counts.sum())

  def steps_per_epoch(self, batch_size: int) -> int:
    """Steps of one epoch at the global `batch_size` (as `stream_order` makes them)."""
    processes = len(self._train_counts)
    return int(self._train_counts.min()) // (batch_size // processes)

  def student_view(self, seed: int, step: jax.Array, images_BxHxWxC: jax.Array) -> jax.Array:
    """The batch augmented with the draws of (seed, step) unless the host cropped it, normalised."""
    return augment_lib.view(
        self._step_augmentation, seed, step, images_BxHxWxC, self.mean_C, self.std_C
    )

  def put_per_example(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's rows of per-example arrays given for every example (one-process order)."""
    first = self._first_example
    return {name: a[first : first + len(self._dataset.train)] for name, a in stored.items()}

  @property
  def _first_example(self) -> int:
    """Where this process's share of the training examples starts in one-process order."""
    return int(self._train_counts[: jax.process_index()].sum())

  def train_batches(
      self, seed: int, epoch: int, start: int, batch_size: int, per_example: dict | None = None
  ) -> Iterator[dict]:
    """The global batches of steps `start`.. of `epoch`: "image", "label", "index" and any
    `per_example` rows."""
    order_SxB = stream_order(seed, epoch, self._train_counts, jax.process_index(), batch_size)
    steps = len(order_SxB)
    first = self._first_example

    def make_batch(position: int) -> dict:
      indices_B = order_SxB[position]
      examples = [self._dataset.train[int(index)] for index in indices_B]
      images = [image for image, _ in examples]
      batch = {
          "image": np.stack(self._host_views(seed, epoch * steps + position, images)),
          "label": np.asarray([label for _, label in examples], np.int32),
          "index": first + indices_B,
      }
      if per_example:
        batch["teacher_logits"] = {name: a[indices_B] for name, a in per_example.items()}
      return batch

    on_device = ("image", "label", "index", "teacher_logits")
    return self._stream(range(start, steps), make_batch, on_device)

  def _host_views(self, seed: int, step: int, images: list[np.ndarray]) -> list[np.ndarray]:
    """This process's images of `step` as the step takes them: resized, or cropped.

    Cropped here, with the draws the step would make, where the augmentation
    must see each image at its own size; else the step augments them.
    """
    size = self.image_shape[0]
    if self._host_augmentation is None:
      return [resize.resize_image(image, size, size) for image in images]
    local_batch = len(images)
    draws = augment_lib.draws_on_host(self._augment, seed, step, local_batch * jax.process_count())
    first = jax.process_index() * local_batch
    return [
        self._host_augmentation(image, {name: d[first + j] for name, d in draws.items()}, size)
        for j, image in enumerate(images)
    ]

  def predict(
      self, forward: Callable, variables: Any, split: str, batch_size: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of every example of `split` ('train' or 'test'), unaugmented, in one-process order.

    Test images are resized to the image size, or with data.eval_crop < 1
    have their shorter side resized to size / eval_crop and the centre cut
    out (ImageNet's evaluation). The last batches are padded with the share's
    first image, and the padding dropped, so each example counts once and
    nothing recompiles.
    """
    source = self._dataset.train if split == "train" else self._dataset.test
    counts_P = self._train_counts if split == "train" else self._test_counts
    layout = self.train_layout if split == "train" else self.test_layout
    local_batch = batch_size // len(counts_P)
    num_batches = -(-int(counts_P.max()) // local_batch)
    height, width = self.image_shape[:2]

    def view(image: np.ndarray) -> np.ndarray:
      if split == "test" and self._eval_crop < 1:
        return resize.resize_and_center_crop(image, height, self._eval_crop)
      return resize.resize_image(image, height, width)

    def make_batch(k: int) -> dict:
      indices = np.arange(k * local_batch, (k + 1) * local_batch)
      examples = [source[int(i)] if i < len(source) else source[0] for i in indices]
      return {
          "image": np.stack([view(image) for image, _ in examples]),
          "label": np.asarray([label for _, label in examples], np.int32),
      }

    outputs, labels = [], []
    for batch in self._stream(range(num_batches), make_batch, ("image",)):
      outputs.append(forward(variables, batch["image"]))
      labels.append(batch["label"])
    logits_PxNxC = (
        np.concatenate(jax.device_get(outputs))
        .reshape(num_batches, len(counts_P), local_batch, -1)
        .swapaxes(0, 1)
        .reshape(len(counts_P), num_batches * local_batch, -1)
    )
    logits = np.concatenate([logits_PxNxC[p, :count] for p, count in enumerate(counts_P)])
    labels = layout.every_example(np.concatenate(labels)[: len(source)])
    return logits, labels

  def _stream(self, positions: range, make_batch: Callable, on_device: tuple) -> Iterator[dict]:
    """make_batch(position) for each position, made by the thread pool, in order, sent ahead to the devices.

    The keys in `on_device` become global arrays split over the mesh; other
    keys stay this process's NumPy arrays.
    """
    sharding = parallel.batch_sharding(self._mesh)

    def to_devices(batch: dict) -> dict:
      return {
          name: jax.tree.map(
              lambda a: jax.make_array_from_process_local_data(
                  sharding, a, (a.shape[0] * jax.process_count(), *a.shape[1:])
              ),
              value,
          )
          if name in on_device
          else value
          for name, value in batch.items()
      }

    batches = (
        grain.MapDataset.source(positions)
        .map(make_batch)
        .to_iter_dataset(
            grain.ReadOptions(num_threads=self._threads, prefetch_buffer_size=self._threads)
        )
        .map(to_devices)
    )
    return iter(
        grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=self._prefetch)
    )

  def _normalization_stats(self, stats_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std from pixel histograms of an even sample of the training images."""
    train = self._dataset.train
    wanted = -(-stats_images * len(train) // max(self.num_train, 1))
    indices = np.unique(np.linspace(0, len(train) - 1, min(len(train), wanted)).astype(np.int64))
    chunks = np.array_split(indices, -(-len(indices) // 256))
    height, width = self.image_shape[:2]

    def histograms(chunk: int) -> np.ndarray:
      images = [resize.resize_image(train[int(i)][0], height, width) for i in chunks[chunk]]
      return augment_lib.pixel_histograms(np.stack(images))

    total = 0
    sums = (
        grain.MapDataset.range(len(chunks))
        .map(histograms)
        .to_iter_dataset(grain.ReadOptions(num_threads=self._threads, prefetch_buffer_size=8))
    )
    with tqdm(
        total=len(indices),
        desc="normalisation statistics",
        leave=False,
        disable=None if jax.process_index() == 0 else True,
    ) as progress:
      for k, counts in enumerate(sums):
        total = total + counts
        progress.update(len(chunks[k]))
    all_processes = parallel.allgather(np.asarray(total)[None]).sum(axis=0)
    return augment_lib.normalization_stats(all_processes)
