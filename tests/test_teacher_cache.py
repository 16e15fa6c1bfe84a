"""Offline distillation from the teacher's stored logits."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import small_config
from kd_jax import pipeline, teacher_cache
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
    assert b["test_top1"] == pytest.approx(a["test_top1"], abs=2 / 360)

  folder = report["teacher_logits"]["folder"]
  logits = np.load(os.path.join(folder, teacher_cache.LOGITS_FILE))
  assert logits.shape == (1437, 10) and logits.dtype == np.float32
  assert report["teacher_logits"]["bytes"] >= logits.nbytes
  stamp = os.path.getmtime(os.path.join(folder, teacher_cache.LOGITS_FILE))

  # The cache sits beside the teacher; another student on the same teacher and
  # data, in another workdir, reuses it as it is.
  assert folder.startswith(str(teacher_run / teacher_cache.CACHE_DIR))
  again = pipeline.train_and_evaluate(
      _offline_config(teacher_run, **{"student.width_multiplier": 0.25, "student.epochs": 1}),
      str(tmp_path / "another"),
  )
  assert again["teacher_logits"]["folder"] == folder
  assert os.path.getmtime(os.path.join(folder, teacher_cache.LOGITS_FILE)) == stamp
  assert os.listdir(teacher_run / teacher_cache.CACHE_DIR) == [os.path.basename(folder)]


def test_fingerprint_changes_with_teacher_data_and_dtype():
  _, variables = create_network("resnet8", num_classes=10, in_channels=1, seed=0)
  _, other = create_network("resnet8", num_classes=10, in_channels=1, seed=1)
  images = np.zeros((4, 8, 8, 1), np.uint8)
  labels = np.arange(4)
  key = teacher_cache.fingerprint(variables, images, labels, "float16")
  assert key == teacher_cache.fingerprint(variables, images.copy(), labels, "float16")
  assert key != teacher_cache.fingerprint(other, images, labels, "float16")
  assert key != teacher_cache.fingerprint(variables, images + 1, labels, "float16")
  assert key != teacher_cache.fingerprint(variables, images, labels[::-1], "float16")
  assert key != teacher_cache.fingerprint(variables, images, labels, "float32")


def test_partial_and_misshapen_caches(tmp_path):
  calls = []

  def compute():
    calls.append(1)
    return np.ones((3, 2), np.float32)

  # A staging folder left by a killed run is not a cache.
  os.makedirs(tmp_path / teacher_cache.CACHE_DIR / ".abc-123")
  logits, folder = teacher_cache.load_or_compute(str(tmp_path), "abc", 3, 2, "float16", compute)
  assert calls == [1] and logits.dtype == np.float16
  assert sorted(os.listdir(tmp_path / teacher_cache.CACHE_DIR)) == [".abc-123", "abc"]
  teacher_cache.load_or_compute(str(tmp_path), "abc", 3, 2, "float16", compute)
  assert calls == [1]
  with pytest.raises(UserInputError, match=r"logits\.npy holds \(3, 2\), not \(4, 2\)"):
    teacher_cache.load_or_compute(str(tmp_path), "abc", 4, 2, "float16", compute)
  with pytest.raises(UserInputError, match="cache_dtype"):
    teacher_cache.load_or_compute(str(tmp_path), "abd", 3, 2, "int8", compute)


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
    assert b["test_top1"] == pytest.approx(a["test_top1"], abs=2 / 360)

  folder = offline["teacher_logits"]["folder"]
  assert offline["teacher_logits"]["kind"] == "consistent"
  assert sorted(name for name in os.listdir(folder) if name.endswith(".npy")) == ["epoch_0000.npy"]
  assert np.load(os.path.join(folder, "epoch_0000.npy")).shape == (1437 // 64, 64, 10)
  again = pipeline.train_and_evaluate(config("offline"), str(tmp_path / "again"))
  assert again["teacher_logits"]["folder"] == folder
