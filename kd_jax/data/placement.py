"""How training data meets the devices: the interface the training loop uses, and its parts.

Two kinds of training data implement `TrainingData`: `in_memory.DeviceData`,
a dataset copied to device memory once as uint8, whose steps gather their
batches there; and `streaming.StreamedData`, read from disk as training
goes, whose batches are decoded and resized on the host. The loop uses
nothing else, so it cannot tell them apart: for the same (seed, epoch) both
give the same examples in the same order, and `student_view` augments each
step's batch on the device into the same images, in the same step program.

Rows: every process pads its share of a split to one block size
(`RowLayout`), so the global arrays split evenly over the mesh and an
example is found by its row whatever the process count.
"""

from typing import Any, Callable, Iterator, Protocol

import jax
import numpy as np

from kd_jax import parallel


class TrainingData(Protocol):
  """A dataset as the training loop sees it, in memory or streamed.

  Attributes:
    num_classes: classes of the labels.
    image_shape: (H, W, C) of every image a step sees.
    mean_C, std_C: the training split's per-channel statistics (0..1 scale)
      that `student_view` and evaluation normalise with.
    train_layout, test_layout: where each split's examples sit among the rows.
  """

  num_classes: int
  image_shape: tuple[int, int, int]
  mean_C: np.ndarray
  std_C: np.ndarray
  train_layout: "RowLayout"
  test_layout: "RowLayout"

  @property
  def num_train(self) -> int:
    """Training examples over all processes."""

  def steps_per_epoch(self, batch_size: int) -> int:
    """Steps of one epoch at the global `batch_size`."""

  def train_batches(
      self, seed: int, epoch: int, start: int, batch_size: int, per_example: Any = None
  ) -> Iterator[dict]:
    """The global batches of steps `start`.. of `epoch`: "image" (uint8), "label", "index"
    (each example's place in one-process order, the same whatever the process count) and,
    with `per_example` (from `put_per_example`), each example's rows of it as "teacher_logits"."""

  def student_view(self, seed: int, step: jax.Array, images_BxHxWxC: jax.Array) -> jax.Array:
    """What the student sees at `step` of a run seeded `seed`, from that step's batch "image":
    augmented (with draws that are a pure function of (seed, step)), then normalised.

    Runs inside the jitted step; the one function the train step and the
    teacher-logit cache make views with.
    """

  def put_per_example(self, stored: dict[str, np.ndarray]) -> Any:
    """Per-example arrays given for every example (one-process order), placed for `train_batches`."""

  def predict(
      self, forward: Callable, variables: Any, split: str, batch_size: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of every example of `split` ('train' or 'test'), unaugmented,
    in one-process order; `forward(variables, uint8 images)` gives the logits."""


class RowLayout:
  """Where each example of one split lives among the rows of its global arrays.

  Every process pads its share of the examples to one block size, a multiple
  of its device count, and its block takes the rows of its own devices.
  `rows` gives the row of each example in the order of a one-process load, so
  addressing data by row picks the same examples whatever the process count.
  """

  def __init__(self, counts_P: np.ndarray):
    local = jax.local_device_count()
    self.block = -(-int(counts_P.max()) // local) * local
    self.num_rows = self.block * len(counts_P)
    self.rows = np.concatenate(
        [p * self.block + np.arange(c) for p, c in enumerate(counts_P)]
    ).astype(np.int32)

  def pad(self, share: np.ndarray) -> np.ndarray:
    """This process's share padded with zeros to the block size."""
    padded = np.zeros((self.block, *share.shape[1:]), share.dtype)
    padded[: len(share)] = share
    return padded

  def spread(self, share: np.ndarray, mesh) -> jax.Array:
    """The global array, split by rows over the mesh, of every process's share."""
    return jax.make_array_from_process_local_data(
        parallel.batch_sharding(mesh), self.pad(share), (self.num_rows, *share.shape[1:])
    )

  def gather_all(self, share: np.ndarray) -> np.ndarray:
    """Every process's share, by row, in host memory on every process."""
    return parallel.allgather(self.pad(share))

  def every_example(self, share: np.ndarray) -> np.ndarray:
    """Every process's share, in one-process order (the rows without their padding)."""
    return self.gather_all(share)[self.rows]

  def by_row(self, per_example: np.ndarray) -> np.ndarray:
    """An array of one entry per example (all processes'), laid out by row."""
    by_row = np.zeros((self.num_rows, *per_example.shape[1:]), per_example.dtype)
    by_row[self.rows] = per_example
    return by_row


def epoch_indices(seed: int, epoch: int, count: int, batch_size: int) -> np.ndarray:
  """The shuffled example order of one epoch, as steps x batch_size indices.

  A pure function of (seed, epoch), so an epoch can be replayed exactly; the
  last partial batch is dropped so that every step has the same shape.
  """
  steps = count // batch_size
  order = np.random.default_rng([seed, epoch]).permutation(count)
  return order[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def make_gather(mesh) -> Callable:
  """A jitted `gather(arrays, indices_B)` whose batches are split over the mesh."""
  return parallel.in_order(
      jax.jit(
          lambda arrays, indices_B: jax.tree.map(lambda a: a[indices_B], arrays),
          out_shardings=parallel.batch_sharding(mesh),
      )
  )
