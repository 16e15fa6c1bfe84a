"""Pure, jitted train steps and the loop over epochs that drives them.

A train step takes the state and a batch and returns the new state and
metrics; it is compiled once per stage and donates its inputs. The dataset
sits in device memory as uint8; a step receives only the batch gathered from
it, so no image crosses from the host after the first copy.
"""

import dataclasses
import functools
import time
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from tqdm import tqdm

from kd_jax import evaluate, logs, losses, optim, parallel, schedules
from kd_jax.checkpoint import StageCheckpoints
from kd_jax.data import Dataset
from kd_jax.data import augment as augment_lib
from kd_jax.errors import UserInputError
from kd_jax.network import Network, Variables


@flax.struct.dataclass
class TrainState:
  """Everything a train step changes."""

  step: jax.Array
  variables: Variables
  opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class DeviceData:
  """A dataset held in device memory as uint8, replicated over the mesh."""

  train_images: jax.Array
  train_labels: jax.Array
  test_images: jax.Array
  test_labels: np.ndarray
  mean_C: np.ndarray
  std_C: np.ndarray

  @property
  def num_train(self) -> int:
    return self.train_labels.shape[0]


def put_on_device(dataset: Dataset, mesh) -> DeviceData:
  """Copies the dataset to the devices once; steps then index into it."""
  mean_C, std_C = augment_lib.normalization_stats(dataset.train_images)
  put = functools.partial(jax.device_put, device=parallel.replicated(mesh))
  return DeviceData(
      put(dataset.train_images),
      put(dataset.train_labels.astype(np.int32)),
      put(dataset.test_images),
      dataset.test_labels.astype(np.int32),
      mean_C,
      std_C,
  )


def make_gather(mesh) -> Callable:
  """A jitted `gather(arrays, indices_B)` whose batches are split over the mesh."""
  return jax.jit(
      lambda arrays, indices_B: jax.tree.map(lambda a: a[indices_B], arrays),
      out_shardings=parallel.batch_sharding(mesh),
  )


def make_train_step(
    network: Network,
    optimizer: optax.GradientTransformation,
    data: DeviceData,
    *,
    augmentation: Callable,
    seed: int,
    mesh,
    teacher: Network | None = None,
    temperature_fn: Callable | None = None,
    alpha: float = 0.0,
) -> Callable:
  """The jitted `train_step(state, batch, teacher_variables) -> (state, metrics)`.

  Without a teacher the loss is cross-entropy. With one, the teacher runs in
  inference mode inside the same step and the loss is `distillation_loss` at
  `temperature_fn(step)`. The teacher's variables are an argument, neither
  updated nor donated, so they stay outside the optimizer and one teacher can
  serve every student.
  """
  root_key = jax.random.key(seed)

  def train_step(state: TrainState, batch: dict, teacher_variables: Variables | None):
    images = augmentation(jax.random.fold_in(root_key, state.step), batch["image"])
    x = augment_lib.normalize(images, data.mean_C, data.std_C)
    labels_B = batch["label"]
    if teacher is not None:
      teacher_logits_BxC = teacher.apply(teacher_variables, x, train=False)[0]
      temperature = temperature_fn(state.step)

    def loss_fn(params):
      logits_BxC, batch_stats = network.apply(
          Variables(params, state.variables.batch_stats), x, train=True
      )
      if teacher is None:
        return losses.cross_entropy(logits_BxC, labels_B), (logits_BxC, batch_stats, {})
      loss, parts = losses.distillation_loss(
          logits_BxC, teacher_logits_BxC, labels_B, temperature, alpha
      )
      return loss, (logits_BxC, batch_stats, {**parts, "temperature": temperature})

    (loss, (logits_BxC, batch_stats, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.variables.params
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.variables.params)
    params = optax.apply_updates(state.variables.params, updates)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits_BxC, -1) == labels_B), **parts}
    return TrainState(state.step + 1, Variables(params, batch_stats), opt_state), metrics

  # The state is donated: its buffers become the new state's, so a step needs
  # no second copy of parameters and optimizer moments.
  return jax.jit(train_step, donate_argnums=0, out_shardings=parallel.replicated(mesh))


def epoch_indices(seed: int, epoch: int, count: int, batch_size: int) -> np.ndarray:
  """The shuffled example order of one epoch, as steps x batch_size indices.

  A pure function of (seed, epoch), so an epoch can be replayed exactly; the
  last partial batch is dropped so that every step has the same shape.
  """
  steps = count // batch_size
  order = np.random.default_rng([seed, epoch]).permutation(count)
  return order[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def run_epoch(
    train_step: Callable,
    state: TrainState,
    teacher_variables,
    data: DeviceData,
    gather: Callable,
    indices_SxB: np.ndarray,
    progress: tqdm,
):
  """Runs one epoch of steps; returns the new state and the epoch's mean metrics.

  Metrics stay on the device. The progress bar shows the previous step's,
  which has finished by then, so reading them never drains the step queue.
  """
  step_metrics = []
  start = time.perf_counter()
  for i, indices_B in enumerate(indices_SxB):
    batch = gather({"image": data.train_images, "label": data.train_labels}, indices_B)
    state, metrics = train_step(state, batch, teacher_variables)
    step_metrics.append(metrics)
    if i % 10 == 1:
      shown = jax.device_get(step_metrics[-2])
      progress.set_postfix(
          loss=f"{shown['loss']:.3f}",
          acc=f"{shown['accuracy']:.3f}",
          img_s=f"{i * indices_SxB.shape[1] / (time.perf_counter() - start):.0f}",
          refresh=False,
      )
    progress.update(1)
  means = jax.device_get(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *step_metrics))
  return state, {name: float(value) for name, value in means.items()}


@dataclasses.dataclass
class StageResult:
  """What a stage leaves behind: final variables and per-epoch history."""

  variables: Variables
  history: list[dict]
  wall_time_s: float


def train_stage(
    name: str,
    stage_dir: str,
    *,
    config,
    stage_config,
    network: Network,
    variables: Variables,
    data: DeviceData,
    mesh,
    teacher: Network | None = None,
    teacher_variables: Variables | None = None,
    alpha: float = 0.0,
) -> StageResult:
  """Trains one stage (teacher, student or baseline) for its configured epochs.

  Each epoch ends with a test-set evaluation, a line in metrics.jsonl and
  TensorBoard, and an Orbax checkpoint. A stage with checkpoints resumes
  from the newest one; a finished stage just returns its final state.
  """
  batch_size, epochs = stage_config.batch_size, stage_config.epochs
  parallel.check_batch_size(batch_size, f"{name}.batch_size", mesh)
  if batch_size > data.num_train:
    raise UserInputError(
        f"{name}.batch_size={batch_size} is larger than the "
        f"{data.num_train} training examples; lower it"
    )
  steps = data.num_train // batch_size
  optimizer = optim.make_optimizer(stage_config.optimizer, steps, epochs)
  temperature_fn = None
  if teacher is not None:
    temperature_fn = schedules.temperature_schedule(config.distill, steps, epochs)
  train_step = make_train_step(
      network,
      optimizer,
      data,
      augmentation=augment_lib.get_augmentation(config.data.augment),
      seed=config.seed,
      mesh=mesh,
      teacher=teacher,
      temperature_fn=temperature_fn,
      alpha=alpha,
  )
  gather = make_gather(mesh)
  forward = jax.jit(evaluate.make_forward(network, data.mean_C, data.std_C))

  state = jax.device_put(
      TrainState(jnp.zeros((), jnp.int32), variables, optimizer.init(variables.params)),
      parallel.replicated(mesh),
  )
  history, wall_time_s = [], 0.0
  checkpoints = StageCheckpoints(stage_dir)
  latest = checkpoints.latest_step()
  if latest is not None:
    restored, train, meta = checkpoints.restore(
        latest, state.variables, {"step": state.step, "opt_state": state.opt_state}
    )
    state = TrainState(train["step"], restored, train["opt_state"])
    history, wall_time_s = meta["history"], meta["wall_time_s"]
    logging.info("%s: resuming after epoch %d from %s", name, len(history), checkpoints.directory)

  log = logs.StageLog(stage_dir)
  for epoch in range(len(history), epochs):
    start = time.perf_counter()
    indices_SxB = epoch_indices(config.seed, epoch, data.num_train, batch_size)
    with tqdm(
        total=steps,
        desc=f"{name} {epoch + 1}/{epochs}",
        leave=False,
        disable=None if jax.process_index() == 0 else True,
    ) as progress:
      state, metrics = run_epoch(
          train_step, state, teacher_variables, data, gather, indices_SxB, progress
      )
    test_logits = evaluate.predict_logits(
        forward, state.variables, data.test_images, config.eval.batch_size, gather
    )
    metrics["test_top1"] = evaluate.topk_accuracy(test_logits, data.test_labels, 1)
    metrics["epoch_time_s"] = time.perf_counter() - start
    wall_time_s += metrics["epoch_time_s"]
    history.append({"epoch": epoch + 1, **metrics})
    log.write(epoch + 1, metrics)
    logging.info(
        "%s epoch %d/%d: %s",
        name,
        epoch + 1,
        epochs,
        " ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
    )
    checkpoints.save(
        int(state.step),
        state.variables,
        {"step": state.step, "opt_state": state.opt_state},
        {
            "model": network.name,
            "num_classes": int(test_logits.shape[-1]),
            "epochs_done": epoch + 1,
            "history": history,
            "wall_time_s": wall_time_s,
        },
    )
  log.close()
  checkpoints.close()
  return StageResult(state.variables, history, wall_time_s)
