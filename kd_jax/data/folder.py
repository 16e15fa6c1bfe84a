"""Image-folder source: root/<split>/<class>/<image>, decoded with OpenCV.

The split folders are train/ and test/ unless named otherwise (data.train_split
and data.test_split, e.g. ImageNet's train/ and val/).

Class indices follow the sorted class folder names; files are read in sorted
order within each class, so every load gives the same arrays. Images are
decoded to RGB (grayscale is expanded, alpha dropped). With image_size 0 the
most common image size across both splits is kept and other images are resized
to it.
"""

import collections
from concurrent import futures
import os

from absl import logging
import cv2
import numpy as np

from kd_jax.data import Dataset, share_of
from kd_jax.data import resize
from kd_jax.errors import UserInputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
SPLITS = ("train", "test")
# Chunks of a few hundred files amortize the pool overhead; one task per file
# is slower than a plain loop.
_CHUNK_FILES = 500
_MAX_WORKERS = 4
# Up to this fraction of a split (and always one file) may be undecodable.
_MAX_BAD_FRACTION = 0.01


def load(
    root: str | None,
    image_size: int,
    process_index: int = 0,
    process_count: int = 1,
    folders: tuple[str, str] = SPLITS,
) -> Dataset:
  """Loads an image-folder tree, or one process's share of it.

  Args:
    root: the folder holding train/<class>/ and test/<class>/ (data.dir).
    image_size: side to resize every image to; 0 keeps the most common size.
    process_index: this process, of...
    process_count: ...this many; only this process's even share of each
      split's sorted file list is decoded.
    folders: the names of the training and test folders under root.

  Returns:
    The dataset, with `train_files` set.

  Raises:
    UserInputError: the tree is missing, malformed or has too many bad files.
  """
  *shares, class_names = open_splits(root, process_index, process_count, folders)
  splits = {}
  for split, share in zip(SPLITS, shares):
    files, labels = list(share.files), share.labels.tolist()
    images = _decode(share.root, files, image_size)
    splits[split] = _drop_undecodable(share.root, split, files, labels, images)
  if not image_size:
    _resize_to_most_common(splits)
  train_files, train_labels, train_images = splits["train"]
  _, test_labels, test_images = splits["test"]
  return Dataset(
      train_images=np.stack(train_images),
      train_labels=np.asarray(train_labels, np.int32),
      test_images=np.stack(test_images),
      test_labels=np.asarray(test_labels, np.int32),
      class_names=class_names,
      train_files=tuple(train_files),
  )


def _checked_root(root: str | None) -> str:
  """data.dir, with ~ expanded, once it is known to be a folder."""
  if not root:
    raise UserInputError(
        "data.dir is not set: point it at a folder holding train/<class>/ and "
        "test/<class>/ images"
    )
  root = os.path.expanduser(root)
  if not os.path.isdir(root):
    raise UserInputError(f"data.dir {root} does not exist or is not a folder")
  return root


class FolderImages:
  """One split's images in an image-folder tree, decoded when read (random access).

  `images[i]` is (RGB uint8 image at its own size, label) of the i-th file.
  """

  def __init__(self, root: str, files: list[str], labels: list[int]):
    self.root, self.files, self.labels = root, tuple(files), np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    path = os.path.join(self.root, self.files[index])
    image = cv2.imread(path, cv2.IMREAD_COLOR_RGB)
    if image is None:
      raise UserInputError(
          f"OpenCV cannot decode {path}: fix or remove it, then rerun (training resumes "
          "from its last checkpoint)"
      )
    return image, int(self.labels[index])

  def identity(self) -> list:
    """What names this split's data: its files and labels."""
    return [self.root, list(self.files), self.labels.tolist()]


def open_splits(
    root: str | None,
    process_index: int = 0,
    process_count: int = 1,
    folders: tuple[str, str] = SPLITS,
) -> tuple[FolderImages, FolderImages, tuple[str, ...]]:
  """This process's share of each split, to be read image by image: (train, test, class names).

  `folders` names the training and test folders under root. Nothing is
  decoded: a streamed pipeline reads the images as it needs them.
  """
  root = _checked_root(root)
  class_names = _class_names(root, folders)
  splits = []
  for folder in folders:
    files, labels = _list_files(root, folder, class_names)
    share = share_of(len(files), process_index, process_count)
    splits.append(FolderImages(root, files[share], labels[share]))
  return splits[0], splits[1], class_names


def _class_names(root: str, folders: tuple[str, str]) -> tuple[str, ...]:
  """Returns the sorted class folder names, checking both splits' folders agree."""
  classes = {}
  for split in folders:
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      raise UserInputError(
          f"data.dir {root} has no {split}/ folder: expected " f"{split}/<class>/<image> files"
      )
    # Hidden folders (.ipynb_checkpoints and the like) are not classes.
    classes[split] = {
        entry.name
        for entry in os.scandir(split_dir)
        if entry.is_dir() and not entry.name.startswith(".")
    }
    if not classes[split]:
      raise UserInputError(f"{split_dir} has no class folders: expected {split}/<class>/<image>")
  train, test = folders
  if classes[train] != classes[test]:
    only_train = ", ".join(sorted(classes[train] - classes[test])) or "-"
    only_test = ", ".join(sorted(classes[test] - classes[train])) or "-"
    raise UserInputError(
        f"{train}/ and {test}/ in {root} have different classes (only in {train}: "
        f"{only_train}; only in {test}: {only_test}): give both the same class "
        "folders"
    )
  return tuple(sorted(classes[train]))


def _list_files(root: str, split: str, class_names: tuple[str, ...]) -> tuple[list[str], list[int]]:
  """Lists a split's image files (root-relative, '/'-separated) and labels."""
  files, labels = [], []
  for label, name in enumerate(class_names):
    class_dir = os.path.join(root, split, name)
    names = sorted(
        entry.name
        for entry in os.scandir(class_dir)
        if entry.name.lower().endswith(IMAGE_SUFFIXES) and entry.is_file()
    )
    if not names:
      raise UserInputError(
          f"class folder {class_dir} has no images "
          f'({"/".join(IMAGE_SUFFIXES)}): add some or remove the folder'
      )
    files.extend(f"{split}/{name}/{file_name}" for file_name in names)
    labels.extend([label] * len(names))
  return files, labels


def _decode(root: str, files: list[str], image_size: int) -> list[np.ndarray | None]:
  """Decodes files in a thread pool (OpenCV releases the GIL); None if bad."""
  paths = [os.path.join(root, f) for f in files]
  chunks = [paths[i : i + _CHUNK_FILES] for i in range(0, len(paths), _CHUNK_FILES)]
  workers = min(_MAX_WORKERS, os.cpu_count() or 1, len(chunks))
  with futures.ThreadPoolExecutor(workers) as pool:
    decoded = pool.map(_decode_chunk, chunks, [image_size] * len(chunks))
    return [image for chunk in decoded for image in chunk]


def _decode_chunk(paths: list[str], image_size: int) -> list[np.ndarray | None]:
  """Decodes paths to RGB, resized to image_size (unless 0)."""
  images = []
  for path in paths:
    image = cv2.imread(path, cv2.IMREAD_COLOR_RGB)
    if image is not None and image_size:
      image = resize.resize_image(image, image_size, image_size)
    images.append(image)
  return images


def read_image(path: str, height: int, width: int, channels: int) -> np.ndarray | None:
  """One image decoded as training decodes it, or None if OpenCV cannot read it.

  RGB for 3-channel data, grayscale for 1-channel data, resized to
  height x width: what predictions on new images need to match training.
  """
  image = cv2.imread(path, cv2.IMREAD_COLOR_RGB if channels == 3 else cv2.IMREAD_GRAYSCALE)
  if image is None:
    return None
  return resize.resize_image(image.reshape(*image.shape[:2], channels), height, width)


def _drop_undecodable(root, split, files, labels, images):
  """Skips, with a warning, the few files OpenCV cannot decode.

  Args:
    root: data.dir.
    split: 'train' or 'test'.
    files: relative paths.
    labels: one label per file.
    images: decoded images, None for a bad file.

  Returns:
    (files, labels, images) without the bad files.

  Raises:
    UserInputError: more than 1% of the split (and more than one file) is bad.
  """
  bad = [f for f, image in zip(files, images) if image is None]
  if len(bad) > max(1, int(_MAX_BAD_FRACTION * len(files))):
    examples = ", ".join(os.path.join(root, f) for f in bad[:3])
    raise UserInputError(
        f"{len(bad)} of {len(files)} {split} images in {root} cannot be "
        f"decoded, e.g. {examples}: fix or remove them"
    )
  for f in bad:
    logging.warning("Skipping %s: OpenCV cannot decode it.", os.path.join(root, f))
  kept = [i for i, image in enumerate(images) if image is not None]
  return ([files[i] for i in kept], [labels[i] for i in kept], [images[i] for i in kept])


def _resize_to_most_common(splits) -> None:
  """Resizes, in place, every image to the most common size of both splits."""
  sizes = collections.Counter(
      image.shape[:2] for _, _, images in splits.values() for image in images
  )
  (height, width), count = sizes.most_common(1)[0]
  if count < sum(sizes.values()):
    logging.warning(
        "Images differ in size; resizing %d of them to the most common size "
        "%dx%d (set data.image_size to choose the size).",
        sum(sizes.values()) - count,
        height,
        width,
    )
  for _, _, images in splits.values():
    images[:] = [resize.resize_image(image, height, width) for image in images]
