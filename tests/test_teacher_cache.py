"""Offline distillation from the teacher's stored logits."""

import json
import os
import shutil

import cv2
import jax
import numpy as np
import pytest

from conftest import small_config
from kd_jax import checkpoint, data, pipeline, teacher_cache
from kd_jax.data import Dataset, augment, placement
from kd_jax.errors import UserInputError
from kd_jax.network import create_network


def _offline_config(workdir, **overrides):
  config = small_config(**{"student.epochs": 2, "baseline.enabled": False, **overrides})
  config.teacher.checkpoint = os.path.join(workdir, "teacher")
  config.distill.update(mode="offline", cache_dtype="float32")
  return config


def _metrics(workdir):
  with open(os.path.join(workdir, "student", "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_offline_matches_online_and_reuses_its_cache(quickstart_run, tmp_path):
  teacher_run = tmp_path / "teacher_run"
  shutil.copytree(os.path.join(quickstart_run[0], "teacher"), teacher_run / "teacher")
  offline, online = tmp_path / "offline", tmp_path / "online"
  report = pipeline.train_and_evaluate(_offline_config(teacher_run), str(offline))
  online_config = _offline_config(teacher_run)
  online_config.distill.mode = "online"
  pipeline.train_and_evaluate(online_config, str(online))

  # Without augmentation the stored logits are the ones the online teacher
  # computes in the step, so the student learns the same.
  for a, b in zip(_metrics(online), _metrics(offline), strict=True):
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    # At most two of the 360 test images classified differently, counted as images: as
    # fractions, two images' difference can exceed 2 / 360 by a rounding error.
    assert abs(round(b["test_top1"] * 360) - round(a["test_top1"] * 360)) <= 2

  folder = report["teacher_logits"]["folder"]
  logits_file = os.path.join(folder, "logits.npy")
  logits = np.load(logits_file)
  assert logits.shape == (1437, 10) and logits.dtype == np.float32
  assert report["teacher_logits"]["bytes"] >= logits.nbytes
  stamp = os.path.getmtime(logits_file)

  # The cache sits beside the teacher; another student on the same teacher and
  # data, in another workdir, reuses it as it is.
  assert folder.startswith(str(teacher_run / teacher_cache.CACHE_DIR))
  again = pipeline.train_and_evaluate(
      _offline_config(teacher_run, **{"student.width_multiplier": 0.25, "student.epochs": 1}),
      str(tmp_path / "another"),
  )
  assert again["teacher_logits"]["folder"] == folder
  assert os.path.getmtime(logits_file) == stamp
  assert os.listdir(teacher_run / teacher_cache.CACHE_DIR) == [os.path.basename(folder)]


def test_fingerprint_changes_with_teacher_data_and_dtype():
  _, variables = create_network("resnet8", num_classes=10, in_channels=1, seed=0)
  _, other = create_network("resnet8", num_classes=10, in_channels=1, seed=1)
  images = np.zeros((4, 8, 8, 1), np.uint8)
  labels = np.arange(4, dtype=np.int32)

  def digest(images, labels):
    return Dataset(images, labels, images, labels, tuple("abcd")).digest()

  key = teacher_cache.fingerprint(variables, digest(images, labels), "float16")
  assert key == teacher_cache.fingerprint(variables, digest(images.copy(), labels), "float16")
  assert key != teacher_cache.fingerprint(other, digest(images, labels), "float16")
  assert key != teacher_cache.fingerprint(variables, digest(images + 1, labels), "float16")
  assert key != teacher_cache.fingerprint(variables, digest(images, labels[::-1]), "float16")
  assert key != teacher_cache.fingerprint(variables, digest(images, labels), "float32")


def test_partial_and_misshapen_caches(tmp_path):
  calls = []

  def compute():
    calls.append(1)
    return np.ones((3, 2), np.float32)

  # A staging folder left by a killed run is not a cache.
  os.makedirs(tmp_path / teacher_cache.CACHE_DIR / ".abc-123")
  stored, folder = teacher_cache.load_or_compute(
      str(tmp_path), "abc", 3, 2, compute, dtype="float16"
  )
  assert calls == [1] and stored["logits"].dtype == np.float16
  assert sorted(os.listdir(tmp_path / teacher_cache.CACHE_DIR)) == [".abc-123", "abc"]
  teacher_cache.load_or_compute(str(tmp_path), "abc", 3, 2, compute, dtype="float16")
  assert calls == [1]
  with pytest.raises(UserInputError, match=r"logits\.npy holds \(3, 2\), not \(4, 2\)"):
    teacher_cache.load_or_compute(str(tmp_path), "abc", 4, 2, compute, dtype="float16")
  # The same key stored whole logits, not the top 1: a mismatch, not a reuse.
  with pytest.raises(UserInputError, match="lacks top_logits.npy"):
    teacher_cache.load_or_compute(str(tmp_path), "abc", 3, 2, compute, dtype="float16", top_k=1)


@pytest.mark.parametrize(
    "field, value, message",
    [("cache_dtype", "int8", "cache_dtype='int8'"), ("cache_top_k", -1, "cache_top_k=-1")],
)
def test_bad_cache_settings_fail_before_any_work(tmp_path, field, value, message):
  config = small_config()
  config.distill.update(mode="offline", **{field: value})
  with pytest.raises(UserInputError, match=message):
    pipeline.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "teacher")


def _reference_top_k(logits, k):
  """Dense logits from the k largest and the mean of the rest, by sorting, in float64."""
  out = np.empty_like(logits, dtype=np.float64)
  for row, values in enumerate(logits.astype(np.float64)):
    order = np.argsort(-values, kind="stable")
    out[row] = values[order[k:]].mean()
    out[row, order[:k]] = values[order[:k]]
  return out


def test_top_k_keeps_the_largest_logits_and_the_mean_of_the_rest():
  logits = np.random.default_rng(0).normal(scale=5.0, size=(16, 100)).astype(np.float32)
  stored = teacher_cache.encode(logits, 5, "float32")
  assert stored["top_logits"].shape == stored["top_indices"].shape == (16, 5)
  assert stored["top_indices"].dtype == np.uint8 and stored["rest_mean"].shape == (16,)
  decoded = np.asarray(teacher_cache.decode(stored, 100))
  np.testing.assert_allclose(decoded, _reference_top_k(logits, 5), rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(decoded.mean(-1), logits.mean(-1), atol=1e-5)
  # k at or above the class count stores every logit.
  for k in (0, 100):
    np.testing.assert_array_equal(
        teacher_cache.decode(teacher_cache.encode(logits, k, "float32"), 100), logits
    )


@pytest.mark.slow
def test_offline_top_k_cache_trains_the_student(quickstart_run, tmp_path):
  teacher_run = tmp_path / "teacher_run"
  shutil.copytree(os.path.join(quickstart_run[0], "teacher"), teacher_run / "teacher")
  config = _offline_config(teacher_run, **{"student.epochs": 1})
  config.distill.cache_top_k = 3
  report = pipeline.train_and_evaluate(config, str(tmp_path / "top3"))
  folder = report["teacher_logits"]["folder"]
  assert sorted(n for n in os.listdir(folder) if n.endswith(".npy")) == [
      "rest_mean.npy",
      "top_indices.npy",
      "top_logits.npy",
  ]
  assert np.load(os.path.join(folder, "top_logits.npy")).shape == (1437, 3)
  # Far smaller than all ten float32 logits, and still a teacher to learn from
  # (alpha = 1: labels unused), well above the chance of 0.1 after one epoch.
  assert report["teacher_logits"]["bytes"] < 1437 * 10 * 4 / 2
  assert report["student"]["top1"] > 0.3


@pytest.mark.slow
def test_consistent_views_match_online_distillation_with_augmentation(quickstart_run, tmp_path):
  teacher_run = tmp_path / "teacher_run"
  shutil.copytree(os.path.join(quickstart_run[0], "teacher"), teacher_run / "teacher")

  def config(mode):
    # One epoch: training amplifies last-bit differences between the teacher's
    # forward inside the step and the same forward compiled on its own.
    config = _offline_config(teacher_run, **{"student.epochs": 1})
    config.data.augment = "crop_flip"
    config.distill.update(mode=mode, cache="consistent")
    return config

  offline = pipeline.train_and_evaluate(config("offline"), str(tmp_path / "offline"))
  pipeline.train_and_evaluate(config("online"), str(tmp_path / "online"))
  # The teacher saw exactly the crops and flips the student saw, step by step.
  for a, b in zip(_metrics(tmp_path / "online"), _metrics(tmp_path / "offline"), strict=True):
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert b["kl"] == pytest.approx(a["kl"], rel=1e-3)
    # At most two of the 360 test images classified differently, counted as images: as
    # fractions, two images' difference can exceed 2 / 360 by a rounding error.
    assert abs(round(b["test_top1"] * 360) - round(a["test_top1"] * 360)) <= 2

  folder = offline["teacher_logits"]["folder"]
  assert offline["teacher_logits"]["kind"] == "consistent"
  assert [name for name in os.listdir(folder) if name.endswith(".npy")] == ["epoch_0000.logits.npy"]
  assert np.load(os.path.join(folder, "epoch_0000.logits.npy")).shape == (1437 // 64, 64, 10)
  again = pipeline.train_and_evaluate(config("offline"), str(tmp_path / "again"))
  assert again["teacher_logits"]["folder"] == folder


@pytest.mark.slow
def test_each_seeds_student_has_the_logits_of_its_own_views(quickstart_run, tmp_path):
  teacher_run = tmp_path / "teacher_run"
  shutil.copytree(os.path.join(quickstart_run[0], "teacher"), teacher_run / "teacher")
  config = _offline_config(teacher_run, **{"student.epochs": 1, "seeds": 2})
  config.data.augment = "crop_flip"
  config.distill.cache = "consistent"
  pipeline.train_and_evaluate(config, str(tmp_path / "run"))

  # The teacher's logits of the views the seed-1 student sees in its epoch, made
  # here from the pieces: that seed's batch order, its crops and flips, the teacher.
  seed, batch_size = config.seed + 1, config.student.batch_size
  digits = data.load_dataset(config.data)
  mean_C, std_C = augment.normalization_stats(augment.pixel_histograms(digits.train_images))
  teacher, variables = create_network("resnet8", num_classes=10, in_channels=1, seed=0)
  variables, _ = checkpoint.restore_variables(
      str(teacher_run / "teacher"), variables, lambda m: None
  )
  forward = jax.jit(lambda v, x: teacher.apply(v, x, train=False)[0])
  order = placement.epoch_indices(seed, 0, len(digits.train_labels), batch_size)
  expected = []
  for step, indices in enumerate(order):
    images = augment.random_crop_flip(augment.step_key(seed, step), digits.train_images[indices])
    expected.append(forward(variables, augment.normalize(images, mean_C, std_C)))
  expected = np.stack(jax.device_get(expected))

  caches = sorted((teacher_run / teacher_cache.CACHE_DIR).glob("*/epoch_0000.logits.npy"))
  assert len(caches) == 2  # one per seed
  matching = [np.allclose(np.load(path), expected, rtol=1e-4, atol=1e-4) for path in caches]
  assert sorted(matching) == [False, True]


CLASS_COLORS = ((0, 0, 220), (0, 220, 0), (220, 0, 0))  # BGR


@pytest.fixture
def folder_with_logits(tmp_path):
  """A 3-class image folder (16 train, 4 test images a class) and a logits folder
  from "another framework" whose teacher always names the next class."""
  rng = np.random.default_rng(0)
  logits_dir = tmp_path / "torch_logits"
  for split, count in (("train", 16), ("test", 4)):
    for label, color in enumerate(CLASS_COLORS):
      for index in range(count):
        image = np.clip(rng.normal(color, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
        path = tmp_path / "data" / split / f"class{label}" / f"{index:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), image)
        if split == "train":
          target = logits_dir / split / f"class{label}" / f"{index:02d}.npy"
          target.parent.mkdir(parents=True, exist_ok=True)
          np.save(target, 8.0 * np.eye(3, dtype=np.float32)[(label + 1) % 3])
  return tmp_path / "data", logits_dir


def test_foreign_logits_pair_with_their_images(folder_with_logits):
  data_dir, logits_dir = folder_with_logits
  files = ("train/class0/03.png", "train/class2/15.png")
  np.save(logits_dir / "train" / "class0" / "03.npy", np.array([[1.0, 2.0, 3.0]]))
  logits = teacher_cache.load_foreign(str(logits_dir), files, 3)
  np.testing.assert_array_equal(logits, [[1, 2, 3], [8, 0, 0]])
  assert logits.dtype == np.float32


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda path: path.unlink(), r"1 of 2 teacher-logit files are missing .*03\.npy"),
        (lambda path: np.save(path, np.zeros(4)), r"03\.npy holds float64 \(4,\), not 3 logits"),
        (
            lambda path: np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True),
            r"03\.npy is not a plain \.npy array",
        ),
        (lambda path: np.save(path, np.array([0, np.nan, 1])), r"03\.npy holds NaN"),
        (lambda path: path.write_bytes(b"junk"), r"03\.npy is not a plain \.npy array"),
    ],
)
def test_missing_and_misshapen_foreign_logits_name_the_file(folder_with_logits, damage, message):
  _, logits_dir = folder_with_logits
  damage(logits_dir / "train" / "class0" / "03.npy")
  with pytest.raises(UserInputError, match=message):
    teacher_cache.load_foreign(str(logits_dir), ("train/class0/03.png", "train/class1/00.png"), 3)


def _foreign_config(data_dir, logits_dir, **overrides):
  config = small_config(**{"student.epochs": 6, "student.batch_size": 16, **overrides})
  config.data.update(source="folder", dir=str(data_dir), teacher_logits_dir=str(logits_dir))
  config.distill.mode = "offline"
  return config


@pytest.mark.slow
def test_a_teacher_from_another_framework_is_distilled(folder_with_logits, tmp_path):
  data_dir, logits_dir = folder_with_logits
  report = pipeline.train_and_evaluate(_foreign_config(data_dir, logits_dir), str(tmp_path / "run"))
  # No kd_jax teacher ran; the student learnt what the files say (alpha = 1: the
  # next class), the baseline the labels.
  assert "teacher" not in report and not os.path.exists(tmp_path / "run" / "teacher")
  assert report["student"]["top1"] < 0.2 < 0.8 < report["baseline"]["top1"]
  assert report["teacher_logits"]["kind"] == "foreign"
  assert report["comparison"]["size_reduction"] is None
  with open(tmp_path / "run" / "report.md") as f:
    assert "stored teacher logits (foreign" in f.read()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"distill.mode": "online"}, "distill.mode='online'"),
        ({"distill.cache": "consistent"}, "distill.cache='consistent'"),
        ({"data.source": "digits"}, "needs data.source=folder"),
    ],
)
def test_foreign_logits_conflicting_settings(folder_with_logits, tmp_path, overrides, message):
  config = _foreign_config(*folder_with_logits)
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  with pytest.raises(UserInputError, match=message):
    pipeline.train_and_evaluate(config, str(tmp_path / "run"))
