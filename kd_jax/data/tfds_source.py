"""TFDS source: any TFDS image-classification dataset, read whole into numpy or
opened for random access (streaming).

Data already prepared in the TFDS data directory is read without touching the
network. Only when it is missing, and data.download allows it, is the dataset
downloaded and prepared, after a quick check that the network is reachable:
offline, TFDS itself retries for minutes before failing.
"""

import socket
import threading

import cv2
import numpy as np

from kd_jax.data import Dataset
from kd_jax.data import resize
from kd_jax.errors import UserInputError

try:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
except ImportError as e:  # kd_jax imports this module only for data.source='tfds'
  raise UserInputError(
      f"data.source='tfds' needs the {e.name or 'tensorflow_datasets'} package, which is not "
      "installed: pip install tensorflow-cpu tensorflow-datasets, or use data.source=folder"
  ) from None

_PROBE_ADDRESS = ("storage.googleapis.com", 443)
_PROBE_TIMEOUT_S = 5.0
# batch_size=-1 in tfds.load/as_dataset batches by the split size from the
# dataset info, which is empty under tfds.testing.mock_data and then aborts the
# process; fixed batches work in both cases.
_BATCH = 1024


def network_reachable() -> bool:
  """Says whether a TFDS download server accepts a connection within 5 s."""
  reached = []

  def probe():
    try:
      with socket.create_connection(_PROBE_ADDRESS, timeout=_PROBE_TIMEOUT_S):
        reached.append(True)
    except OSError:
      pass

  # Name resolution ignores the socket timeout, so the probe runs in a daemon
  # thread that is abandoned if it hangs.
  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(_PROBE_TIMEOUT_S)
  return bool(reached)


def load(
    name: str | None,
    train_split: str,
    test_split: str,
    image_size: int,
    download: bool,
    data_dir: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Dataset:
  """Loads a TFDS image-classification dataset whole, or one process's share of it.

  Args:
    name: TFDS dataset name, e.g. 'cifar10' (data.name).
    train_split: TFDS split for training, e.g. 'train' or 'train[:90%]'.
    test_split: TFDS split for testing.
    image_size: side to resize to; 0 keeps the dataset's size.
    download: whether a missing dataset may be downloaded and prepared.
    data_dir: TFDS data directory; None for the TFDS default.
    process_index: this process, of...
    process_count: ...this many; each reads only its part of each split
      (tfds.split_for_jax_process).

  Returns:
    The dataset.

  Raises:
    UserInputError: unknown name or split, unsuitable dataset, or missing data
      that cannot be fetched.
  """
  builder = _builder(name, data_dir)
  splits = _process_splits(train_split, test_split, process_index, process_count)
  try:
    datasets = _as_datasets(builder, name, splits)
  except AssertionError:
    # as_dataset asserts that the prepared files exist.
    if builder.is_prepared():
      raise
    _download_and_prepare(builder, name, download, data_dir)
    datasets = _as_datasets(builder, name, splits)
  label_key = builder.info.supervised_keys[1]
  class_names = tuple(builder.info.features[label_key].names)
  (train_images, train_labels), (test_images, test_labels) = (
      _to_numpy(ds, name, f"{key}={splits[key]!r}", image_size) for key, ds in datasets.items()
  )
  return Dataset(
      train_images=train_images,
      train_labels=train_labels,
      test_images=test_images,
      test_labels=test_labels,
      class_names=class_names,
  )


class TfdsImages:
  """One split of a TFDS dataset prepared as ArrayRecord, read record by record.

  `images[i]` is (uint8 image at its own size, label); the image is decoded
  with OpenCV, as image folders are.
  """

  def __init__(self, source, name: str, split: str, image_key: str, label_key: str, channels: int):
    self._source, self._name, self._split = source, name, split
    self._image_key, self._label_key, self._channels = image_key, label_key, channels

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    record = self._source[index]
    flag = cv2.IMREAD_COLOR_RGB if self._channels == 3 else cv2.IMREAD_GRAYSCALE
    image = cv2.imdecode(np.frombuffer(record[self._image_key], np.uint8), flag)
    if image is None:
      raise UserInputError(
          f"OpenCV cannot decode record {index} of {self._split} of TFDS dataset {self._name!r}"
      )
    return image.reshape(*image.shape[:2], self._channels), int(record[self._label_key])

  def identity(self) -> list:
    """What names this split's data: dataset, version, split and size."""
    return [self._name, str(self._source.dataset_info.version), self._split, len(self)]


def open_splits(
    name: str | None,
    train_split: str,
    test_split: str,
    download: bool,
    data_dir: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[TfdsImages, TfdsImages, tuple[str, ...], tuple]:
  """This process's share of each split, read record by record: (train, test, class names, image shape).

  Streaming needs random access, so the dataset must be prepared in the
  ArrayRecord format; the image shape has None for sizes that vary.
  """
  builder = _builder(name, data_dir)
  splits = _process_splits(train_split, test_split, process_index, process_count)
  keys = _supervised_keys(builder, name)
  try:
    opened = _as_sources(builder, name, splits, keys)
  except (AssertionError, FileNotFoundError):
    if builder.is_prepared():
      raise
    _download_and_prepare(builder, name, download, data_dir)
    opened = _as_sources(builder, name, splits, keys)
  image_shape = tuple(builder.info.features[keys[0]].shape)
  class_names = tuple(builder.info.features[keys[1]].names)
  return opened["data.train_split"], opened["data.test_split"], class_names, image_shape


def size_of(name: str | None, splits, image_size: int, data_dir: str | None) -> tuple[int, tuple]:
  """(examples in `splits`, image shape) from the dataset's metadata; 0 examples if it has none."""
  builder = _builder(name, data_dir)
  keys = _supervised_keys(builder, name)
  try:
    count = sum(builder.info.splits[split].num_examples for split in splits)
  except KeyError:  # not prepared yet (or mocked): nothing to measure
    count = 0
  shape = builder.info.features[keys[0]].shape
  if image_size:
    shape = (image_size, image_size, shape[-1])
  return count, tuple(s or 0 for s in shape)


def _as_sources(builder, name, splits, keys) -> dict[str, TfdsImages]:
  """Maps each config key to its split opened for random access."""
  channels = builder.info.features[keys[0]].shape[-1]
  opened = {}
  for key, split in splits.items():
    try:
      source = builder.as_data_source(split, decoders={keys[0]: tfds.decode.SkipDecoding()})
    except NotImplementedError:
      raise UserInputError(
          f"TFDS dataset {name!r} in {builder.data_dir} is stored as "
          f"{builder.info.file_format}, which cannot be read image by image: prepare it "
          f"with `tfds build {name} --file_format=array_record`, use an image folder, or "
          "set data.in_memory=true"
      ) from None
    except ValueError as e:
      raise UserInputError(
          f"{key}={split!r} is not a split of TFDS dataset {name!r}: {_first_line(e)}"
      ) from None
    if not len(source):
      raise UserInputError(f"{key}={split!r} of TFDS dataset {name!r} has no examples")
    opened[key] = TfdsImages(source, name, split, *keys, channels)
  return opened


def _builder(name: str | None, data_dir: str | None):
  """The TFDS builder of data.name, or a clear error."""
  if not name:
    raise UserInputError("data.name is not set: give a TFDS dataset name such as cifar10")
  try:
    return tfds.builder(name, data_dir=data_dir)
  except (ValueError, AssertionError) as e:
    raise UserInputError(
        f"data.name: TFDS cannot load dataset {name!r} ({_first_line(e)}); see "
        "https://www.tensorflow.org/datasets/catalog"
    ) from None


def _process_splits(train_split, test_split, process_index, process_count) -> dict[str, str]:
  """Each config key's split, narrowed to this process's part in a multi-host run."""
  splits = {"data.train_split": train_split, "data.test_split": test_split}
  if process_count == 1:
    return splits
  return {
      key: tfds.split_for_jax_process(
          split, process_index=process_index, process_count=process_count
      )
      for key, split in splits.items()
  }


def _supervised_keys(builder, name) -> tuple[str, str]:
  """The (image, label) feature names, checking the dataset classifies images."""
  keys = builder.info.supervised_keys
  if not keys or not isinstance(builder.info.features[keys[1]], tfds.features.ClassLabel):
    raise UserInputError(
        f"data.name: TFDS dataset {name!r} is not an image-classification "
        "dataset (no image/class-label supervised keys)"
    )
  return keys


def _as_datasets(builder, name, splits):
  """Maps each config key to its split's (image, label) tf.data.Dataset."""
  _supervised_keys(builder, name)  # a clear error for datasets that are not image classification
  datasets = {}
  for key, split in splits.items():
    try:
      datasets[key] = builder.as_dataset(split=split, as_supervised=True)
    except ValueError as e:
      raise UserInputError(
          f"{key}={split!r} is not a split of TFDS dataset {name!r}: " f"{_first_line(e)}"
      ) from None
  return datasets


def _download_and_prepare(builder, name, download, data_dir) -> None:
  """Fetches a dataset that is not prepared locally, failing fast offline."""
  if not download:
    raise UserInputError(
        f"TFDS dataset {name!r} is not prepared in {builder.data_dir} and "
        "data.download is false: set --config.data.download=true or prepare "
        "it there first"
    )
  if not network_reachable():
    raise UserInputError(
        f"cannot fetch TFDS dataset {name!r}: the machine may be offline; "
        f'prepare it elsewhere into {data_dir or "~/tensorflow_datasets"}, or '
        "use --config.data.source=folder --config.data.dir=/path/to/tree"
    )
  builder.download_and_prepare()


def _to_numpy(ds, name: str, split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Reads a whole (image, label) dataset into uint8 images, int32 labels.

  Args:
    ds: the split's tf.data.Dataset of (image, label).
    name: the TFDS dataset name, for messages.
    split: the split's config key and value, for messages.
    image_size: side to resize to; 0 keeps the dataset's size.

  Returns:
    (images, labels).
  """
  spec = ds.element_spec[0]
  if spec.dtype.as_numpy_dtype != np.uint8 or spec.shape.rank != 3:
    raise UserInputError(
        f"data.name: TFDS dataset {name!r} does not have H x W x C uint8 " "images"
    )
  parts = []
  if spec.shape.is_fully_defined():
    parts.extend(tfds.as_numpy(ds.batch(_BATCH)))
  elif image_size:
    # Images of varying size cannot be batched: resize one at a time.
    for image, label in tfds.as_numpy(ds):
      image = resize.resize_image(image, image_size, image_size)
      parts.append((image[None], np.reshape(label, 1)))
  else:
    raise UserInputError(
        f"TFDS dataset {name!r} has images of varying size: set " "data.image_size"
    )
  if not parts:
    raise UserInputError(f"{split} of TFDS dataset {name!r} has no examples")
  images = resize.resize_images(np.concatenate([p[0] for p in parts]), image_size)
  labels = np.concatenate([p[1] for p in parts]).astype(np.int32)
  return images, labels


def _first_line(error: Exception) -> str:
  """First line of an exception's message; TFDS appends long listings."""
  return str(error).strip().split("\n", 1)[0]
