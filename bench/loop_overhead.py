"""Does the training loop cost more than its steps? A synthetic check.

Times 60 online-distillation steps (dsconv_student with resnet20 inside the
step, batch 128, 32x32x3 random images held on the device) four ways:
  loop         as kd_jax.train runs them: gather per step, metrics read every 10
  nometrics    the same without reading metrics
  pregathered  batches gathered beforehand
  sync         waiting for every step, as the per-step benchmark does
and prints ms/step for each ('loop' twice, first and last, to show drift).

    .venv/bin/python bench/loop_overhead.py
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# Run as a script from anywhere: the repository root holds configs/ and kd_jax/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # pylint: disable=wrong-import-position
from kd_jax import methods, optim, parallel, train  # pylint: disable=wrong-import-position
from kd_jax.data import Dataset, in_memory, placement  # pylint: disable=wrong-import-position
from kd_jax.network import create_network  # pylint: disable=wrong-import-position
from kd_jax.teachers import OnlineTeacher  # pylint: disable=wrong-import-position

NUM_IMAGES, BATCH, STEPS = 12_800, 128, 60


def main():
  rng = np.random.default_rng(0)
  dataset = Dataset(
      rng.integers(0, 256, (NUM_IMAGES, 32, 32, 3), np.uint8),
      rng.integers(0, 10, NUM_IMAGES),
      rng.integers(0, 256, (BATCH, 32, 32, 3), np.uint8),
      rng.integers(0, 10, BATCH),
      tuple(map(str, range(10))),
  )
  mesh = parallel.make_mesh()
  data = in_memory.put_on_device(dataset, mesh, {"augment": "none"})
  student, _ = create_network("dsconv_student", num_classes=10, in_channels=3, seed=0)
  teacher, teacher_variables = create_network("resnet20", num_classes=10, in_channels=3, seed=0)
  teacher_variables = jax.device_put(teacher_variables, parallel.replicated(mesh))
  optimizer = optim.make_optimizer(
      default.optimizer_config(name="adam", learning_rate=1e-3, schedule="constant"),
      STEPS,
      1,
      BATCH,
  )
  step = train.make_train_step(
      student,
      optimizer,
      data,
      seed=0,
      mesh=mesh,
      teacher=OnlineTeacher(teacher, teacher_variables),
      objective=methods.make_objective(default.get_config().distill, STEPS, 1),
  )
  gather = placement.make_gather(mesh)
  arrays = {"image": data.train_images, "label": data.train_labels}
  indices_SxB = placement.epoch_indices(0, 0, NUM_IMAGES, BATCH)[:STEPS]

  def fresh_state():
    _, variables = create_network("dsconv_student", num_classes=10, in_channels=3, seed=0)
    state = train.TrainState(jnp.zeros((), jnp.int32), variables, optimizer.init(variables.params))
    return jax.block_until_ready(jax.device_put(state, parallel.replicated(mesh)))

  jax.block_until_ready(step(fresh_state(), gather(arrays, indices_SxB[0]), teacher_variables))

  def run(mode: str) -> float:
    state, running = fresh_state(), train.RunningMetrics()
    batches = [gather(arrays, indices) for indices in indices_SxB] if mode == "pregathered" else []
    jax.block_until_ready(batches)
    start = time.perf_counter()
    for position, indices_B in enumerate(indices_SxB):
      batch = batches[position] if batches else gather(arrays, indices_B)
      state, metrics = step(state, batch, teacher_variables)
      if mode == "sync":
        jax.block_until_ready(state)
      if mode in ("loop", "sync"):
        running.add(position + 1, metrics)
        if (position + 1) % 10 == 0:
          running.flush(keep=1)
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / STEPS * 1e3

  for mode in ("loop", "nometrics", "pregathered", "sync", "loop"):
    print(f"{mode}: {run(mode):.1f} ms/step", flush=True)


if __name__ == "__main__":
  main()
