"""launch.py's other modes: evaluate a finished workdir, predict on image files."""

import json
import os
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from sklearn.datasets import load_digits

from conftest import ROOT, SMALL_OVERRIDES, small_config
from kd_jax import pipeline, predict
from kd_jax.errors import UserInputError

pytestmark = pytest.mark.slow  # the trained quickstart run and launch.py processes


def test_evaluate_rewrites_the_report_without_training(quickstart_run, tmp_path):
  reference, reference_report = quickstart_run
  workdir = str(tmp_path / "work")
  shutil.copytree(reference, workdir)
  os.remove(os.path.join(workdir, "report.json"))
  report = pipeline.train_and_evaluate(small_config(), workdir, may_train=False)
  for stage in ("teacher", "student", "baseline"):
    assert report[stage]["top1"] == reference_report[stage]["top1"]
  with open(os.path.join(workdir, "report.json")) as f:
    assert json.load(f)["student"]["top1"] == reference_report["student"]["top1"]

  epochs = SMALL_OVERRIDES["student.epochs"] + 1
  more = small_config(**{"student.epochs": epochs, "checkpoint.allow_config_change": True})
  with pytest.raises(UserInputError, match="student has trained .* finish it with --mode=train"):
    pipeline.train_and_evaluate(more, workdir, may_train=False)


def test_predict_prints_top5_and_names_unreadable_files(quickstart_run, tmp_path):
  workdir, _ = quickstart_run
  digits = load_digits()
  images = tmp_path / "images"
  images.mkdir()
  for i in range(4):
    cv2.imwrite(str(images / f"{i}.png"), np.rint(digits.images[i] * 255 / 16).astype(np.uint8))
  (images / "broken.png").write_bytes(b"not an image")

  result = subprocess.run(
      [sys.executable, "launch.py", "--mode=predict", f"--workdir={workdir}", f"--images={images}"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert [line.split(":")[0] for line in lines] == [str(images / f"{i}.png") for i in range(4)]
  top5_and_teacher = r": student (\S+ [01]\.\d{3}, ){4}\S+ [01]\.\d{3} \| teacher \S+ [01]\.\d{3}$"
  assert all(re.search(top5_and_teacher, line) for line in lines), lines
  assert "broken.png" in result.stderr and "Traceback" not in result.stderr

  # The same decoding and normalisation as training: the teacher gets these right.
  predictions = predict.predict(workdir, [str(images)])
  teacher_classes = [int(p["teacher"][0]) for p in predictions]
  assert teacher_classes == list(digits.target[:4])
  for p in predictions:
    probabilities = [prob for _, prob in p["student"]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6


def test_predict_on_nothing_readable_is_an_error(quickstart_run, tmp_path):
  workdir, _ = quickstart_run
  (tmp_path / "x.png").write_bytes(b"nope")
  with pytest.raises(UserInputError, match="no readable image"):
    predict.predict(workdir, [str(tmp_path / "x.png")])
