"""Data parallelism: 4 devices give what 1 device gives, batch sizes are checked."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, small_config, small_config_flags
from kd_jax import pipeline

FOUR_DEVICES = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
ONE_EPOCH = {"teacher.epochs": 1, "student.epochs": 1, "baseline.enabled": False}


def _metrics(workdir, stage):
  with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _run_on_four_devices(workdir, **overrides):
  result = subprocess.run(
      [sys.executable, "launch.py", f"--workdir={workdir}", *small_config_flags(**overrides)],
      cwd=ROOT,
      env=FOUR_DEVICES,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stderr


def _assert_same_training(one, four, stage):
  for a, b in zip(_metrics(one, stage), _metrics(four, stage), strict=True):
    # Batch statistics and gradients are over the global batch on both; only
    # the order of floating-point sums differs, which may flip a borderline
    # prediction or two.
    for key in ("loss", "param_norm"):
      assert b[key] == pytest.approx(a[key], rel=1e-4), (stage, key)
    assert b["accuracy"] == pytest.approx(a["accuracy"], abs=2 / 1408), stage  # 22 x 64
    # A one-epoch model's test predictions amplify those last-bit differences;
    # the same weights give the same accuracy on 4 devices (test_checkpoint).
    assert b["test_top1"] == pytest.approx(a["test_top1"], abs=0.03), stage


def test_four_devices_train_as_one(tmp_path):
  one = str(tmp_path / "one")
  pipeline.train_and_evaluate(small_config(**ONE_EPOCH), one)

  log = _run_on_four_devices(tmp_path / "four_teacher", **ONE_EPOCH)
  assert "devices: 4 x cpu" in log and "per device 16" in log
  _assert_same_training(one, tmp_path / "four_teacher", "teacher")

  # The student against the very same teacher, so that only the sharding differs.
  _run_on_four_devices(
      tmp_path / "four_student", **ONE_EPOCH, **{"teacher.checkpoint": f"{one}/teacher"}
  )
  _assert_same_training(one, tmp_path / "four_student", "student")
  with open(tmp_path / "four_student" / "report.json") as f:
    assert json.load(f)["student"]["devices"] == 4


def test_batch_not_divisible_by_devices_names_valid_sizes(tmp_path):
  result = subprocess.run(
      [
          sys.executable,
          "launch.py",
          f"--workdir={tmp_path}",
          *small_config_flags(**{"student.batch_size": 62}),
      ],
      cwd=ROOT,
      env=FOUR_DEVICES,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 1
  assert "student.batch_size=62 does not split evenly over 4 devices" in result.stderr
  assert "e.g. 60 or 64" in result.stderr and "Traceback" not in result.stderr
