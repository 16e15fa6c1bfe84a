"""Pure, jitted train steps and the loop over epochs that drives them.

A train step takes the state and a batch and returns the new state and
metrics; it is compiled once per stage and donates the old state. A dataset
that fits sits in device memory as uint8 (`DeviceData`): a step receives only
the batch gathered from it, so no image crosses from the host after the first
copy. One that does not fit is streamed (`streaming.StreamedData`, the same
interface): batches arrive from the host ahead of the steps that use them.
"""

import contextlib
import dataclasses
import signal
import threading
import time
from typing import Callable, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from tqdm import tqdm

from kd_jax import evaluate, logs, methods, ops, optim, parallel, schedules, teacher_cache
from kd_jax.checkpoint import StageCheckpoints
from kd_jax.data import Dataset
from kd_jax.data import augment as augment_lib
from kd_jax.errors import Interrupted, TrainingDiverged, UserInputError
from kd_jax.network import Network, Variables


@flax.struct.dataclass
class TrainState:
  """Everything a train step changes."""

  step: jax.Array
  variables: Variables
  opt_state: optax.OptState


class RowLayout:
  """Where each example of one split lives among the rows of its global arrays.

  Every process pads its share of the examples to one block size, a multiple
  of its device count, and its block takes the rows of its own devices.
  `rows` gives the row of each example in the order of a one-process load, so
  addressing data by row picks the same examples whatever the process count.
  """

  def __init__(self, counts_P: np.ndarray):
    local = jax.local_device_count()
    self.block = -(-int(counts_P.max()) // local) * local
    self.num_rows = self.block * len(counts_P)
    self.rows = np.concatenate(
        [p * self.block + np.arange(c) for p, c in enumerate(counts_P)]
    ).astype(np.int32)

  def pad(self, share: np.ndarray) -> np.ndarray:
    """This process's share padded with zeros to the block size."""
    padded = np.zeros((self.block, *share.shape[1:]), share.dtype)
    padded[: len(share)] = share
    return padded

  def spread(self, share: np.ndarray, mesh) -> jax.Array:
    """The global array, split by rows over the mesh, of every process's share."""
    return jax.make_array_from_process_local_data(
        parallel.batch_sharding(mesh), self.pad(share), (self.num_rows, *share.shape[1:])
    )

  def gather_all(self, share: np.ndarray) -> np.ndarray:
    """Every process's share, by row, in host memory on every process."""
    return parallel.allgather(self.pad(share))

  def by_row(self, per_example: np.ndarray) -> np.ndarray:
    """An array of one entry per example (all processes'), laid out by row."""
    by_row = np.zeros((self.num_rows, *per_example.shape[1:]), per_example.dtype)
    by_row[self.rows] = per_example
    return by_row


@dataclasses.dataclass(frozen=True)
class DeviceData:
  """A dataset held in device memory as uint8, its images split over the mesh.

  Each process's devices hold its share of the images; what a step gathers
  is addressed by row (see RowLayout). `streaming.StreamedData` has the same
  interface for data read from disk as training goes.
  """

  train_images: jax.Array
  train_labels: jax.Array  # by row, replicated
  train_layout: RowLayout
  test_images: jax.Array
  test_layout: RowLayout
  test_labels: np.ndarray  # by example, on the host
  mean_C: np.ndarray
  std_C: np.ndarray
  num_classes: int
  gather: Callable  # make_gather's, for this mesh

  @property
  def num_train(self) -> int:
    """Training examples over all processes."""
    return len(self.train_layout.rows)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of every image."""
    return tuple(self.train_images.shape[1:])

  def steps_per_epoch(self, batch_size: int) -> int:
    """Steps of one epoch at the global `batch_size`."""
    return self.num_train // batch_size

  def step_augmentation(self, kind: str) -> augment_lib.Augmentation:
    """What the train step does to a batch before normalising it: the whole augmentation."""
    return augment_lib.get_augmentation(kind)

  def put_per_example(self, stored: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Per-example arrays given for every example (one-process order), on the devices by row."""
    mesh = self.train_images.sharding.mesh
    return jax.device_put(jax.tree.map(self.train_layout.by_row, stored), parallel.replicated(mesh))

  def train_batches(
      self, seed: int, epoch: int, start: int, batch_size: int, per_example: dict | None = None
  ) -> Iterator[dict]:
    """The global batches of steps `start`.. of `epoch`: "image", "label" and any `per_example` rows."""
    arrays = {"image": self.train_images, "label": self.train_labels}
    if per_example:
      arrays["teacher_logits"] = per_example
    rows_SxB = self.train_layout.rows[epoch_indices(seed, epoch, self.num_train, batch_size)]
    return (self.gather(arrays, rows_B) for rows_B in rows_SxB[start:])

  def predict(
      self, forward: Callable, variables: Variables, split: str, batch_size: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of every example of `split` ('train' or 'test'), unaugmented, in one-process order."""
    if split == "train":
      images, layout = self.train_images, self.train_layout
      labels = np.asarray(jax.device_get(self.train_labels))[layout.rows]
    else:
      images, layout, labels = self.test_images, self.test_layout, self.test_labels
    logits = evaluate.predict_logits(
        forward, variables, images, layout.rows, batch_size, self.gather
    )
    return logits, labels


def put_on_device(dataset: Dataset, mesh, data_config=None) -> DeviceData:
  """Copies this process's share of the dataset to its devices once; steps gather from it.

  The normalisation statistics are `data_config`'s data.mean and data.std if given, else over
  the whole training split, from every process's pixel histograms, so they are
  exact and the same everywhere.
  """
  counts_Px2 = parallel.allgather(
      np.array([[len(dataset.train_labels), len(dataset.test_labels)]], np.int64)
  )
  train, test = RowLayout(counts_Px2[:, 0]), RowLayout(counts_Px2[:, 1])
  stats = augment_lib.given_stats(data_config or {}, dataset.image_shape[-1])
  if stats is None:
    histograms = parallel.allgather(augment_lib.pixel_histograms(dataset.train_images)[None])
    stats = augment_lib.normalization_stats(histograms.sum(axis=0))
  mean_C, std_C = stats
  # Labels are small: every process keeps all of them.
  train_labels = train.gather_all(dataset.train_labels.astype(np.int32))
  return DeviceData(
      train.spread(dataset.train_images, mesh),
      jax.device_put(train_labels, parallel.replicated(mesh)),
      train,
      test.spread(dataset.test_images, mesh),
      test,
      test.gather_all(dataset.test_labels.astype(np.int32))[test.rows],
      mean_C,
      std_C,
      dataset.num_classes,
      make_gather(mesh),
  )


def make_gather(mesh) -> Callable:
  """A jitted `gather(arrays, indices_B)` whose batches are split over the mesh."""
  return parallel.in_order(
      jax.jit(
          lambda arrays, indices_B: jax.tree.map(lambda a: a[indices_B], arrays),
          out_shardings=parallel.batch_sharding(mesh),
      )
  )


def student_view(
    augmentation: Callable, seed: int, step: jax.Array, images_BxHxWxC: jax.Array, data
) -> jax.Array:
  """What the student sees at `step`: the batch augmented, then normalised.

  The augmentation draws come from (seed, step) alone, so the views of any
  step can be made again, e.g. for the teacher ahead of time (offline
  distillation with consistent views).
  """
  images = augmentation(augment_lib.step_key(seed, step), images_BxHxWxC)
  return augment_lib.normalize(images, data.mean_C, data.std_C)


def make_train_step(
    network: Network,
    optimizer: optax.GradientTransformation,
    data,
    *,
    augmentation: Callable,
    seed: int,
    mesh,
    teacher: Network | None = None,
    objective: methods.Objective = methods.cross_entropy_objective,
) -> Callable:
  """The jitted `train_step(state, batch, teacher_variables) -> (state, metrics)`.

  With a teacher, it runs in inference mode inside the same step and
  `objective` compares its logits with the student's; without one, the
  objective gets the batch's stored "teacher_logits" if it has them (offline
  distillation, in `teacher_cache.encode`'s form), else None. The teacher's
  variables are an argument, neither updated nor donated, so they stay outside
  the optimizer and one teacher can serve every student.
  """

  def train_step(state: TrainState, batch: dict, teacher_variables: Variables | None):
    x = student_view(augmentation, seed, state.step, batch["image"], data)
    labels_B = batch["label"]
    teacher_logits_BxC = None
    if teacher is not None:
      teacher_logits_BxC = teacher.apply(teacher_variables, x, train=False)[0]
      x = ops.after(x, teacher_logits_BxC)  # teacher, then student: see ops.after
    elif "teacher_logits" in batch:  # offline distillation: stored predictions
      teacher_logits_BxC = teacher_cache.decode(batch["teacher_logits"], data.num_classes)

    def loss_fn(params):
      logits_BxC, batch_stats = network.apply(
          Variables(params, state.variables.batch_stats), x, train=True
      )
      loss, parts = objective(logits_BxC, teacher_logits_BxC, labels_B, state.step)
      return loss, (logits_BxC, batch_stats, parts)

    (loss, (logits_BxC, batch_stats, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.variables.params
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.variables.params)
    params = optax.apply_updates(state.variables.params, updates)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits_BxC, -1) == labels_B),
        # A non-finite norm flags overflowed weights a step before the loss shows it.
        "param_norm": optax.tree.norm(params),
        **parts,
    }
    return TrainState(state.step + 1, Variables(params, batch_stats), opt_state), metrics

  # The state is donated: its buffers become the new state's, so a step needs
  # no second copy of parameters and optimizer moments.
  return parallel.in_order(
      jax.jit(train_step, donate_argnums=0, out_shardings=parallel.replicated(mesh))
  )


def epoch_indices(seed: int, epoch: int, count: int, batch_size: int) -> np.ndarray:
  """The shuffled example order of one epoch, as steps x batch_size indices.

  A pure function of (seed, epoch), so an epoch can be replayed exactly; the
  last partial batch is dropped so that every step has the same shape.
  """
  steps = count // batch_size
  order = np.random.default_rng([seed, epoch]).permutation(count)
  return order[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)


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


@dataclasses.dataclass
class StageResult:
  """What a stage leaves behind: final variables and per-epoch history."""

  variables: Variables
  history: list[dict]
  wall_time_s: float
  settings: dict  # what makes two reports comparable: batch, learning rate, devices


def train_stage(
    name: str,
    stage_dir: str,
    *,
    config,
    stage_config,
    network: Network,
    variables: Variables,
    data,
    mesh,
    teacher: Network | None = None,
    teacher_variables: Variables | None = None,
    teacher_logits: dict[str, np.ndarray] | None = None,
    teacher_views: Callable[[int], dict[str, np.ndarray]] | None = None,
    seed: int,
    may_train: bool = True,
) -> StageResult:
  """Trains one stage (teacher, student or baseline) for its configured epochs.

  `seed` fixes the data order and the augmentation draws. The student
  distils from `teacher` run inside the step (online), from `teacher_logits`,
  one row per training example (offline, plain), or from `teacher_views(epoch)`,
  the logits of exactly the views each step of that epoch shows the student,
  steps x batch x classes (offline, consistent); stored logits come in
  `teacher_cache.encode`'s form, `teacher_logits` in one-process order.
  `data` is a `DeviceData` or a `streaming.StreamedData`.

  Saves an Orbax checkpoint every `checkpoint.every_steps` steps and at each
  epoch end, after a test-set evaluation and a line in metrics.jsonl and
  TensorBoard. A stage with checkpoints resumes from the newest whole one,
  mid-epoch if need be, and ends exactly as an uninterrupted run would; a
  finished stage just returns its final state. With `may_train` false, an
  unfinished stage is an error instead.
  """
  batch_size, epochs = stage_config.batch_size, stage_config.epochs
  parallel.check_batch_size(batch_size, f"{name}.batch_size", mesh)
  if batch_size > data.num_train:
    raise UserInputError(
        f"{name}.batch_size={batch_size} is larger than the "
        f"{data.num_train} training examples; lower it"
    )
  steps = data.steps_per_epoch(batch_size)
  optimizer = optim.make_optimizer(stage_config.optimizer, steps, epochs, batch_size)
  objective = methods.cross_entropy_objective
  if teacher is not None or teacher_logits is not None or teacher_views is not None:
    objective = methods.make_objective(config.distill, steps, epochs)
  train_step = make_train_step(
      network,
      optimizer,
      data,
      augmentation=data.step_augmentation(config.data.augment),
      seed=seed,
      mesh=mesh,
      teacher=teacher,
      objective=objective,
  )
  forward = evaluate.jit_forward(network, data.mean_C, data.std_C, mesh)

  state = jax.device_put(
      TrainState(jnp.zeros((), jnp.int32), variables, optimizer.init(variables.params)),
      parallel.replicated(mesh),
  )
  checkpoints = StageCheckpoints(stage_dir, keep=config.checkpoint.keep)
  meta = {"history": [], "wall_time_s": 0.0, "epoch_sums": {}, "epoch_count": 0}
  restored = checkpoints.restore_latest(
      state.variables, {"step": state.step, "opt_state": state.opt_state}
  )
  if restored is not None:
    variables, train, meta = restored
    state = TrainState(train["step"], variables, train["opt_state"])
    logging.info("%s: resuming at step %d from %s", name, int(state.step), checkpoints.directory)

  settings = {
      "batch_size": batch_size,
      "optimizer": stage_config.optimizer.name,
      "learning_rate": schedules.peak_learning_rate(stage_config.optimizer, batch_size),
      "devices": mesh.size,
      "compute_dtype": network.compute_dtype,
  }
  step = int(state.step)
  if not may_train and step < steps * epochs:
    raise UserInputError(
        f"{name} has trained {step} of its {steps * epochs} steps in {stage_dir}; "
        f"finish it with --mode=train first"
    )
  session_start = time.perf_counter()
  running = RunningMetrics(meta["epoch_sums"], meta["epoch_count"])
  history = meta["history"]

  def save(test_top1=None):
    wall_time_s = meta["wall_time_s"] + time.perf_counter() - session_start
    checkpoints.save(
        step,
        state.variables,
        {"step": state.step, "opt_state": state.opt_state},
        {
            "model": network.name,
            "num_classes": data.num_classes,
            "epochs": epochs,
            "history": history,
            "wall_time_s": wall_time_s,
            "epoch_sums": running.sums,
            "epoch_count": running.count,
            "settings": settings,
        },
        test_top1=test_top1,
    )
    return wall_time_s

  def stop(signum: int, saved: bool = False):
    if not saved:
      running.flush()
      save()
    checkpoints.close()
    raise Interrupted(
        f"{name}: stopped by signal {signum} at step {step}; checkpoint saved in "
        f"{checkpoints.directory}; run the same command again to resume",
        signum,
    )

  per_example = None if teacher_logits is None else data.put_per_example(teacher_logits)
  log = logs.StageLog(stage_dir)
  wall_time_s = meta["wall_time_s"]
  try:
    with stop_requests() as requested:
      for epoch in range(step // steps, epochs):
        epoch_start = time.perf_counter()
        with tqdm(
            total=steps,
            initial=step % steps,
            desc=f"{name} {epoch + 1}/{epochs}",
            leave=False,
            disable=None if jax.process_index() == 0 else True,
        ) as progress:
          if teacher_views is not None:
            views = teacher_views(epoch)
            view_logits = jax.device_put(
                [jax.tree.map(lambda a: a[p], views) for p in range(steps)],
                parallel.batch_sharding(mesh),
            )
          batches = data.train_batches(seed, epoch, step % steps, batch_size, per_example)
          for position, batch in zip(range(step % steps, steps), batches):
            if teacher_views is not None:
              batch["teacher_logits"] = view_logits[position]
            state, metrics = train_step(state, batch, teacher_variables)
            step += 1
            running.add(step, metrics)
            if step % 10 == 0:
              running.flush(keep=1)
              if running.last:  # none yet when a short epoch has just begun
                progress.set_postfix(
                    {k: f"{running.last[k]:.3f}" for k in ("loss", "accuracy")}, refresh=False
                )
            progress.update(1)
            # At an epoch's last step the epoch end below evaluates, saves, then stops: a save
            # here would hold the step without that epoch's evaluation, which a rerun skips.
            if requested and step % steps:
              stop(requested[0])
            if config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0:
              if step % steps:  # an epoch end saves below, with its accuracy
                running.flush()
                save()
        running.flush()
        test_logits, test_labels = data.predict(
            forward, state.variables, "test", config.eval.batch_size
        )
        epoch_metrics = running.means()
        epoch_metrics["test_top1"] = evaluate.topk_accuracy(test_logits, test_labels, 1)
        epoch_metrics["epoch_time_s"] = time.perf_counter() - epoch_start
        history.append({"epoch": epoch + 1, **epoch_metrics})
        log.write(epoch + 1, epoch_metrics)
        logging.info(
            "%s epoch %d/%d: %s",
            name,
            epoch + 1,
            epochs,
            " ".join(f"{k}={v:.4g}" for k, v in epoch_metrics.items()),
        )
        running = RunningMetrics()
        wall_time_s = save(test_top1=epoch_metrics["test_top1"])
        if requested:
          stop(requested[0], saved=True)
  except NonFiniteMetric as e:
    latest = checkpoints.latest_step()
    checkpoints.close()
    raise TrainingDiverged(
        f"{name}: {e.name} is {e.value} at step {e.step}; the last good checkpoint is "
        + (f"{checkpoints.directory}/{latest}" if latest is not None else "none (none saved yet)")
        + "; lower the learning rate or enable gradient clipping, then rerun"
    ) from None
  finally:
    log.close()
  checkpoints.close()
  return StageResult(state.variables, history, wall_time_s, settings)
