"""Checkpoints and resumption: interrupted runs end exactly like uninterrupted ones."""

import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import MID_EPOCH_SAVES, ROOT, SMALL_OVERRIDES, small_config, small_config_flags
from kd_jax import checkpoint, pipeline, train
from kd_jax.errors import Interrupted, TrainingDiverged, UserInputError
from kd_jax.network import create_network

pytestmark = pytest.mark.slow  # full pipeline runs, killed and resumed launch.py processes

# Each stage's model, as the small config builds it.
STAGE_MODELS = {
    "teacher": ("resnet8", {}),
    "student": ("dsconv_student", {"width_multiplier": 0.5}),
    "baseline": ("dsconv_student", {"width_multiplier": 0.5}),
}


def _steps(workdir: str, stage: str) -> list[int]:
  folder = os.path.join(workdir, stage, "checkpoints")
  return (
      sorted(int(name) for name in os.listdir(folder) if name.isdigit())
      if os.path.isdir(folder)
      else []
  )


def _final_variables(workdir: str, stage: str, model: str, **kwargs):
  _, template = create_network(model, num_classes=10, in_channels=1, seed=0, **kwargs)
  variables, _ = checkpoint.restore_variables(
      os.path.join(workdir, stage), template, lambda m: None
  )
  return jax.device_get(variables)


def _assert_same_run(
    workdir: str, reference: str, reference_report: dict, stages=tuple(STAGE_MODELS)
):
  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  for stage in stages:
    for key in ("top1", "top5", "best_top1", "best_epoch", "epochs"):
      assert report[stage][key] == reference_report[stage][key], (stage, key)
  for stage in stages:
    model, kwargs = STAGE_MODELS[stage]
    same = jax.tree.map(
        np.array_equal,
        _final_variables(workdir, stage, model, **kwargs),
        _final_variables(reference, stage, model, **kwargs),
    )
    assert all(jax.tree.leaves(same)), stage


# The killed runs train no baseline: its stage resumes as the student's does.
KILLED_RUN_FLAGS = small_config_flags(**MID_EPOCH_SAVES, **{"baseline.enabled": False})


def _start(workdir: str) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "launch.py", f"--workdir={workdir}", *KILLED_RUN_FLAGS],
      cwd=ROOT,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
  )


def _wait_for(condition, process: subprocess.Popen, timeout: float = 300.0):
  deadline = time.monotonic() + timeout
  while not condition():
    assert process.poll() is None, f"run ended early: {process.stderr.read()[-2000:]}"
    assert time.monotonic() < deadline, "timed out waiting for the run"
    time.sleep(0.02)


def test_killed_and_preempted_run_ends_bit_identical(quickstart_run, tmp_path):
  reference, reference_report = quickstart_run
  workdir = str(tmp_path / "work")

  # SIGKILL inside the teacher stage, right after its first save.
  process = _start(workdir)
  _wait_for(lambda: _steps(workdir, "teacher"), process)
  process.kill()
  process.wait()

  # SIGTERM inside the student stage: a checkpoint, then a clean exit.
  process = _start(workdir)
  _wait_for(lambda: _steps(workdir, "student"), process)
  time.sleep(0.3)
  sent = time.monotonic()
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=30)
  assert time.monotonic() - sent < 30
  assert process.returncode == 128 + signal.SIGTERM
  assert "stopped by signal" in stderr and "Traceback" not in stderr
  assert _steps(workdir, "student")

  finished = subprocess.run(
      [sys.executable, "launch.py", f"--workdir={workdir}", *KILLED_RUN_FLAGS],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert finished.returncode == 0, finished.stderr[-2000:]
  _assert_same_run(workdir, reference, reference_report, stages=("teacher", "student"))


def _copy_with_teacher_only(reference: str, workdir):
  """A copy of a finished workdir whose teacher stays finished; student and baseline start over."""
  shutil.copytree(reference, workdir)
  for stage in ("student", "baseline"):
    shutil.rmtree(workdir / stage)
  os.remove(workdir / "report.json")
  return workdir


def _with_train_step(monkeypatch, wrap):
  """Makes every train step `wrap(train_step)` until monkeypatch.undo()."""
  make_train_step = train.make_train_step
  monkeypatch.setattr(train, "make_train_step", lambda *a, **k: wrap(make_train_step(*a, **k)))


def test_an_error_then_a_stop_at_an_epoch_end_leave_checkpoints_the_reruns_resume_from(
    quickstart_run, tmp_path, monkeypatch, caplog
):
  reference, reference_report = quickstart_run
  workdir = _copy_with_teacher_only(reference, tmp_path / "work")
  config = small_config(**MID_EPOCH_SAVES)
  saved = config.checkpoint.every_steps
  steps_per_epoch = reference_report["dataset"]["num_train"] // config.student.batch_size

  def failing_right_after_a_save(train_step):
    def step(state, batch, teacher_variables):
      if int(state.step) == saved:  # the checkpoint of this step is being written
        raise RuntimeError("out of host memory")
      return train_step(state, batch, teacher_variables)

    return step

  _with_train_step(monkeypatch, failing_right_after_a_save)
  with pytest.raises(RuntimeError, match="out of host memory"):
    pipeline.train_and_evaluate(config, str(workdir))
  # The pending save finished before the error left the stage: whole, nothing temporary.
  assert _steps(str(workdir), "student") == [saved]
  assert not [n for n in os.listdir(workdir / "student" / "checkpoints") if "tmp" in n]
  monkeypatch.undo()

  # Stopped at the epoch's last step: that step's checkpoint keeps the epoch's evaluation.
  def stopped_at_the_first_epoch_end(train_step):
    def step(state, batch, teacher_variables):
      state, metrics = train_step(state, batch, teacher_variables)
      if int(state.step) == steps_per_epoch:
        signal.raise_signal(signal.SIGTERM)
      return state, metrics

    return step

  caplog.set_level(logging.INFO, logger="absl")
  _with_train_step(monkeypatch, stopped_at_the_first_epoch_end)
  with pytest.raises(Interrupted, match="stopped by signal"):
    pipeline.train_and_evaluate(config, str(workdir))
  assert f"student: resuming at step {saved}" in caplog.text
  assert _steps(str(workdir), "student")[-1] == steps_per_epoch
  monkeypatch.undo()

  pipeline.train_and_evaluate(config, str(workdir))
  assert f"student: resuming at step {steps_per_epoch}" in caplog.text
  _assert_same_run(str(workdir), reference, reference_report)


def test_damaged_and_half_written_checkpoints_are_not_used(quickstart_run, tmp_path, caplog):
  reference, reference_report = quickstart_run
  workdir = str(tmp_path / "work")
  shutil.copytree(reference, workdir)
  os.remove(os.path.join(workdir, "report.json"))
  newest = _steps(workdir, "student")[-1]
  for path in glob.glob(
      os.path.join(workdir, "student", "checkpoints", str(newest), "**"), recursive=True
  ):
    if os.path.isfile(path):
      with open(path, "w") as f:
        f.write("overwritten")
  # What a kill during a save leaves: Orbax's temporary folder, never taken for whole.
  half_written = os.path.join(workdir, "baseline", "checkpoints", "999.orbax-checkpoint-tmp")
  os.makedirs(os.path.join(half_written, "model"))

  pipeline.train_and_evaluate(small_config(), workdir)

  assert f"checkpoints/{newest} cannot be restored" in caplog.text
  assert os.path.isdir(os.path.join(workdir, "student", "checkpoints", f"{newest}.damaged"))
  _assert_same_run(workdir, reference, reference_report)


def test_non_finite_loss_names_the_step_and_keeps_the_last_checkpoint(quickstart_run, tmp_path):
  workdir = tmp_path / "work"
  shutil.copytree(quickstart_run[0], workdir)
  last_good = _steps(str(workdir), "teacher")[-1]
  with open(workdir / "teacher" / "metrics.jsonl") as f:
    lines_before = f.read()

  # One more epoch at a learning rate no run survives: the weights overflow.
  epochs = SMALL_OVERRIDES["teacher.epochs"] + 1
  more = small_config(**{"teacher.epochs": epochs, "checkpoint.allow_config_change": True})
  more.teacher.optimizer.learning_rate = 1e30
  with pytest.raises(
      TrainingDiverged, match=r"teacher: (loss|param_norm) is (nan|inf) at step \d+"
  ) as error:
    pipeline.train_and_evaluate(more, str(workdir))
  assert f"teacher/checkpoints/{last_good};" in str(error.value)
  assert _steps(str(workdir), "teacher")[-1] == last_good
  with open(workdir / "teacher" / "metrics.jsonl") as f:
    assert f.read() == lines_before
  _, template = create_network("resnet8", num_classes=10, in_channels=1, seed=0)
  variables, _ = checkpoint.restore_variables(str(workdir / "teacher"), template, lambda m: None)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get(variables)))


def test_a_workdir_of_another_config_is_refused(quickstart_run, tmp_path):
  reference, _ = quickstart_run
  workdir = str(tmp_path / "work")
  shutil.copytree(reference, workdir)
  changed = small_config(**{"student.model": "resnet8", "student.width_multiplier": 1.0})
  with pytest.raises(UserInputError, match=r"student\.model \('dsconv_student' -> 'resnet8'\)"):
    pipeline.train_and_evaluate(changed, workdir)
  epochs = SMALL_OVERRIDES["student.epochs"] + 1
  more_epochs = small_config(**{"student.epochs": epochs, "checkpoint.allow_config_change": True})
  report = pipeline.train_and_evaluate(more_epochs, workdir)
  assert report["student"]["epochs"] == epochs
