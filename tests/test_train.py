"""The train step: pure, compiled once, teacher frozen, reproducible order."""

import signal

import jax
import ml_collections
import numpy as np
import pytest

from configs import default
from kd_jax import methods, optim, parallel, train
from kd_jax.data import Dataset, in_memory, placement
from kd_jax.errors import Interrupted
from kd_jax.network import create_network
from kd_jax.teachers import OnlineTeacher


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  dataset = Dataset(
      rng.integers(0, 256, (64, 8, 8, 1), np.uint8),
      rng.integers(0, 10, 64),
      rng.integers(0, 256, (16, 8, 8, 1), np.uint8),
      rng.integers(0, 10, 16),
      tuple(str(i) for i in range(10)),
  )
  mesh = parallel.make_mesh()
  return dataset, mesh, in_memory.put_on_device(dataset, mesh, {"augment": "crop_flip"})


def _copy(tree):
  return jax.tree.map(np.array, jax.device_get(tree))


def _student_and_teacher(mesh):
  """A tiny student's (network, variables) and a resnet8 teacher's, its variables on `mesh`."""
  shapes = dict(num_classes=10, in_channels=1, seed=0)
  student, student_variables = create_network("dsconv_student", width_multiplier=0.25, **shapes)
  teacher, teacher_variables = create_network("resnet8", **shapes)
  teacher_variables = jax.device_put(teacher_variables, parallel.replicated(mesh))
  return (student, student_variables), (teacher, teacher_variables)


def test_distillation_step_updates_student_and_leaves_teacher_untouched(setup):
  _, mesh, data = setup
  (student, student_variables), (teacher, teacher_variables) = _student_and_teacher(mesh)
  config = default.get_config()
  optimizer = optim.make_optimizer(
      config.student.optimizer, steps_per_epoch=4, epochs=1, batch_size=16
  )
  step = train.make_train_step(
      student,
      optimizer,
      data,
      seed=0,
      mesh=mesh,
      teacher=OnlineTeacher(teacher, teacher_variables),
      objective=methods.make_objective(config.distill, 4, 1),
  )
  state = jax.device_put(
      train.TrainState(np.int32(0), student_variables, optimizer.init(student_variables.params)),
      parallel.replicated(mesh),
  )
  student_before, teacher_before = _copy(state.variables), _copy(teacher_variables)
  gather = placement.make_gather(mesh)

  for indices in placement.epoch_indices(0, 0, data.num_train, 16):
    batch = gather({"image": data.train_images, "label": data.train_labels}, indices)
    state, metrics = step(state, batch, teacher_variables)

  assert int(state.step) == 4
  assert step._cache_size() == 1  # four steps, one compilation
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert float(metrics["temperature"]) == config.distill.temperature
  changed = jax.tree.map(
      lambda a, b: not np.array_equal(a, b), student_before.params, _copy(state.variables.params)
  )
  assert all(jax.tree.leaves(changed))
  stats_changed = jax.tree.map(
      lambda a, b: not np.array_equal(a, b),
      student_before.batch_stats,
      _copy(state.variables.batch_stats),
  )
  assert all(jax.tree.leaves(stats_changed))
  unchanged = jax.tree.map(np.array_equal, teacher_before, _copy(teacher_variables))
  assert all(jax.tree.leaves(unchanged))


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
  first = placement.epoch_indices(3, 5, 100, 32)
  assert first.shape == (3, 32)
  np.testing.assert_array_equal(first, placement.epoch_indices(3, 5, 100, 32))
  assert len(np.unique(first)) == 96  # no example twice in an epoch
  assert not np.array_equal(first, placement.epoch_indices(3, 6, 100, 32))
  assert not np.array_equal(first, placement.epoch_indices(4, 5, 100, 32))


def _metrics(loss, accuracy):
  return {"loss": jax.numpy.float32(loss), "accuracy": jax.numpy.float32(accuracy)}


def test_running_metrics_sum_what_was_flushed_and_keep_the_newest_queued():
  running = train.RunningMetrics({"loss": 10.0, "accuracy": 1.0}, count=4)  # resumed mid-epoch
  for step, (loss, accuracy) in enumerate([(1.0, 0.5), (2.0, 0.25), (4.0, 1.0)], start=5):
    running.add(step, _metrics(loss, accuracy))
  running.flush(keep=1)
  assert running.count == 6 and running.sums == {"loss": 13.0, "accuracy": 1.75}
  assert running.last == {"loss": 2.0, "accuracy": 0.25}
  running.flush()
  assert running.count == 7 and running.sums == {"loss": 17.0, "accuracy": 2.75}
  assert running.means() == {"loss": 17.0 / 7, "accuracy": 2.75 / 7}
  running.flush()  # nothing queued: nothing changes
  assert running.count == 7


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_running_metrics_stop_at_the_first_non_finite_step(bad):
  running = train.RunningMetrics()
  running.add(1, _metrics(1.0, 0.5))
  running.add(2, _metrics(2.0, bad))
  running.add(3, _metrics(bad, 0.5))
  with pytest.raises(train.NonFiniteMetric) as stopped:
    running.flush()
  assert (stopped.value.step, stopped.value.name) == (2, "accuracy")
  assert stopped.value.value == bad or np.isnan(stopped.value.value) and np.isnan(bad)
  # The bad step was not added to the epoch's sums.
  assert running.count == 1 and running.sums == {"loss": 1.0, "accuracy": 0.5}


def _crd_stage(setup, directory) -> tuple[train.Stage, ml_collections.ConfigDict]:
  """A tiny CRD student stage: 2 epochs of 4 steps, saved every 3 steps."""
  _, mesh, _ = setup
  (student, student_variables), teacher = _student_and_teacher(mesh)
  config = default.get_config()
  config.distill.update(method="crd", crd_negatives=8)
  config.checkpoint.every_steps = 3
  config.eval.batch_size = 16
  settings = ml_collections.ConfigDict(
      dict(epochs=2, batch_size=16, optimizer=default.optimizer_config(name="sgd"))
  )
  stage = train.Stage(
      "student",
      str(directory),
      student,
      student_variables,
      settings,
      seed=0,
      teacher=OnlineTeacher(*teacher),
  )
  return stage, config


@pytest.mark.slow  # three short runs of a stage, ~45 s of CPU
def test_interrupted_crd_run_resumes_to_the_uninterrupted_result(setup, tmp_path, monkeypatch):
  _, mesh, data = setup
  stage, config = _crd_stage(setup, tmp_path / "whole")
  whole = train.train_stage(stage, data, config, mesh)

  make_train_step = train.make_train_step

  def stopped_at_step_6(*args, **kwargs):
    train_step = make_train_step(*args, **kwargs)

    def step(state, batch, teacher_variables):
      state, metrics = train_step(state, batch, teacher_variables)
      if int(state.step) == 6:  # mid-epoch, after the memory has seen every example once
        assert train_step._cache_size() == 1  # six steps, one compilation
        signal.raise_signal(signal.SIGTERM)
      return state, metrics

    return step

  stage, config = _crd_stage(setup, tmp_path / "stopped")
  monkeypatch.setattr(train, "make_train_step", stopped_at_step_6)
  with pytest.raises(Interrupted, match="at step 6"):
    train.train_stage(stage, data, config, mesh)
  monkeypatch.undo()
  stage, config = _crd_stage(setup, tmp_path / "stopped")  # the first's arrays were donated
  resumed = train.train_stage(stage, data, config, mesh)

  # The steps after the restart contrast with the restored memory and normalisers: the same
  # losses and weights to the bit.
  assert [e["crd"] for e in resumed.history] == [e["crd"] for e in whole.history]
  assert [e["loss"] for e in resumed.history] == [e["loss"] for e in whole.history]
  same = jax.tree.map(np.array_equal, _copy(resumed.variables), _copy(whole.variables))
  assert all(jax.tree.leaves(same))
