"""Tests for kd_jax.data: the folder, TFDS and digits sources."""

import logging
import os
import socket
import time

import cv2
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from kd_jax import data
from kd_jax.data import tfds_source
from kd_jax.errors import UserInputError

RED_BGR = (0, 0, 255)


def _config(**fields):
  """A data config with the defaults the project's config uses."""
  defaults = {
      "source": "folder",
      "name": "",
      "dir": "",
      "image_size": 0,
      "train_split": "train",
      "test_split": "test",
      "download": False,
      "tfds_data_dir": None,
  }
  return ml_collections.ConfigDict({**defaults, **fields})


def _write(path, image):
  """Writes an image with OpenCV, creating its folder."""
  path.parent.mkdir(parents=True, exist_ok=True)
  assert cv2.imwrite(str(path), image)


def _solid(value, size=6, channels=3):
  """A size x size image filled with value (a BGR(A) tuple or a gray level)."""
  shape = (size, size, channels) if channels > 1 else (size, size)
  return np.broadcast_to(np.array(value, np.uint8), shape).copy()


def _load_folder(root, **fields):
  return data.load_dataset(_config(source="folder", dir=str(root), **fields))


@pytest.fixture
def tree(tmp_path):
  """A small tree with mixed formats, channels and sizes.

  train: ant: red.png, blue.jpg (+ notes.txt, ignored); cat: gray.png,
  rgba.png; dog: big.bmp (12x12), up.JPEG. test: one image per class.
  """
  train = tmp_path / "train"
  _write(train / "ant" / "red.png", _solid(RED_BGR))
  _write(train / "ant" / "blue.jpg", _solid((255, 0, 0)))
  (train / "ant" / "notes.txt").write_text("not an image")
  _write(train / "cat" / "gray.png", _solid(77, channels=1))
  _write(train / "cat" / "rgba.png", _solid((0, 255, 0, 128), channels=4))
  _write(train / "dog" / "big.bmp", _solid(RED_BGR, size=12))
  _write(train / "dog" / "up.JPEG", _solid((90, 90, 90)))
  for name in ("ant", "cat", "dog"):
    _write(tmp_path / "test" / name / "x.png", _solid((10, 20, 30)))
  return tmp_path


def test_folder_loads_rgb_sorted_and_resized(tree):
  ds = _load_folder(tree)
  assert ds.class_names == ("ant", "cat", "dog")
  assert ds.num_classes == 3
  assert ds.train_images.dtype == np.uint8
  assert ds.train_images.shape == (6, 6, 6, 3)
  assert ds.test_images.shape == (3, 6, 6, 3)
  assert ds.image_shape == (6, 6, 3)
  assert ds.train_labels.dtype == np.int32
  np.testing.assert_array_equal(ds.train_labels, [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(ds.test_labels, [0, 1, 2])
  assert ds.train_files == (
      "train/ant/blue.jpg",
      "train/ant/red.png",
      "train/cat/gray.png",
      "train/cat/rgba.png",
      "train/dog/big.bmp",
      "train/dog/up.JPEG",
  )
  red, gray, rgba, big = (ds.train_images[i] for i in (1, 2, 3, 4))
  np.testing.assert_array_equal(red[0, 0], [255, 0, 0])
  np.testing.assert_array_equal(gray, np.full((6, 6, 3), 77))
  np.testing.assert_array_equal(rgba[0, 0], [0, 255, 0])
  np.testing.assert_array_equal(big[..., 0], np.full((6, 6), 255))
  np.testing.assert_array_equal(ds.test_images[0, 0, 0], [30, 20, 10])


def test_folder_image_size_resizes_everything(tree):
  ds = _load_folder(tree, image_size=4)
  assert ds.train_images.shape == (6, 4, 4, 3)
  assert ds.test_images.shape == (3, 4, 4, 3)


def test_folder_dir_not_set():
  with pytest.raises(UserInputError, match="data.dir is not set"):
    data.load_dataset(_config(source="folder", dir=None))


def test_folder_dir_missing(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(UserInputError, match=f"data.dir {missing} does not"):
    _load_folder(missing)


def test_folder_without_test_split(tree):
  os.rename(tree / "test", tree / "val")
  with pytest.raises(UserInputError, match="has no test/ folder"):
    _load_folder(tree)


def test_folder_without_classes(tmp_path):
  (tmp_path / "train").mkdir()
  (tmp_path / "test").mkdir()
  train = tmp_path / "train"
  with pytest.raises(UserInputError, match=f"{train} has no class folders"):
    _load_folder(tmp_path)


def test_folder_class_without_images(tree):
  for image in (tree / "test" / "cat").iterdir():
    image.unlink()
  (tree / "test" / "cat" / "readme.txt").write_text("empty")
  with pytest.raises(UserInputError, match=f'class folder {tree / "test" / "cat"} has no'):
    _load_folder(tree)


def test_folder_different_classes(tree):
  os.rename(tree / "test" / "dog", tree / "test" / "wolf")
  with pytest.raises(UserInputError, match="only in train: dog; only in test: wolf"):
    _load_folder(tree)


def _many_images(root, num_good, num_bad):
  """A two-class tree, num_good images and num_bad corrupt ones per split."""
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for i in range(num_good):
      _write(root / split / f"c{i % 2}" / f"{i:03d}.png", _solid(i % 256, 4))
    for i in range(num_bad):
      (root / split / "c0" / f"bad{i}.jpg").write_bytes(rng.bytes(300))


def test_folder_skips_a_corrupt_file_with_a_warning(tmp_path, caplog):
  _many_images(tmp_path, num_good=120, num_bad=1)
  with caplog.at_level(logging.WARNING):
    ds = _load_folder(tmp_path)
  assert len(ds.train_images) == len(ds.test_images) == 120
  assert "train/c0/bad0.jpg" not in ds.train_files
  assert str(tmp_path / "train" / "c0" / "bad0.jpg") in caplog.text


def test_folder_many_corrupt_files(tmp_path):
  _many_images(tmp_path, num_good=120, num_bad=5)
  with pytest.raises(
      UserInputError,
      match=r"5 of 125 train images .* cannot be decoded, "
      f'e\\.g\\. {tmp_path / "train" / "c0" / "bad0.jpg"}',
  ):
    _load_folder(tmp_path)


def test_unknown_source():
  with pytest.raises(UserInputError, match="data.source='csv'"):
    data.load_dataset(_config(source="csv"))


@pytest.mark.parametrize("size", [-1, 2.5, "32"])
def test_bad_image_size(size):
  with pytest.raises(UserInputError, match="data.image_size"):
    data.load_dataset(_config(source="digits", image_size=size))


def _tfds_config(**fields):
  return _config(**{"source": "tfds", "name": "cifar10", **fields})


def test_tfds_mock_cifar10(tmp_path):
  with tfds.testing.mock_data(num_examples=12):
    ds = data.load_dataset(_tfds_config(tfds_data_dir=str(tmp_path)))
    small = data.load_dataset(_tfds_config(image_size=16))
  assert ds.train_images.shape == ds.test_images.shape == (12, 32, 32, 3)
  assert ds.train_images.dtype == np.uint8
  assert ds.train_labels.dtype == ds.test_labels.dtype == np.int32
  assert ds.train_labels.min() >= 0 and ds.train_labels.max() < 10
  assert len(ds.class_names) == 10
  assert small.train_images.shape == (12, 16, 16, 3)


def test_tfds_offline_fails_fast(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_source, "network_reachable", lambda: False)
  start = time.monotonic()
  with pytest.raises(
      UserInputError, match="fetch TFDS dataset 'cifar10'.*offline.*" "source=folder"
  ):
    data.load_dataset(_tfds_config(download=True, tfds_data_dir=str(tmp_path)))
  assert time.monotonic() - start < 5


def test_tfds_missing_without_download(tmp_path):
  with pytest.raises(UserInputError, match="'cifar10' is not prepared.*data.download is false"):
    data.load_dataset(_tfds_config(tfds_data_dir=str(tmp_path)))


def test_tfds_unknown_name(tmp_path):
  with pytest.raises(UserInputError, match="dataset 'no_such_data'"):
    data.load_dataset(_tfds_config(name="no_such_data", tfds_data_dir=str(tmp_path)))


class TinyShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A two-class dataset prepared locally, to test reading real TFDS files."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(6, 6, 3)),
                "label": tfds.features.ClassLabel(names=["dark", "light"]),
            }
        ),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {"train": self._generate_examples(10), "test": self._generate_examples(4)}

  def _generate_examples(self, num_examples):
    for i in range(num_examples):
      yield i, {"image": _solid(200 * (i % 2)), "label": i % 2}


@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory):
  """A TFDS data dir holding a prepared TinyShapes."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  TinyShapes(data_dir=data_dir).download_and_prepare()
  return data_dir


def test_tfds_prepared_dataset_reads_offline(tiny_data_dir, monkeypatch):
  monkeypatch.setattr(tfds_source, "network_reachable", lambda: 1 / 0)
  ds = data.load_dataset(
      _tfds_config(name="tiny_shapes", tfds_data_dir=tiny_data_dir, download=True)
  )
  assert ds.class_names == ("dark", "light")
  assert ds.train_images.shape == (10, 6, 6, 3)
  assert ds.test_images.shape == (4, 6, 6, 3)
  np.testing.assert_array_equal(ds.train_images[:, 0, 0, 0], 200 * ds.train_labels)


def test_tfds_unknown_split(tiny_data_dir):
  with pytest.raises(UserInputError, match="data.test_split='val' is not"):
    data.load_dataset(
        _tfds_config(name="tiny_shapes", tfds_data_dir=tiny_data_dir, test_split="val")
    )


def test_network_probe(monkeypatch):
  with socket.create_server(("127.0.0.1", 0)) as server:
    monkeypatch.setattr(tfds_source, "_PROBE_ADDRESS", server.getsockname())
    assert tfds_source.network_reachable()
  assert not tfds_source.network_reachable()


def test_digits():
  ds = data.load_dataset(_config(source="digits"))
  again = data.load_dataset(_config(source="digits"))
  assert len(ds.train_images) + len(ds.test_images) == 1797
  assert ds.train_images.shape[1:] == (8, 8, 1)
  assert ds.train_images.dtype == np.uint8
  assert ds.train_images.max() == 255
  assert ds.class_names == tuple("0123456789")
  assert set(ds.test_labels) == set(range(10))
  assert ds.train_files == ()
  np.testing.assert_array_equal(ds.train_images, again.train_images)
  np.testing.assert_array_equal(ds.test_labels, again.test_labels)


def test_digits_resized():
  ds = data.load_dataset(_config(source="digits", image_size=16))
  assert ds.test_images.shape[1:] == (16, 16, 1)


@pytest.mark.parametrize("source", ["tfds", "folder", "digits"])
def test_process_shares_split_every_source_evenly_and_in_order(source, tiny_data_dir, tree):
  config = {
      "tfds": _tfds_config(name="tiny_shapes", tfds_data_dir=tiny_data_dir),
      "folder": _config(source="folder", dir=str(tree), image_size=6),
      "digits": _config(source="digits"),
  }[source]
  whole = data.load_dataset(config)
  shares = [data.load_dataset(config, index, 2) for index in range(2)]
  # Each process holds half of each split (one more or less), and the shares in
  # process order are the whole dataset.
  for split in ("train", "test"):
    sizes = [len(getattr(share, f"{split}_labels")) for share in shares]
    assert abs(sizes[0] - sizes[1]) <= 1 and sum(sizes) == len(getattr(whole, f"{split}_labels"))
    for field in ("images", "labels"):
      np.testing.assert_array_equal(
          np.concatenate([getattr(share, f"{split}_{field}") for share in shares]),
          getattr(whole, f"{split}_{field}"),
      )
  assert shares[0].train_files + shares[1].train_files == whole.train_files


def test_tfds_stored_as_tfrecord_cannot_stream(tiny_data_dir):
  with pytest.raises(
      UserInputError, match="cannot be read image by image.*--file_format=array_record"
  ):
    data.open_dataset(_tfds_config(name="tiny_shapes", tfds_data_dir=tiny_data_dir))


def test_tfds_mock_streams_record_by_record():
  with tfds.testing.mock_data(num_examples=6):
    ds = data.open_dataset(_tfds_config(image_size=16))
    image, label = ds.train[2]
  assert ds.split_sizes == (6, 6) and ds.image_shape == (16, 16, 3)
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and 0 <= label < 10
