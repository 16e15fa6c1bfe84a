"""Classification datasets loaded into host memory as uint8 arrays: whole, or
one process's share of each split in a multi-host run.

`load_dataset` reads the `data` section of the config:

  source: 'digits' (scikit-learn's bundled digits, no download), 'folder'
    (an image-folder tree) or 'tfds' (a TensorFlow Datasets dataset).
  name: the TFDS dataset name, e.g. 'cifar10' (source 'tfds').
  dir: root of the image-folder tree (source 'folder').
  image_size: side of the square images to resize to; 0 keeps the data's own
    size (for a folder of mixed sizes, the most common size).
  train_split, test_split: TFDS split names, or (source 'folder') the names of the
    training and test folders under dir; default 'train' and 'test'.
  download: whether TFDS may download and prepare a missing dataset.
  tfds_data_dir: optional TFDS data directory; unset means the TFDS default
    ($TFDS_DATA_DIR or ~/tensorflow_datasets).
  in_memory: 'true' (decode everything up front), 'false' (stream: see
    kd_jax/data/streaming.py) or 'auto': stream when the decoded images of this
    process's share would take more than memory_budget_gb.

`open_dataset` opens the same sources for streaming instead: nothing is
decoded until read.
"""

import dataclasses
import hashlib
import json
from typing import Protocol, Sequence

import numpy as np

from kd_jax.errors import UserInputError

SOURCES = ("digits", "folder", "tfds")
IN_MEMORY = ("true", "false", "auto")  # data.in_memory, in any case


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A classification dataset held in host memory as uint8 images.

  Attributes:
    train_images: uint8, N x H x W x C with C = 1 or 3.
    train_labels: int32, N; each an index into `class_names`.
    test_images: uint8, M x H x W x C.
    test_labels: int32, M.
    class_names: the class names, in label order.
    train_files: for folder data, each training image's path relative to
      data.dir with '/' separators (e.g. 'train/cat/0001.jpg'), in the order of
      `train_images`; empty for other sources.
  """

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple[str, ...]
  train_files: tuple[str, ...] = ()

  @property
  def num_classes(self) -> int:
    """Number of classes."""
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of every image."""
    return tuple(self.train_images.shape[1:])

  @property
  def split_sizes(self) -> tuple[int, int]:
    """(training, test) examples held."""
    return len(self.train_labels), len(self.test_labels)

  def digest(self) -> bytes:
    """A hash of the training images and labels held (for cache keys)."""
    digest = hashlib.sha256(np.ascontiguousarray(self.train_images).tobytes())
    digest.update(np.ascontiguousarray(self.train_labels).tobytes())
    return digest.digest()

  def share(self, process_index: int, process_count: int) -> "Dataset":
    """The even, contiguous share of each split that process `process_index` holds."""
    train = share_of(len(self.train_labels), process_index, process_count)
    test = share_of(len(self.test_labels), process_index, process_count)
    return dataclasses.replace(
        self,
        train_images=self.train_images[train],
        train_labels=self.train_labels[train],
        test_images=self.test_images[test],
        test_labels=self.test_labels[test],
        train_files=self.train_files[train],
    )


class ImageSource(Protocol):
  """One split of a dataset, read image by image: `source[i]` is (uint8 H x W x C image, label)."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    ...

  def identity(self) -> list:
    """JSON-able data that names what the split holds (for cache keys)."""


@dataclasses.dataclass(frozen=True, eq=False)
class StreamedDataset:
  """A dataset opened for streaming: this process's share of each split, decoded when read.

  Attributes:
    train: the training split's source.
    test: the test split's source.
    class_names: the class names, in label order.
    image_shape: (H, W, C) every image is resized (and augmented) to.
    train_files: as for `Dataset`.
  """

  train: ImageSource
  test: ImageSource
  class_names: tuple[str, ...]
  image_shape: tuple[int, int, int]
  train_files: Sequence[str] = ()

  @property
  def num_classes(self) -> int:
    """Number of classes."""
    return len(self.class_names)

  @property
  def split_sizes(self) -> tuple[int, int]:
    """(training, test) examples in this process's share."""
    return len(self.train), len(self.test)

  def digest(self) -> bytes:
    """A hash of what names the training data and its preprocessing (for cache keys)."""
    identity = [self.train.identity(), list(self.image_shape)]
    return hashlib.sha256(json.dumps(identity).encode()).digest()


def share_of(count: int, process_index: int, process_count: int) -> slice:
  """Process `process_index`'s even, contiguous share of `count` examples."""
  return slice(count * process_index // process_count, count * (process_index + 1) // process_count)


def load_dataset(data_config, process_index: int = 0, process_count: int = 1) -> Dataset:
  """Loads the dataset that `data_config` (the config's `data` section) names.

  Args:
    data_config: a ConfigDict (or dict) with the fields in the module docstring.
    process_index: which process of a multi-host run this is...
    process_count: ...of how many. Each loads (and decodes) only its even,
      contiguous share of each split, in order: process 0 the first part.

  Returns:
    This process's share of the dataset, in host memory.

  Raises:
    UserInputError: the config or the data it points at is unusable.
  """
  source = data_config.get("source")
  image_size = _image_size(data_config.get("image_size", 0))
  # Sources are imported only when chosen: TFDS pulls in TensorFlow, which takes
  # seconds to import and is not needed for the other sources.
  if source == "digits":
    from kd_jax.data import digits  # pylint: disable=g-import-not-at-top

    return digits.load(image_size).share(process_index, process_count)
  if source == "folder":
    from kd_jax.data import folder  # pylint: disable=g-import-not-at-top

    return folder.load(
        data_config.get("dir"), image_size, process_index, process_count, _folders(data_config)
    )
  if source == "tfds":
    from kd_jax.data import tfds_source  # pylint: disable=g-import-not-at-top

    return tfds_source.load(
        name=data_config.get("name"),
        train_split=data_config.get("train_split", "train"),
        test_split=data_config.get("test_split", "test"),
        image_size=image_size,
        download=bool(data_config.get("download", False)),
        data_dir=data_config.get("tfds_data_dir") or None,
        process_index=process_index,
        process_count=process_count,
    )
  raise UserInputError(
      f"data.source={source!r} is not a known source: use one of " f'{", ".join(SOURCES)}'
  )


def open_dataset(data_config, process_index: int = 0, process_count: int = 1) -> StreamedDataset:
  """Opens the dataset that `data_config` names for streaming (folder or TFDS sources).

  Lists the files (or opens the TFDS records) of this process's share of
  each split, decoding only the first training image when data.image_size
  is 0 and the source does not say its images' size.

  Raises:
    UserInputError: the config or the data it points at is unusable.
  """
  source = data_config.get("source")
  image_size = _image_size(data_config.get("image_size", 0))
  if source == "folder":
    from kd_jax.data import folder  # pylint: disable=g-import-not-at-top

    train, test, class_names = folder.open_splits(
        data_config.get("dir"), process_index, process_count, _folders(data_config)
    )
    shape, train_files = (None, None, 3), train.files
  elif source == "tfds":
    from kd_jax.data import tfds_source  # pylint: disable=g-import-not-at-top

    train, test, class_names, shape = tfds_source.open_splits(
        name=data_config.get("name"),
        train_split=data_config.get("train_split", "train"),
        test_split=data_config.get("test_split", "test"),
        download=bool(data_config.get("download", False)),
        data_dir=data_config.get("tfds_data_dir") or None,
        process_index=process_index,
        process_count=process_count,
    )
    train_files = ()
  else:
    raise UserInputError(
        f"data.source={source!r} cannot be streamed: use data.source=folder or tfds, "
        "or data.in_memory=true"
    )
  if image_size:
    height = width = image_size
  elif shape[0] is not None:
    height, width = shape[:2]
  else:
    height, width = train[0][0].shape[:2]
  if height != width:
    raise UserInputError(
        f"streamed images are made square, and these are {height}x{width}: set data.image_size"
    )
  return StreamedDataset(train, test, class_names, (height, width, shape[-1]), train_files)


def streams(data_config, process_count: int = 1) -> bool:
  """Whether data.in_memory asks to stream (for 'auto': whether the data is too big to hold).

  'auto' compares the decoded size of one process's share of both splits
  with data.memory_budget_gb; the counts come from the file listing or the
  TFDS metadata, so nothing is decoded to decide.
  """
  choice = str(data_config.get("in_memory", "true")).lower()
  if choice not in IN_MEMORY:
    raise UserInputError(f"data.in_memory={choice!r}: use true, false or auto")
  if choice != "auto" or data_config.get("source") == "digits":
    return choice == "false"
  count, image_shape = _size_of(data_config)
  decoded_gb = count * np.prod(image_shape) / process_count / 2**30
  return decoded_gb > float(data_config.get("memory_budget_gb", 16))


def _size_of(data_config) -> tuple[int, tuple]:
  """(examples in both splits, image shape) as the listing or metadata tell, decoding at most one image."""
  if data_config.get("source") == "tfds":
    from kd_jax.data import tfds_source  # pylint: disable=g-import-not-at-top

    return tfds_source.size_of(
        data_config.get("name"),
        (data_config.get("train_split", "train"), data_config.get("test_split", "test")),
        _image_size(data_config.get("image_size", 0)),
        data_config.get("tfds_data_dir") or None,
    )
  dataset = open_dataset(data_config)
  return len(dataset.train) + len(dataset.test), dataset.image_shape


def _folders(data_config) -> tuple[str, str]:
  """The training and test folders of an image folder: data.train_split and data.test_split."""
  return data_config.get("train_split", "train"), data_config.get("test_split", "test")


def _image_size(value) -> int:
  """Checks data.image_size and returns it as an int."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (value < 0):
    raise UserInputError(
        f"data.image_size={value!r} is not a size: give a positive integer, "
        "or 0 to keep the images' own size"
    )
  return int(value)
