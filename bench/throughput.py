"""Training-step throughput of kd_jax, to set beside the PyTorch peer's.

Times the three steps of the peer (bench/torch_peer.py) at batch
128 on 32x32x3 inputs, fp32, built from kd_jax's own pieces so that the figures
are those of what users run:

  teacher_train    resnet20, cross-entropy, SGD momentum 0.9, lr 0.1
  student_offline  dsconv_student, distillation loss against given teacher
                   logits, Adam 1e-3 (a step written here, see below)
  student_online   dsconv_student, kd_jax.train.make_train_step with the
                   resnet20 teacher's forward inside the step, Adam 1e-3

T = 2 and alpha = 0.5 (configs/default.py's distill section, the peer's too),
no gradient clipping and a constant learning rate, as in the peer.

The data are random uint8 images and labels made with numpy and put on the
device once (kd_jax.data.in_memory.put_on_device); each step's batch is gathered
from them with kd_jax.data.placement's make_gather and epoch_indices, as
train_stage does, and
the gather is inside the timed region. The augmentation is 'none' by default,
as the peer has none. Each timed step ends with block_until_ready on the new
state; the figure is the median over --steps steps after --warmup steps.
compile_s is jit's trace + lower + XLA compile of the step (the AOT path, whose
executable the jitted function then reuses).

With --pipeline_dir, also times one epoch of online distillation on a real
image-folder tree through kd_jax: load_dataset (source=folder), put_on_device,
then train_stage's loop (epoch_indices, gather, train_step, RunningMetrics),
and sets the epoch's wall time against steps x the median synchronised step
time, so that input handling cannot hide in the per-step figures.

The last line printed is one JSON object with every figure.

Usage (from the repository root):
  .venv/bin/python bench/throughput.py [--steps=20] [--warmup=3] [--batch=128]
      [--only=teacher_train,student_offline,student_online] [--augment=none]
      [--pipeline_dir=/path/to/tree]
"""

import json
import os
import sys
import time
from typing import Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags

# bench/ is not a package and kd_jax is not installed: import it from the
# checkout this script lives in, whatever the working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import default
from kd_jax import host, methods, optim, parallel, train
from kd_jax.data import Dataset, in_memory, load_dataset, placement
from kd_jax.errors import UserInputError
from kd_jax.network import Variables, create_network, resolve_compute_dtype
from kd_jax.teachers import OnlineTeacher, StoredLogits

# pylint: enable=g-import-not-at-top,wrong-import-position

STEP_KINDS = ("teacher_train", "student_offline", "student_online")

_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per step kind; the median is reported.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling, before timing.")
_BATCH = flags.DEFINE_integer("batch", 128, "Global batch size.")
_REUSE_FREED_MEMORY = flags.DEFINE_bool(
    "reuse_freed_memory", True, "kd_jax.host.reuse_freed_memory, as launch.py applies it."
)
_ONLY = flags.DEFINE_list(
    "only", list(STEP_KINDS), f"Step kinds to time, from {', '.join(STEP_KINDS)}; empty for none."
)
_COMPUTE_DTYPE = flags.DEFINE_enum(
    "compute_dtype",
    "auto",
    ["auto", "float32", "bfloat16"],
    "Layer compute precision (config.compute_dtype): auto is bfloat16 on GPU/TPU, float32 on CPU.",
)
_AUGMENT = flags.DEFINE_enum(
    "augment", "none", ["none", "crop_flip"], "On-device augmentation inside each step."
)
_PIPELINE_DIR = flags.DEFINE_string(
    "pipeline_dir",
    None,
    "An image-folder tree (train/<class>/, test/<class>/): also time one epoch of "
    "online distillation over it through kd_jax's loop.",
)

SEED = 0
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
# The random dataset holds this many batches; the gather cycles through it in
# shuffled epochs, as train_stage does.
RANDOM_BATCHES = 16


def sgd_config() -> ml_collections.ConfigDict:
  """The peer's teacher optimiser: SGD, momentum 0.9, lr 0.1, nothing else."""
  return default.optimizer_config(
      name="sgd", learning_rate=0.1, momentum=0.9, schedule="constant", grad_clip_norm=0.0
  )


def adam_config() -> ml_collections.ConfigDict:
  """The peer's student optimiser: Adam 1e-3, nothing else."""
  return default.optimizer_config(
      name="adam", learning_rate=1e-3, schedule="constant", grad_clip_norm=0.0
  )


def new_state(variables: Variables, optimizer: optax.GradientTransformation, mesh):
  """A fresh TrainState on the mesh, as train_stage builds it."""
  return jax.device_put(
      train.TrainState(jnp.zeros((), jnp.int32), variables, optimizer.init(variables.params)),
      parallel.replicated(mesh),
  )


def batches(gather: Callable, arrays: dict, count: int, batch_size: int) -> Iterator[dict]:
  """Endless batches gathered on the device, in train_stage's shuffled epoch order."""
  epoch = 0
  while True:
    for indices_B in placement.epoch_indices(SEED, epoch, count, batch_size):
      yield gather(arrays, indices_B)
    epoch += 1


def compile_seconds(step: Callable, *args) -> float:
  """Seconds to trace, lower and compile `step` for these arguments.

  The jitted function reuses the executable afterwards, so the timed steps
  never include compilation.
  """
  start = time.perf_counter()
  step.lower(*args).compile()
  return time.perf_counter() - start


def median_step_seconds(step, state, extra_args, batch_iter, *, steps: int, warmup: int):
  """Median seconds of one synchronised step (gather included); returns (median, state)."""
  for _ in range(warmup):
    state, _ = step(state, next(batch_iter), *extra_args)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, _ = step(state, next(batch_iter), *extra_args)
    # The state depends on the whole step, so this waits for all of it.
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  return float(np.median(times)), state


def random_device_data(
    batch_size: int, augment: str, mesh
) -> tuple[in_memory.DeviceData, jax.Array]:
  """Random uint8 images and labels on the device, and random teacher logits."""
  rng = np.random.default_rng(SEED)
  count = RANDOM_BATCHES * batch_size
  dataset = Dataset(
      train_images=rng.integers(0, 256, (count, *IMAGE_SHAPE), dtype=np.uint8),
      train_labels=rng.integers(0, NUM_CLASSES, count).astype(np.int32),
      test_images=rng.integers(0, 256, (batch_size, *IMAGE_SHAPE), dtype=np.uint8),
      test_labels=rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32),
      class_names=tuple(str(c) for c in range(NUM_CLASSES)),
  )
  teacher_logits_NxC = rng.standard_normal((count, NUM_CLASSES)).astype(np.float32)
  return (
      in_memory.put_on_device(dataset, mesh, {"augment": augment}),
      jax.device_put(teacher_logits_NxC, parallel.replicated(mesh)),
  )


def bench_steps(
    kinds: list[str],
    *,
    batch_size: int,
    steps: int,
    warmup: int,
    augment: str,
    compute_dtype: str,
    mesh,
):
  """Times the chosen step kinds; returns {kind: (compile_s, median_step_s)}."""
  data, teacher_logits_NxC = random_device_data(batch_size, augment, mesh)
  gather = placement.make_gather(mesh)
  arrays = {"image": data.train_images, "label": data.train_labels}
  distill = default.get_config().distill
  shape_kwargs = dict(
      num_classes=NUM_CLASSES,
      in_channels=IMAGE_SHAPE[-1],
      seed=SEED,
      compute_dtype=compute_dtype,
  )
  teacher, teacher_variables = create_network("resnet20", **shape_kwargs)
  teacher_variables = jax.device_put(teacher_variables, parallel.replicated(mesh))
  online_teacher = OnlineTeacher(teacher, teacher_variables)
  stored_teacher = StoredLogits({"logits": teacher_logits_NxC}, NUM_CLASSES)
  results = {}
  for kind in kinds:
    batch_arrays, extra_args = arrays, ()
    if kind == "teacher_train":
      network, variables = create_network("resnet20", **shape_kwargs)
      optimizer = optim.make_optimizer(sgd_config(), 1, 1, batch_size)
      step = train.make_train_step(network, optimizer, data, seed=SEED, mesh=mesh)
      extra_args = (None,)
    else:
      network, variables = create_network("dsconv_student", **shape_kwargs)
      optimizer = optim.make_optimizer(adam_config(), 1, 1, batch_size)
      # Offline, the teacher's logits come with the batch; online, the teacher runs in the step.
      online = kind == "student_online"
      step = train.make_train_step(
          network,
          optimizer,
          data,
          seed=SEED,
          mesh=mesh,
          teacher=online_teacher if online else stored_teacher,
          objective=methods.make_objective(distill, 1, 1),
      )
      if online:
        extra_args = (teacher_variables,)
      else:
        batch_arrays = {**arrays, "teacher_logits": stored_teacher.per_example}
        extra_args = (None,)
    state = new_state(variables, optimizer, mesh)
    batch_iter = batches(gather, batch_arrays, data.num_train, batch_size)
    compile_s = compile_seconds(step, state, next(batch_iter), *extra_args)
    median_s, _ = median_step_seconds(
        step, state, extra_args, batch_iter, steps=steps, warmup=warmup
    )
    results[kind] = (compile_s, median_s)
    print(
        f"{kind}: compile {compile_s:.2f} s, median step {1e3 * median_s:.1f} ms, "
        f"{batch_size / median_s:.1f} images/s",
        flush=True,
    )
  return results


def bench_pipeline(
    data_dir: str,
    *,
    batch_size: int,
    steps: int,
    warmup: int,
    augment: str,
    compute_dtype: str,
    mesh,
):
  """One epoch of online distillation over an image-folder tree, timed whole."""
  start = time.perf_counter()
  dataset = load_dataset(ml_collections.ConfigDict(dict(source="folder", dir=data_dir)))
  load_s = time.perf_counter() - start
  start = time.perf_counter()
  data = in_memory.put_on_device(dataset, mesh, {"augment": augment})
  jax.block_until_ready(data.train_images)
  put_s = time.perf_counter() - start

  steps_per_epoch = data.num_train // batch_size
  distill = default.get_config().distill
  shape_kwargs = dict(
      num_classes=dataset.num_classes,
      in_channels=dataset.image_shape[-1],
      seed=SEED,
      compute_dtype=compute_dtype,
  )
  teacher, teacher_variables = create_network("resnet20", **shape_kwargs)
  teacher_variables = jax.device_put(teacher_variables, parallel.replicated(mesh))
  network, variables = create_network("dsconv_student", **shape_kwargs)
  optimizer = optim.make_optimizer(adam_config(), steps_per_epoch, 1, batch_size)
  train_step = train.make_train_step(
      network,
      optimizer,
      data,
      seed=SEED,
      mesh=mesh,
      teacher=OnlineTeacher(teacher, teacher_variables),
      objective=methods.make_objective(distill, steps_per_epoch, 1),
  )
  gather = placement.make_gather(mesh)
  arrays = {"image": data.train_images, "label": data.train_labels}
  state = new_state(variables, optimizer, mesh)
  warm_iter = batches(gather, arrays, data.num_train, batch_size)
  compile_s = compile_seconds(train_step, state, next(warm_iter), teacher_variables)
  for _ in range(warmup):
    state, _ = train_step(state, next(warm_iter), teacher_variables)
  jax.block_until_ready(state)

  # train_stage's inner loop without progress bar, checkpoints and evaluation:
  # steps are dispatched ahead and metrics fetched every 10 steps, as there.
  running = train.RunningMetrics()
  start = time.perf_counter()
  for step, indices_B in enumerate(
      placement.epoch_indices(SEED, 0, data.num_train, batch_size), start=1
  ):
    batch = gather(arrays, indices_B)
    state, metrics = train_step(state, batch, teacher_variables)
    running.add(step, metrics)
    if step % 10 == 0:
      running.flush(keep=1)
  running.flush()
  jax.block_until_ready(state)
  epoch_s = time.perf_counter() - start

  median_s, _ = median_step_seconds(
      train_step, state, (teacher_variables,), warm_iter, steps=steps, warmup=0
  )
  expected_s = steps_per_epoch * median_s
  result = {
      "dir": data_dir,
      "train_images": data.num_train,
      "load_decode_s": round(load_s, 3),
      "put_on_device_s": round(put_s, 3),
      "compile_s": round(compile_s, 3),
      "epoch_steps": steps_per_epoch,
      "epoch_s": round(epoch_s, 3),
      "median_step_ms": round(1e3 * median_s, 2),
      "steps_x_median_s": round(expected_s, 3),
      "epoch_over_steps_x_median": round(epoch_s / expected_s, 3),
      "epoch_img_s": round(steps_per_epoch * batch_size / epoch_s, 1),
      "median_img_s": round(batch_size / median_s, 1),
  }
  print(
      f"pipeline: load+decode {load_s:.2f} s, put_on_device {put_s:.2f} s, compile "
      f"{compile_s:.2f} s; epoch of {steps_per_epoch} steps {epoch_s:.2f} s vs "
      f"{steps_per_epoch} x median {1e3 * median_s:.1f} ms = {expected_s:.2f} s "
      f"(ratio {epoch_s / expected_s:.3f})",
      flush=True,
  )
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  unknown = sorted(set(_ONLY.value) - set(STEP_KINDS))
  if unknown:
    raise app.UsageError(f"--only: unknown step kinds {unknown}; use {', '.join(STEP_KINDS)}")
  if _STEPS.value < 1 or _WARMUP.value < 0:
    raise app.UsageError("--steps must be at least 1 and --warmup at least 0")
  reused = _REUSE_FREED_MEMORY.value and host.reuse_freed_memory()  # before the backend starts
  mesh = parallel.make_mesh()
  try:
    parallel.check_batch_size(_BATCH.value, "--batch", mesh)
  except UserInputError as e:
    raise app.UsageError(str(e)) from None
  if _STEPS.value < 20:
    print(f"note: --steps={_STEPS.value}; use at least 20 for figures to report", flush=True)
  common = dict(
      batch_size=_BATCH.value,
      steps=_STEPS.value,
      warmup=_WARMUP.value,
      augment=_AUGMENT.value,
      compute_dtype=resolve_compute_dtype(_COMPUTE_DTYPE.value),
      mesh=mesh,
  )
  kinds = [kind for kind in STEP_KINDS if kind in _ONLY.value]
  results = bench_steps(kinds, **common)
  report = {
      f"{kind}_img_s": (round(_BATCH.value / results[kind][1], 1) if kind in results else None)
      for kind in STEP_KINDS
  }
  report.update(
      step_ms={kind: round(1e3 * median_s, 2) for kind, (_, median_s) in results.items()},
      compile_s={kind: round(compile_s, 3) for kind, (compile_s, _) in results.items()},
      batch=_BATCH.value,
      steps=_STEPS.value,
      warmup=_WARMUP.value,
      augment=_AUGMENT.value,
      compute_dtype=common["compute_dtype"],
      reuse_freed_memory=reused,
      batches="gathered per step from device-resident uint8 data, inside the timed region",
      device={
          "kind": jax.devices()[0].device_kind,
          "count": jax.device_count(),
          "platform": jax.default_backend(),
      },
      cpu_count=os.cpu_count(),
      jax=jax.__version__,
      flax=flax.__version__,
      optax=optax.__version__,
  )
  if _PIPELINE_DIR.value:
    report["pipeline"] = bench_pipeline(_PIPELINE_DIR.value, **common)
  print(json.dumps(report), flush=True)


if __name__ == "__main__":
  app.run(main)
