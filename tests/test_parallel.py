"""Data parallelism: 4 devices give what 1 device gives, batch sizes are checked."""

import json
import os
import signal
import socket
import subprocess
import sys

import cv2
import ml_collections
import numpy as np
import pytest

from conftest import ROOT, env_with_devices, small_config, small_config_flags
from kd_jax import data, parallel, pipeline
from kd_jax.data import streaming

pytestmark = pytest.mark.slow  # multi-device and multi-process runs

FOUR_DEVICES = env_with_devices(4)
ONE_EPOCH = {"teacher.epochs": 1, "student.epochs": 1, "baseline.enabled": False}


def _metrics(workdir, stage):
  with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _python_on_four_devices(*args) -> subprocess.CompletedProcess:
  """Runs `python *args` in the checkout with 4 CPU devices; it must succeed."""
  result = subprocess.run(
      [sys.executable, *args],
      cwd=ROOT,
      env=FOUR_DEVICES,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return result


def _run_on_four_devices(workdir, **overrides):
  flags = small_config_flags(**overrides)
  return _python_on_four_devices("launch.py", f"--workdir={workdir}", *flags).stderr


def _assert_same_training(one, four, stage):
  for a, b in zip(_metrics(one, stage), _metrics(four, stage), strict=True):
    # Batch statistics and gradients are over the global batch on both; only
    # the order of floating-point sums differs, which may flip a borderline
    # prediction or two. Over an epoch those last bits move the mean loss by a
    # few 1e-4 (measured up to 4.7e-4); a sharding error (per-device batch
    # statistics, gradients summed instead of averaged) moves it by far more.
    # test_two_steps_on_four_devices_equal_one_device checks steps to float precision.
    assert b["loss"] == pytest.approx(a["loss"], rel=2e-3), (stage, "loss")
    assert b["param_norm"] == pytest.approx(a["param_norm"], rel=1e-4), (stage, "param_norm")
    assert b["accuracy"] == pytest.approx(a["accuracy"], abs=5 / 1408), stage  # of 22 x 64
    # A one-epoch model's test predictions amplify those last-bit differences;
    # the same weights give the same accuracy on 4 devices (restored from them, below).
    assert b["test_top1"] == pytest.approx(a["test_top1"], abs=0.03), stage


@pytest.fixture(scope="module")
def digits_tree(tmp_path_factory):
  """The digits as an image-folder tree (RGB PNG files), for runs that read or stream a tree."""
  tree = tmp_path_factory.mktemp("digits_tree")
  digits = data.load_dataset(ml_collections.ConfigDict({"source": "digits"}))
  for split, images, labels in (
      ("train", digits.train_images, digits.train_labels),
      ("test", digits.test_images, digits.test_labels),
  ):
    for index, (image, label) in enumerate(zip(images, labels)):
      os.makedirs(tree / split / str(label), exist_ok=True)
      cv2.imwrite(str(tree / split / str(label) / f"{index:04d}.png"), np.repeat(image, 3, -1))
  return tree


def _tree(tree, in_memory: bool) -> dict:
  return {"data.source": "folder", "data.dir": str(tree), "data.in_memory": str(in_memory).lower()}


@pytest.fixture(scope="module")
def four_device_run(tmp_path_factory, digits_tree):
  """(workdir, log) of the small config on the digits tree, one epoch a stage, on 4 devices."""
  workdir = tmp_path_factory.mktemp("four_devices")
  return workdir, _run_on_four_devices(workdir, **ONE_EPOCH, **_tree(digits_tree, True))


def _report(workdir) -> dict:
  with open(os.path.join(workdir, "report.json")) as f:
    return json.load(f)


def test_four_devices_train_as_one(four_device_run, digits_tree, tmp_path):
  four, log = four_device_run
  assert "devices: 4 x cpu" in log and "per device 16" in log
  assert "teacher: convolutions: XLA" in log  # oneDNN's calls do not split over devices
  assert _report(four)["student"]["devices"] == 4
  teacher_only = small_config(**{**ONE_EPOCH, **_tree(digits_tree, True), "student.epochs": 0})
  pipeline.train_and_evaluate(teacher_only, str(tmp_path / "one"))
  _assert_same_training(tmp_path / "one", four, "teacher")

  # The student against the very same teacher, so that only the sharding differs: the
  # four devices' checkpoint, restored onto one, evaluates as it did there.
  one = small_config(**ONE_EPOCH, **_tree(digits_tree, True))
  one.teacher.checkpoint = os.path.join(four, "teacher")
  report = pipeline.train_and_evaluate(one, str(tmp_path / "one_student"))
  assert report["teacher"]["top1"] == _report(four)["teacher"]["top1"]
  _assert_same_training(tmp_path / "one_student", four, "student")


# Two distillation steps of a tiny student and teacher for each method given as an argument,
# on a mesh of one device and on a mesh of four, from the same start: prints, per method,
# how far the results are apart.
_TWO_STEPS_PROBE = """
import itertools, json, sys
import jax, numpy as np
from jax.sharding import Mesh
from configs import default
from kd_jax import methods, optim, parallel, train
from kd_jax.data import Dataset, in_memory
from kd_jax.network import create_network
from kd_jax.teachers import OnlineTeacher

rng = np.random.default_rng(0)
dataset = Dataset(
    rng.integers(0, 256, (64, 8, 8, 1), np.uint8), rng.integers(0, 10, 64),
    rng.integers(0, 256, (16, 8, 8, 1), np.uint8), rng.integers(0, 10, 16),
    tuple(str(i) for i in range(10)),
)
shapes = dict(num_classes=10, in_channels=1, seed=0)
student, student_start = create_network("dsconv_student", width_multiplier=0.25, **shapes)
teacher, teacher_start = create_network("resnet8", **shapes)
# On the host, so that each run puts its own copy on its mesh (the step donates the state).
student_start, teacher_start = jax.device_get((student_start, teacher_start))
# SGD: its update is linear in the gradient, where Adam's first step is about
# lr * sign(g), which float noise flips for gradients near zero.
optimizer = optim.make_optimizer(
    default.optimizer_config(name="sgd"), steps_per_epoch=2, epochs=1, batch_size=16
)
report = {
    "devices": jax.device_count(),
    "convolutions": [student.convolutions, teacher.convolutions],
}
for method in sys.argv[1:]:
  config = default.get_config()
  config.distill.update(method=method, crd_negatives=32)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = Mesh(np.array(devices), (parallel.DATA_AXIS,))
    data = in_memory.put_on_device(dataset, mesh, {"augment": "crop_flip"})
    variables, teacher_variables = jax.device_put(
        (student_start, teacher_start), parallel.replicated(mesh)
    )
    feature_method = None
    if method in methods.FEATURE_METHODS:
      feature_method = methods.make_feature_method(
          config.distill, (student, variables), (teacher, teacher_variables), (8, 8, 1), 0,
          num_train=64, steps_per_epoch=4, epochs=1,
      )
    step = train.make_train_step(
        student, optimizer, data, seed=0, mesh=mesh,
        teacher=OnlineTeacher(teacher, teacher_variables),
        objective=methods.make_objective(config.distill, 2, 1), feature_method=feature_method,
    )
    connectors = feature_method and feature_method.connector_variables
    state = train.TrainState(np.int32(0), variables, None, connectors)
    state = state.replace(opt_state=optimizer.init(state.trainable()))
    state = jax.device_put(state, parallel.replicated(mesh))
    losses = []
    for batch in itertools.islice(data.train_batches(0, 0, 0, 16), 2):
      state, metrics = step(state, batch, teacher_variables)
      losses.append(float(metrics["loss"]))
    # The student's variables, and a feature method's connectors (CRD's memory among them).
    trained = jax.device_get((state.variables, state.connectors))
    results.append((losses, jax.tree.map(np.asarray, trained)))
  (losses_1, variables_1), (losses_4, variables_4) = results
  report[method] = {
      "loss_diff": max(abs(a - b) for a, b in zip(losses_1, losses_4)),
      "variable_diff": max(
          float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12))
          for a, b in zip(jax.tree.leaves(variables_1), jax.tree.leaves(variables_4))
      ),
  }
print(json.dumps(report))
"""


def test_two_steps_on_four_devices_equal_one_device():
  # The same steps, batch statistics and gradients over the global batch either
  # way: only the order of float sums differs, so the results agree to float
  # precision (a sharding error, e.g. per-device statistics, is off by far more).
  # CRD's memory is replicated and updated with the whole batch's rows on every device.
  output = _python_on_four_devices("-c", _TWO_STEPS_PROBE, "kd", "crd").stdout
  report = json.loads(output.strip().splitlines()[-1])
  assert report["devices"] == 4
  # oneDNN's calls cannot split a batch over devices: several take XLA's convolutions.
  assert report["convolutions"] == ["xla", "xla"]
  for method in ("kd", "crd"):
    assert report[method]["loss_diff"] < 1e-5, method
    assert report[method]["variable_diff"] < 1e-5, method


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


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_as_two_hosts(workdir, flags: list[str]) -> list[str]:
  """Runs launch.py as 2 processes of 2 CPU devices over localhost; returns their logs.

  They share one workdir as hosts share a filesystem.
  """
  address = f"127.0.0.1:{_free_port()}"
  # Logs go to files: a pipe that one process fills while the test waits on
  # the other would stall both in their next collective.
  log_files = [open(workdir / f"process{index}.log", "w+") for index in range(2)]
  processes = [
      subprocess.Popen(
          [
              sys.executable,
              "-X",
              "faulthandler",
              "launch.py",
              f"--workdir={workdir}",
              *flags,
              f"--coordinator_address={address}",
              "--num_processes=2",
              f"--process_id={index}",
          ],
          cwd=ROOT,
          env=env_with_devices(2),
          stdout=subprocess.DEVNULL,
          stderr=log_files[index],
      )
      for index in range(2)
  ]
  try:
    for process in processes:
      process.wait(timeout=300)
  except subprocess.TimeoutExpired:
    for process in processes:
      process.send_signal(signal.SIGABRT)  # -X faulthandler: where each one was stuck
  finally:
    for process in processes:
      process.wait(timeout=30)
  logs = []
  for log_file in log_files:
    log_file.seek(0)
    logs.append(log_file.read())
    log_file.close()
  for process, log in zip(processes, logs):
    assert process.returncode == 0, log[-3000:]
  return logs


def test_two_hosts_train_as_one_host(four_device_run, digits_tree, tmp_path):
  # Two processes with 2 CPU devices each, as two hosts, each decoding its half of
  # the tree. The student learns from the 4-device run's teacher (training amplifies
  # the last-bit differences of another summation order), through the offline cache
  # of consistent views, which trains as online distillation does: so the teacher's
  # pass over the data, process 0 writing the cache and the other reading it are
  # covered too.
  four, _ = four_device_run
  overrides = {
      **ONE_EPOCH,
      **_tree(digits_tree, True),
      "teacher.checkpoint": os.path.join(four, "teacher"),
      "distill.mode": "offline",
      "distill.cache": "consistent",
      "distill.cache_dtype": "float32",
  }
  logs = _run_as_two_hosts(tmp_path, small_config_flags(**overrides))
  assert "process 0 holds 718 training and 180 test examples" in logs[0]
  assert "process 1 holds 719 training and 180 test examples" in logs[1]
  assert "devices: 4 x cpu" in logs[1]

  _assert_same_training(four, tmp_path, "student")
  expected, report = _report(four), _report(tmp_path)
  assert report["dataset"] == expected["dataset"]
  assert report["teacher"]["top1"] == expected["teacher"]["top1"]
  for key in ("top1", "top5"):  # the same tolerance as _assert_same_training's, for its reason
    assert report["student"][key] == pytest.approx(expected["student"][key], abs=0.03), key
  assert report["teacher_logits"]["kind"] == "consistent"


def test_two_hosts_stream_their_own_halves(four_device_run, digits_tree, tmp_path):
  # The tree streamed by two hosts, each reading only its half and shuffling it
  # (so the order differs from one host's), from the 4-device run's teacher: the
  # normalisation statistics over both halves are those of the whole tree.
  four, _ = four_device_run
  overrides = {
      **ONE_EPOCH,
      **_tree(digits_tree, False),
      "teacher.checkpoint": os.path.join(four, "teacher"),
  }
  logs = _run_as_two_hosts(tmp_path, small_config_flags(**overrides))
  assert "process 0 streams 718 training and 180 test examples" in logs[0]
  assert "process 1 streams 719 training and 180 test examples" in logs[1]
  report = _report(tmp_path)
  assert report["dataset"] == _report(four)["dataset"]
  assert report["teacher"]["top1"] == _report(four)["teacher"]["top1"]
  # Another order of the same examples: the epoch ends near the 4-device run's.
  streamed, expected = _metrics(tmp_path, "student")[0], _metrics(four, "student")[0]
  assert streamed["loss"] == pytest.approx(expected["loss"], rel=0.02)
  assert streamed["accuracy"] == pytest.approx(expected["accuracy"], abs=0.05)
  with open(tmp_path / "dataset.json") as f:
    stats = json.load(f)
  config = ml_collections.ConfigDict(
      {"source": "folder", "dir": str(digits_tree), "augment": "none"}
  )
  whole = streaming.StreamedData(data.open_dataset(config), parallel.make_mesh(), config)
  assert stats["mean"] == [float(m) for m in whole.mean_C]
  assert stats["std"] == [float(s) for s in whole.std_C]


def test_incomplete_multi_host_flags_are_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "launch.py", f"--workdir={tmp_path}", "--num_processes=2"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "needs all of --coordinator_address=HOST:PORT" in result.stderr.splitlines()[-1]
