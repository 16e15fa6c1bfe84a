"""The streamed input pipeline: the images/s it delivers, against the step rate it must feed.

On an image-folder tree (the CIFAR-10 tree, or its 224 x 224 copy from
bench/upscale_tree.py), with the config's defaults (one decoding thread per
core, two batches in flight to the devices), prints:
  pipeline        images/s of kd_jax.data.streaming alone: decode and resize (or,
                  for resized_crop_flip, crop) on the host, send to the device;
                  batches consumed, no training
  streamed step   ms per train step fed by the stream
  in-memory step  ms per train step fed from device memory (--in_memory_too)
and, last, one JSON object with the numbers.

    .venv/bin/python bench/streaming.py --dir=$HOME/data/cifar10 --in_memory_too
    .venv/bin/python bench/streaming.py --dir=$HOME/data/cifar10-224 --image_size=224 \
        --augment=resized_crop_flip --model=resnet18 --teacher= --batch=32 --steps=8
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections

# Run as a script from anywhere: the repository root holds configs/ and kd_jax/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # pylint: disable=wrong-import-position
from kd_jax import data, host, methods, optim, parallel, train  # pylint: disable=wrong-import-position
from kd_jax.data import in_memory, streaming  # pylint: disable=wrong-import-position
from kd_jax.network import create_network  # pylint: disable=wrong-import-position
from kd_jax.teachers import OnlineTeacher  # pylint: disable=wrong-import-position


def pipeline_rate(feed, batch: int, batches: int) -> float:
  """Images/s of `feed`'s training batches, consumed as fast as they come."""
  iterator = feed.train_batches(0, 0, 0, batch)
  for _ in range(3):  # threads started, buffers filled
    jax.block_until_ready(next(iterator)["image"])
  start = time.perf_counter()
  for _ in range(batches):
    jax.block_until_ready(next(iterator)["image"])
  return batch * batches / (time.perf_counter() - start)


def step_ms(feed, args, mesh) -> tuple[float, float]:
  """(ms per train step over `args.steps` steps fed by `feed`, compile seconds)."""
  num_classes, channels = feed.num_classes, feed.image_shape[-1]
  student, variables = create_network(
      args.model, num_classes=num_classes, in_channels=channels, seed=0
  )
  teacher = teacher_variables = None
  objective = methods.labels_objective()
  if args.teacher:
    network, teacher_variables = create_network(
        args.teacher, num_classes=num_classes, in_channels=channels, seed=0
    )
    teacher_variables = jax.device_put(teacher_variables, parallel.replicated(mesh))
    teacher = OnlineTeacher(network, teacher_variables)
    objective = methods.make_objective(default.get_config().distill, args.steps, 1)
  optimizer = optim.make_optimizer(
      default.optimizer_config(learning_rate=1e-3), args.steps + 1, 1, args.batch
  )
  step = train.make_train_step(
      student,
      optimizer,
      feed,
      seed=0,
      mesh=mesh,
      teacher=teacher,
      objective=objective,
  )
  state = jax.device_put(
      train.TrainState(jnp.zeros((), jnp.int32), variables, optimizer.init(variables.params)),
      parallel.replicated(mesh),
  )
  batches = feed.train_batches(0, 0, 0, args.batch)
  start = time.perf_counter()
  state, _ = jax.block_until_ready(step(state, next(batches), teacher_variables))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(args.steps):
    state, _ = step(state, next(batches), teacher_variables)
  jax.block_until_ready(state)
  return (time.perf_counter() - start) / args.steps * 1e3, compile_s


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--dir", required=True, help="image-folder tree with train/ and test/")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--augment", default="crop_flip")
  parser.add_argument("--model", default="dsconv_student")
  parser.add_argument("--teacher", default="resnet20", help="'' for no teacher in the step")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--batches", type=int, default=40, help="batches timed for the pipeline")
  parser.add_argument("--steps", type=int, default=60, help="train steps timed")
  parser.add_argument("--in_memory_too", action="store_true")
  args = parser.parse_args()

  config = default.get_config().data
  config.update(source="folder", dir=args.dir, image_size=args.image_size, augment=args.augment)
  host.reuse_freed_memory()  # as launch.py does, before the backend starts
  mesh = parallel.make_mesh()
  start = time.perf_counter()
  streamed = streaming.StreamedData(data.open_dataset(config), mesh, config)
  result = {
      "device": jax.devices()[0].device_kind,
      "cores": os.cpu_count(),
      "workers": os.cpu_count(),
      "image_size": args.image_size,
      "augment": args.augment,
      "batch": args.batch,
      "open_and_stats_s": round(time.perf_counter() - start, 1),
      "pipeline_img_s": round(pipeline_rate(streamed, args.batch, args.batches), 1),
  }
  print(f"pipeline: {result['pipeline_img_s']} images/s", flush=True)
  result["streamed_step_ms"], result["compile_s"] = step_ms(streamed, args, mesh)
  print(f"streamed step: {result['streamed_step_ms']:.1f} ms", flush=True)
  if args.in_memory_too:
    start = time.perf_counter()
    dataset = data.load_dataset(ml_collections.ConfigDict(config))
    held = in_memory.put_on_device(dataset, mesh, {"augment": args.augment})
    result["load_and_put_s"] = round(time.perf_counter() - start, 1)
    result["in_memory_step_ms"], _ = step_ms(held, args, mesh)
    print(f"in-memory step: {result['in_memory_step_ms']:.1f} ms", flush=True)
  result["step_img_s"] = round(args.batch / result["streamed_step_ms"] * 1e3, 1)
  print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
  main()
