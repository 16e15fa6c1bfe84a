"""Classification datasets loaded into host memory as uint8 arrays: whole, or
one process's share of each split in a multi-host run.

`load_dataset` reads the `data` section of the config:

  source: 'digits' (scikit-learn's bundled digits, no download), 'folder'
    (an image-folder tree) or 'tfds' (a TensorFlow Datasets dataset).
  name: the TFDS dataset name, e.g. 'cifar10' (source 'tfds').
  dir: root of the image-folder tree (source 'folder').
  image_size: side of the square images to resize to; 0 keeps the data's own
    size (for a folder of mixed sizes, the most common size).
  train_split, test_split: TFDS split names, default 'train' and 'test'.
  download: whether TFDS may download and prepare a missing dataset.
  tfds_data_dir: optional TFDS data directory; unset means the TFDS default
    ($TFDS_DATA_DIR or ~/tensorflow_datasets).
"""

import dataclasses

import numpy as np

from kd_jax.errors import UserInputError

SOURCES = ("digits", "folder", "tfds")


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

    return folder.load(data_config.get("dir"), image_size, process_index, process_count)
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


def _image_size(value) -> int:
  """Checks data.image_size and returns it as an int."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (value < 0):
    raise UserInputError(
        f"data.image_size={value!r} is not a size: give a positive integer, "
        "or 0 to keep the images' own size"
    )
  return int(value)
