"""The whole pipeline on the quickstart config, shrunk to a few epochs."""

import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import imagenet_r34_r18
from conftest import ROOT, SMALL_OVERRIDES, save_torch_state_dict, small_config
from kd_jax import native, pipeline
from kd_jax.errors import UserInputError

pytestmark = pytest.mark.slow  # full pipeline runs and launch.py processes

MODEL_KEYS = {"top1", "top5", "params", "param_bytes", "macs", "flops", "latency_ms", "throughput"}
COMPARISON_KEYS = {
    "size_reduction",
    "speedup_latency",
    "speedup_throughput",
    "agreement",
    "kd_gain",
}


def test_report_has_every_field(quickstart_run):
  workdir, report = quickstart_run
  with open(os.path.join(workdir, "report.json")) as f:
    on_disk = json.load(f)
  assert on_disk == json.loads(json.dumps(report))
  for name in ("teacher", "student", "baseline"):
    assert MODEL_KEYS <= set(on_disk[name]), name
    assert 0.0 <= on_disk[name]["top1"] <= on_disk[name]["top5"] <= 1.0
    assert on_disk[name]["flops"] > 0 and on_disk[name]["latency_ms"] > 0
    assert on_disk[name]["compute_dtype"] == "float32"  # auto on a CPU
    # One CPU device: oneDNN's convolutions wherever kd_jax.native is built.
    assert on_disk[name]["convolutions"] == ("oneDNN (CPU)" if native.available() else "XLA")
  # The student's export, on XLA's convolutions, is timed too.
  assert on_disk["student"]["exported_latency_ms"] > 0
  assert on_disk["student"]["exported_throughput"] > 0
  assert "exported_latency_ms" not in on_disk["teacher"]
  assert set(on_disk["comparison"]) >= COMPARISON_KEYS
  assert on_disk["teacher"]["params"] > on_disk["student"]["params"]
  assert on_disk["comparison"]["size_reduction"] == pytest.approx(
      on_disk["teacher"]["param_bytes"] / on_disk["student"]["param_bytes"]
  )
  assert on_disk["comparison"]["kd_gain"] == pytest.approx(
      on_disk["student"]["top1"] - on_disk["baseline"]["top1"]
  )
  with open(os.path.join(workdir, "report.md")) as f:
    markdown = f.read()
  assert "| top-1 (last epoch) |" in markdown and "KD gain" in markdown


def test_plots_and_export_are_written(quickstart_run):
  workdir, _ = quickstart_run
  for name in ("training_curves.png", "tradeoffs.png"):
    with open(os.path.join(workdir, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  exported = os.path.join(workdir, "export", "student")
  assert sorted(os.listdir(exported)) == ["model.jax", "preprocess.json", "saved_model"]


def test_distillation_alone_teaches_the_student(quickstart_run):
  _, report = quickstart_run
  assert report["teacher"]["top1"] > 0.9
  # alpha = 1: the student never saw a label, yet it is far above chance (0.1).
  assert report["student"]["top1"] > 0.6
  assert report["comparison"]["agreement"] > 0.6


def test_each_stage_writes_metrics_tensorboard_and_checkpoints(quickstart_run):
  workdir, _ = quickstart_run
  for stage, epochs in (
      ("teacher", SMALL_OVERRIDES["teacher.epochs"]),
      ("student", SMALL_OVERRIDES["student.epochs"]),
      ("baseline", SMALL_OVERRIDES["student.epochs"]),
  ):
    with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
      lines = [json.loads(line) for line in f]
    assert [line["epoch"] for line in lines] == list(range(1, epochs + 1))
    assert all("loss" in line and "test_top1" in line for line in lines)
    events = os.listdir(os.path.join(workdir, stage, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in events)
    assert os.listdir(os.path.join(workdir, stage, "checkpoints"))
  with open(os.path.join(workdir, "student", "metrics.jsonl")) as f:
    assert "kl" in json.loads(f.readline())


def test_checkpoints_keep_the_newest_and_the_best(quickstart_run):
  workdir, report = quickstart_run
  with open(os.path.join(workdir, "student", "metrics.jsonl")) as f:
    history = [json.loads(line) for line in f]
  steps_per_epoch = 1437 // 64
  top1 = max(epoch["test_top1"] for epoch in history)
  # Any of the best epochs when they tie.
  best = {epoch["epoch"] * steps_per_epoch for epoch in history if epoch["test_top1"] == top1}
  kept = sorted(
      int(name)
      for name in os.listdir(os.path.join(workdir, "student", "checkpoints"))
      if name.isdigit()
  )
  newest = SMALL_OVERRIDES["student.epochs"] * steps_per_epoch
  assert newest in kept and best & set(kept)
  assert len(kept) <= 3 + 1  # checkpoint.keep, plus the best


def test_cifar_config_runs_on_tfds(tmp_path):
  config = small_config(**{"teacher.epochs": 1, "student.epochs": 1, "baseline.enabled": False})
  config.data.update(source="tfds", name="cifar10", augment="crop_flip")
  config.teacher.model = "resnet8"
  config.teacher.batch_size = config.student.batch_size = 16
  config.eval.batch_size = 32
  with tfds.testing.mock_data(num_examples=48):
    report = pipeline.train_and_evaluate(config, str(tmp_path))
  assert report["dataset"]["num_classes"] == 10 and report["dataset"]["num_train"] == 48
  assert report["student"]["flops"] > 0


def _trained_files(workdir: str) -> dict[str, tuple[int, int]]:
  """(size, modification time) of each checkpoint, metrics and TensorBoard file of the stages."""
  found = {}
  for stage in ("teacher", "student", "baseline"):
    paths = [os.path.join(workdir, stage, "metrics.jsonl")]
    for kind in ("checkpoints", "tensorboard"):
      for folder, _, names in os.walk(os.path.join(workdir, stage, kind)):
        paths += [os.path.join(folder, name) for name in names]
    for path in paths:
      status = os.stat(path)
      found[os.path.relpath(path, workdir)] = (status.st_size, status.st_mtime_ns)
  return found


def test_rerun_restores_finished_stages_without_a_step(quickstart_run, tmp_path):
  reference, report = quickstart_run
  workdir = str(tmp_path / "work")
  shutil.copytree(reference, workdir)  # keeps the modification times
  before = _trained_files(workdir)
  again = pipeline.train_and_evaluate(small_config(), workdir)
  # A step, an evaluation or a save would have written a checkpoint or a metrics line, and
  # an opened TensorBoard writer an event file.
  assert _trained_files(workdir) == before
  for name in ("teacher", "student", "baseline"):
    for key in ("top1", "top5", "best_top1", "best_epoch", "epochs"):
      assert again[name][key] == report[name][key], (name, key)


@pytest.mark.parametrize(
    "method,standardize,soft_metric",
    [("kd", False, "kl"), ("dkd", False, "dkd"), ("kd", True, "kl")],
)
def test_a_trained_teacher_serves_another_student(
    quickstart_run, tmp_path, method, standardize, soft_metric
):
  workdir, report = quickstart_run
  config = small_config(**{"student.epochs": 1, "baseline.enabled": False})
  config.distill.update(method=method, logit_standardization=standardize)
  config.teacher.checkpoint = os.path.join(workdir, "teacher")
  reused = pipeline.train_and_evaluate(config, str(tmp_path))
  assert reused["teacher"]["top1"] == report["teacher"]["top1"]
  assert not os.path.exists(tmp_path / "teacher")
  with open(tmp_path / "student" / "metrics.jsonl") as f:
    assert np.isfinite(json.loads(f.readline())[soft_metric])


def test_several_seeds_report_mean_and_std(quickstart_run, tmp_path):
  workdir, _ = quickstart_run
  config = small_config(**{"student.epochs": 1, "seeds": 2})
  config.teacher.checkpoint = os.path.join(workdir, "teacher")
  report = pipeline.train_and_evaluate(config, str(tmp_path))
  for name in ("student", "baseline"):
    runs = report["seeds"][name]
    assert runs["seeds"] == [0, 1] and len(runs["top1"]) == 2
    assert runs["top1"][0] == report[name]["top1"]
    assert runs["top1_mean"] == pytest.approx(np.mean(runs["top1"]))
    assert runs["top1_std"] == pytest.approx(np.std(runs["top1"], ddof=1))
    assert os.path.isdir(tmp_path / f"{name}_seed1" / "checkpoints")
  with open(tmp_path / "report.md") as f:
    assert "mean ± std" in f.read()


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("model", "resnet20", "holds a 'resnet8'"),
        ("checkpoint", "/nonexistent/teacher", "does not exist"),
    ],
)
def test_bad_teacher_checkpoint(quickstart_run, tmp_path, field, value, message):
  workdir, _ = quickstart_run
  config = small_config()
  config.teacher.checkpoint = os.path.join(workdir, "teacher")
  config.teacher[field] = value
  with pytest.raises(UserInputError, match=message):
    pipeline.train_and_evaluate(config, str(tmp_path))


def _launch(*args):
  return subprocess.run(
      [sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
  )


@pytest.mark.parametrize(
    "args,culprit",
    [
        (["--config.student.model=resnet21"], "resnet21"),
        (["--config.distill.temprature=4"], "temprature"),
        (
            ["--config.data.source=folder", "--config.data.dir=/nonexistent/tree"],
            "/nonexistent/tree",
        ),
        (["--config.teacher.batch_size=5000"], "teacher.batch_size"),
    ],
)
def test_bad_input_is_one_line_and_no_traceback(tmp_path, args, culprit):
  result = _launch("--config=configs/quickstart.py", f"--workdir={tmp_path}", *args)
  assert result.returncode != 0
  assert culprit in result.stderr
  assert "Traceback" not in result.stderr


def test_teacher_for_another_class_count_is_refused(quickstart_run, tmp_path):
  workdir, _ = quickstart_run
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for name in ("a", "b", "c"):
      os.makedirs(tmp_path / "tree" / split / name)
      for i in range(4):
        cv2.imwrite(
            str(tmp_path / "tree" / split / name / f"{i}.png"),
            rng.integers(0, 256, (8, 8), np.uint8),
        )
  config = small_config()
  config.data.source = "folder"
  config.data.dir = str(tmp_path / "tree")
  config.teacher.checkpoint = os.path.join(workdir, "teacher")
  config.teacher.batch_size = config.student.batch_size = 4
  with pytest.raises(UserInputError, match="predicts 10 classes but the dataset has 3"):
    pipeline.train_and_evaluate(config, str(tmp_path / "work"))


def test_imagenet_config_runs_a_few_steps_on_mock_data(tmp_path):
  # The published DKD recipe as it stands (resnet34 -> resnet18, 1,000 classes,
  # resized crops, SGD with linear scaling), shrunk to 32x32 images and two
  # student steps so that it fits the suite, from a ResNet-34 weights file with
  # torchvision's names, used as it is (as torchvision's pretrained one would be).
  # Streamed, as ImageNet is: the mock images vary in size, and each is cropped at
  # its own resolution.
  weights = tmp_path / "resnet34.safetensors"
  save_torch_state_dict("resnet34", 1000, weights)
  config = imagenet_r34_r18.get_config("dkd")
  config.data.update(image_size=32, in_memory="false", workers=2)
  config.teacher.update(weights=str(weights), epochs=0)
  config.student.update(epochs=1, batch_size=8)
  config.eval.update(batch_size=8, latency_repeats=1, throughput_repeats=1)
  config.baseline.enabled = False
  config.export.enabled = False
  with tfds.testing.mock_data(num_examples=16):
    report = pipeline.train_and_evaluate(config, str(tmp_path / "run"))
  assert report["dataset"] == {
      "name": "imagenet2012",
      "num_train": 16,
      "num_test": 16,
      "num_classes": 1000,
  }
  assert report["teacher"]["model"] == "resnet34" and report["student"]["model"] == "resnet18"
  assert report["teacher"]["epochs"] == 0
  # lr 0.2 at batch 512, scaled to the global batch of 8.
  assert report["student"]["learning_rate"] == pytest.approx(0.2 * 8 / 512)
