"""The train step and the loop of one stage: epochs of steps, evaluations, checkpoints.

A train step takes the state and a batch and returns the new state and
metrics; it is compiled once per stage and donates the old state. The loop
knows the training data only through `placement.TrainingData` (in memory or
streamed: the same batches either way) and the teacher only through
`teachers.Teacher`; it knows nothing of the stages a run is made of.
"""

import contextlib
import dataclasses
import signal
import threading
import time
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from tqdm import tqdm

from kd_jax import evaluate, layers, logs, methods, ops, optim, parallel, schedules
from kd_jax.checkpoint import StageCheckpoints
from kd_jax.data.placement import TrainingData
from kd_jax.errors import Interrupted, TrainingDiverged, UserInputError
from kd_jax.network import Network, Variables
from kd_jax.settings import check_batch_fits
from kd_jax.teachers import Teacher


@flax.struct.dataclass
class TrainState:
  """Everything a train step changes: a feature method's connectors too, where it has some."""

  step: jax.Array
  variables: Variables
  opt_state: optax.OptState
  connectors: Variables | None = None

  def trainable(self):
    """What the optimizer updates: the student's parameters, and the connectors' with them."""
    if self.connectors is None:
      return self.variables.params
    return self.variables.params, self.connectors.params

  def after_step(self, trainable, batch_stats, opt_state) -> "TrainState":
    """The next step's state; `trainable` and `batch_stats` are shaped as `trainable()`."""
    if self.connectors is None:
      return TrainState(self.step + 1, Variables(trainable, batch_stats), opt_state)
    (params, connector_params), (stats, connector_stats) = trainable, batch_stats
    connectors = Variables(connector_params, connector_stats)
    return TrainState(self.step + 1, Variables(params, stats), opt_state, connectors)

  def checkpointed(self) -> dict:
    """The checkpoint's "train" item: everything but the student's variables."""
    train = {"step": self.step, "opt_state": self.opt_state}
    return train if self.connectors is None else {**train, "connectors": self.connectors}


def make_train_step(
    network: Network,
    optimizer: optax.GradientTransformation,
    data: TrainingData,
    *,
    seed: int,
    mesh,
    teacher: Teacher | None = None,
    objective: methods.Objective = methods.labels_objective(),
    feature_method: methods.FeatureMethod | None = None,
) -> Callable:
  """The jitted `train_step(state, batch, teacher_variables) -> (state, metrics)`.

  The student sees `data.student_view` of the batch. With a teacher, the
  objective compares the teacher's logits of the batch (`teacher.logits`)
  with the student's; without one, it gets None. A `feature_method` (whose
  teacher is an OnlineTeacher) replaces `objective` with its own, which
  compares the two networks' features through the state's connectors. The
  teacher's variables are an argument, neither updated nor donated, so they
  stay outside the optimizer and one teacher can serve every student.
  """

  def train_step(state: TrainState, batch: dict, teacher_variables: Variables | None):
    x = data.student_view(seed, state.step, batch["image"])
    labels_B = batch["label"]
    if feature_method is not None:
      teacher_logits_BxC, teacher_features = teacher.logits_and_features(
          teacher_variables, batch, x
      )
      x = _teacher_first(x, teacher_logits_BxC)
      step_data = methods.StepData(state.step, batch["index"], teacher_logits_BxC)
      loss_fn = _feature_loss_fn(
          network, feature_method.objective, state, x, teacher_features, labels_B, step_data
      )
    else:
      teacher_logits_BxC = None
      if teacher is not None:
        teacher_logits_BxC = teacher.logits(teacher_variables, batch, x)
        x = _teacher_first(x, teacher_logits_BxC)
      loss_fn = _logits_loss_fn(network, objective, state, x, teacher_logits_BxC, labels_B)

    trainable = state.trainable()
    (loss, (logits_BxC, batch_stats, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits_BxC, -1) == labels_B),
        # A non-finite norm flags overflowed weights a step before the loss shows it.
        "param_norm": optax.tree.norm(trainable),
        **parts,
    }
    return state.after_step(trainable, batch_stats, opt_state), metrics

  # The state is donated: its buffers become the new state's, so a step needs
  # no second copy of parameters and optimizer moments.
  return parallel.in_order(
      jax.jit(train_step, donate_argnums=0, out_shardings=parallel.replicated(mesh))
  )


def _teacher_first(x: jax.Array, teacher_logits_BxC: jax.Array) -> jax.Array:
  """x, made to wait for the teacher's logits on CPU, where that pays (see ops.after)."""
  if jax.default_backend() == "cpu":
    return ops.after(x, teacher_logits_BxC)
  return x


def _logits_loss_fn(network, objective, state, x, teacher_logits_BxC, labels_B):
  """loss_fn(params) -> (loss, (logits, batch statistics, parts)) of a method on logits."""

  def loss_fn(params):
    logits_BxC, batch_stats = network.apply(
        Variables(params, state.variables.batch_stats), x, train=True
    )
    loss, parts = objective(logits_BxC, teacher_logits_BxC, labels_B, state.step)
    return loss, (logits_BxC, batch_stats, parts)

  return loss_fn


def _feature_loss_fn(network, objective, state, x, teacher_features, labels_B, step_data):
  """loss_fn(trainable) -> (loss, (logits, batch statistics, parts)) of a feature method.

  `trainable` and the batch statistics are shaped as `state.trainable()`.
  """

  def loss_fn(trainable):
    params, connectors = trainable, None
    if state.connectors is not None:
      params, connector_params = trainable
      connectors = Variables(connector_params, state.connectors.batch_stats)
    logits_BxC, features, batch_stats = network.apply_with_features(
        Variables(params, state.variables.batch_stats), x, train=True
    )
    loss, connector_stats, parts = objective(
        logits_BxC, features, teacher_features, labels_B, connectors, step_data
    )
    if connectors is not None:
      batch_stats = (batch_stats, connector_stats)
    return loss, (logits_BxC, batch_stats, parts)

  return loss_fn


class RunningMetrics:
  """Sums of the step metrics of the current epoch, pulled from the device in chunks.

  Steps are dispatched ahead of the host; `flush(keep=1)` fetches all but the
  newest step's metrics, which have finished by then, so reading them never
  drains the queue. Each fetched metric is checked: a NaN or infinite loss
  or parameter norm stops the stage before anything is saved.
  """

  def __init__(self, sums: dict | None = None, count: int = 0):
    self.sums, self.count = dict(sums or {}), count
    self._pending = []  # (step, metrics on the device)
    self.last = {}

  def add(self, step: int, metrics: dict) -> None:
    """Queues the metrics of `step` (1-based global step)."""
    self._pending.append((step, metrics))

  def flush(self, keep: int = 0) -> None:
    """Adds all but the newest `keep` queued steps to the sums."""
    ready = self._pending[: len(self._pending) - keep]
    self._pending = self._pending[len(ready) :]
    for step, metrics in jax.device_get(ready):
      for name, value in metrics.items():
        if not np.isfinite(value):
          raise NonFiniteMetric(step, name, float(value))
      for name, value in metrics.items():
        self.sums[name] = self.sums.get(name, 0.0) + float(value)
      self.count += 1
      self.last = metrics

  def means(self) -> dict:
    """Mean of each metric over the epoch's steps so far."""
    return {name: total / self.count for name, total in self.sums.items()}


class NonFiniteMetric(Exception):
  """Raised by RunningMetrics; train_stage turns it into TrainingDiverged."""

  def __init__(self, step: int, name: str, value: float):
    super().__init__(step, name, value)
    self.step, self.name, self.value = step, name, value


@contextlib.contextmanager
def stop_requests():
  """Collects SIGTERM and SIGINT (preemption, Ctrl-C) instead of dying at once.

  Yields a list that receives the signal numbers; the loop checks it after
  each step, saves a checkpoint and stops cleanly.
  """
  requested = []
  signals = (signal.SIGTERM, signal.SIGINT)
  if threading.current_thread() is not threading.main_thread():
    yield requested  # Only the main thread may set handlers; run unguarded.
    return
  previous = {s: signal.signal(s, lambda signum, frame: requested.append(signum)) for s in signals}
  try:
    yield requested
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage to train: its network, where its files go, its settings and its teacher.

  `settings` is the stage's config section (epochs, batch_size, optimizer);
  `seed` fixes the data order and the augmentation draws; with a `teacher`,
  the student distils from it (see `teachers`).
  """

  name: str
  directory: str
  network: Network
  variables: Variables
  settings: ml_collections.ConfigDict
  seed: int
  teacher: Teacher | None = None


@dataclasses.dataclass
class StageResult:
  """What a stage leaves behind: final variables and per-epoch history."""

  variables: Variables
  history: list[dict]
  wall_time_s: float
  settings: dict  # what makes two reports comparable: batch, learning rate, devices


@dataclasses.dataclass(frozen=True)
class StageLoop:
  """The parts of a stage's loop that stay fixed while it trains."""

  name: str
  data: TrainingData
  teacher: Teacher | None
  seed: int
  batch_size: int
  steps: int  # per epoch
  epochs: int
  train_step: Callable  # make_train_step's
  forward: Callable  # evaluate.jit_forward's
  eval_batch_size: int
  every_steps: int  # checkpoint.every_steps
  meta: dict  # what every checkpoint records besides progress: model, classes, settings

  def batches(self, epoch: int, start: int):
    """The batches of steps `start`.. of `epoch`, with the teacher's part if there is one."""
    if self.teacher is None:
      return self.data.train_batches(self.seed, epoch, start, self.batch_size)
    return self.teacher.batches(self.data, self.seed, epoch, start, self.batch_size)


@dataclasses.dataclass
class Progress:
  """Where a stage stands: its train state, and what the host has counted of it."""

  state: TrainState
  step: int
  history: list[dict]
  running: RunningMetrics
  trained_s: float  # training time before this process took over
  wall_time_s: float  # training time as of the last checkpoint
  started: float = dataclasses.field(default_factory=time.perf_counter)


def train_stage(
    stage: Stage, data: TrainingData, config, mesh, may_train: bool = True
) -> StageResult:
  """Trains one stage (teacher, student or baseline) for its configured epochs.

  Saves an Orbax checkpoint every `checkpoint.every_steps` steps and at each
  epoch end, after a test-set evaluation and a line in metrics.jsonl and
  TensorBoard. A stage with checkpoints resumes from the newest whole one,
  mid-epoch if need be, and ends exactly as an uninterrupted run would; a
  finished stage just returns its final state. With `may_train` false, an
  unfinished stage is an error instead. However the stage ends, a signal or
  an error included, its pending checkpoint writes finish first.
  """
  loop, state = _prepare(stage, data, config, mesh)
  with StageCheckpoints(stage.directory, keep=config.checkpoint.keep) as checkpoints:
    progress = _resume(stage.name, state, checkpoints)
    total = loop.steps * loop.epochs
    if not may_train and progress.step < total:
      raise UserInputError(
          f"{stage.name} has trained {progress.step} of its {total} steps in "
          f"{stage.directory}; finish it with --mode=train first"
      )
    log = logs.StageLog(stage.directory)
    try:
      with stop_requests() as requested:
        for epoch in range(progress.step // loop.steps, loop.epochs):
          epoch_start = time.perf_counter()
          run_epoch(loop, progress, checkpoints, epoch, requested)
          metrics = evaluate_epoch(loop, progress, epoch_start)
          _end_epoch(loop, progress, checkpoints, log, epoch, metrics)
          if requested:
            raise _interrupted(loop, progress, checkpoints, requested[0])
    except NonFiniteMetric as e:
      latest = checkpoints.latest_step()
      raise TrainingDiverged(
          f"{stage.name}: {e.name} is {e.value} at step {e.step}; the last good checkpoint is "
          + (f"{checkpoints.directory}/{latest}" if latest is not None else "none (none saved yet)")
          + "; lower the learning rate or enable gradient clipping, then rerun"
      ) from None
    finally:
      log.close()
  settings = loop.meta["settings"]
  return StageResult(progress.state.variables, progress.history, progress.wall_time_s, settings)


def _prepare(stage: Stage, data: TrainingData, config, mesh) -> tuple[StageLoop, TrainState]:
  """The stage's loop (step, objective, evaluation) and its initial train state."""
  batch_size, epochs = stage.settings.batch_size, stage.settings.epochs
  parallel.check_batch_size(batch_size, f"{stage.name}.batch_size", mesh)
  check_batch_fits(f"{stage.name}.batch_size", batch_size, data.num_train)
  steps = data.steps_per_epoch(batch_size)
  # Only the teacher's settings have label_smoothing: a student's labels term stays plain.
  objective = methods.labels_objective(stage.settings.get("label_smoothing", 0.0))
  feature_method = None
  if stage.teacher is not None and config.distill.method in methods.FEATURE_METHODS:
    feature_method = methods.make_feature_method(
        config.distill,
        (stage.network, stage.variables),
        (stage.teacher.network, stage.teacher.variables),
        data.image_shape,
        stage.seed,
        num_train=data.num_train,
        steps_per_epoch=steps,
        epochs=epochs,
    )
  elif stage.teacher is not None:
    objective = methods.make_objective(config.distill, steps, epochs)
  connectors = None if feature_method is None else feature_method.connector_variables
  optimizer = _optimizer(stage, steps, connectors)
  train_step = make_train_step(
      stage.network,
      optimizer,
      data,
      seed=stage.seed,
      mesh=mesh,
      teacher=stage.teacher,
      objective=objective,
      feature_method=feature_method,
  )
  settings = {
      "batch_size": batch_size,
      "optimizer": stage.settings.optimizer.name,
      "learning_rate": schedules.peak_learning_rate(stage.settings.optimizer, batch_size),
      "devices": mesh.size,
      "compute_dtype": stage.network.compute_dtype,
  }
  loop = StageLoop(
      name=stage.name,
      data=data,
      teacher=stage.teacher,
      seed=stage.seed,
      batch_size=batch_size,
      steps=steps,
      epochs=epochs,
      train_step=train_step,
      forward=evaluate.jit_forward(
          stage.network, data.mean_C, data.std_C, mesh, tta=config.eval.tta
      ),
      eval_batch_size=config.eval.batch_size,
      every_steps=config.checkpoint.every_steps,
      meta={
          "model": stage.network.name,
          "num_classes": data.num_classes,
          "epochs": epochs,
          "settings": settings,
      },
  )
  state = TrainState(jnp.zeros((), jnp.int32), stage.variables, None, connectors)
  state = state.replace(opt_state=optimizer.init(state.trainable()))
  return loop, jax.device_put(state, parallel.replicated(mesh))


def _optimizer(
    stage: Stage, steps: int, connectors: Variables | None
) -> optax.GradientTransformation:
  """The stage's optimiser, for its parameters and, where there are some, its connectors'."""
  network, variables = stage.network, stage.variables
  norm_biases = network.biases_of(variables, nnx.BatchNorm)
  whitening_biases = network.biases_of(variables, layers.PatchWhitening)
  if connectors is not None:  # shaped as TrainState.trainable(): no connector is either
    no_connector = jax.tree.map(lambda _: False, connectors.params)
    norm_biases, whitening_biases = (norm_biases, no_connector), (whitening_biases, no_connector)
  settings = stage.settings
  return optim.make_optimizer(
      settings.optimizer,
      steps,
      settings.epochs,
      settings.batch_size,
      norm_biases,
      whitening_biases,
  )


def _resume(name: str, state: TrainState, checkpoints: StageCheckpoints) -> Progress:
  """The progress of the newest whole checkpoint, or of `state` if there is none."""
  restored = checkpoints.restore_latest(state.variables, state.checkpointed())
  if restored is None:
    return Progress(state, 0, [], RunningMetrics(), 0.0, 0.0)
  variables, train, meta = restored
  logging.info("%s: resuming at step %d from %s", name, int(train["step"]), checkpoints.directory)
  return Progress(
      TrainState(train["step"], variables, train["opt_state"], train.get("connectors")),
      int(train["step"]),
      meta["history"],
      RunningMetrics(meta["epoch_sums"], meta["epoch_count"]),
      meta["wall_time_s"],
      meta["wall_time_s"],
  )


def run_epoch(
    loop: StageLoop, progress: Progress, checkpoints: StageCheckpoints, epoch: int, requested: list
) -> None:
  """Runs the steps of `epoch` from `progress.step` on, and sums their metrics.

  Saves a checkpoint every `loop.every_steps` steps, and on a `requested`
  stop saves one and raises Interrupted, except at the epoch's last step:
  its end saves with the epoch's evaluation, which a rerun would skip.
  """
  start = progress.step % loop.steps
  teacher_variables = None if loop.teacher is None else loop.teacher.variables
  with tqdm(
      total=loop.steps,
      initial=start,
      desc=f"{loop.name} {epoch + 1}/{loop.epochs}",
      leave=False,
      disable=None if jax.process_index() == 0 else True,
  ) as progress_bar:
    for batch in loop.batches(epoch, start):
      progress.state, metrics = loop.train_step(progress.state, batch, teacher_variables)
      progress.step += 1
      progress.running.add(progress.step, metrics)
      if progress.step % 10 == 0:
        progress.running.flush(keep=1)
        if progress.running.last:  # none yet when a short epoch has just begun
          shown = {k: f"{progress.running.last[k]:.3f}" for k in ("loss", "accuracy")}
          progress_bar.set_postfix(shown, refresh=False)
      progress_bar.update(1)
      if progress.step % loop.steps:  # the epoch's last step is saved by its end
        if requested:
          raise _interrupted(loop, progress, checkpoints, requested[0], saved=False)
        if loop.every_steps and progress.step % loop.every_steps == 0:
          progress.running.flush()
          save_checkpoint(checkpoints, progress, loop.meta)
  progress.running.flush()


def evaluate_epoch(loop: StageLoop, progress: Progress, epoch_start: float) -> dict:
  """The epoch's metrics: its steps' means, the test set's top-1 and the time since `epoch_start`."""
  test_logits, test_labels = loop.data.predict(
      loop.forward, progress.state.variables, "test", loop.eval_batch_size
  )
  metrics = progress.running.means()
  metrics["test_top1"] = evaluate.topk_accuracy(test_logits, test_labels, 1)
  metrics["epoch_time_s"] = time.perf_counter() - epoch_start
  return metrics


def _end_epoch(loop, progress, checkpoints, log, epoch: int, metrics: dict) -> None:
  """Records an evaluated epoch (history, log files) and saves its checkpoint."""
  progress.history.append({"epoch": epoch + 1, **metrics})
  log.write(epoch + 1, metrics)
  logging.info(
      "%s epoch %d/%d: %s",
      loop.name,
      epoch + 1,
      loop.epochs,
      " ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
  )
  progress.running = RunningMetrics()
  save_checkpoint(checkpoints, progress, loop.meta, test_top1=metrics["test_top1"])


def save_checkpoint(
    checkpoints: StageCheckpoints, progress: Progress, meta: dict, test_top1: float | None = None
) -> None:
  """Starts saving `progress` at its step: train state, history, the epoch's sums and `meta`.

  `test_top1` ranks an epoch end's checkpoint among the best.
  """
  progress.wall_time_s = progress.trained_s + time.perf_counter() - progress.started
  state = progress.state
  checkpoints.save(
      progress.step,
      state.variables,
      state.checkpointed(),
      {
          **meta,
          "history": progress.history,
          "wall_time_s": progress.wall_time_s,
          "epoch_sums": progress.running.sums,
          "epoch_count": progress.running.count,
      },
      test_top1=test_top1,
  )


def _interrupted(loop, progress, checkpoints, signum: int, saved: bool = True) -> Interrupted:
  """The error that ends a stage stopped by `signum`, once its progress is saved."""
  if not saved:
    progress.running.flush()
    save_checkpoint(checkpoints, progress, loop.meta)
  return Interrupted(
      f"{loop.name}: stopped by signal {signum} at step {progress.step}; checkpoint saved in "
      f"{checkpoints.directory}; run the same command again to resume",
      signum,
  )
