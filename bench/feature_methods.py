"""Step time of each distillation method against kd's: the cost of distilling features.

Every method runs configs/cifar.py's pair (resnet20 teacher inside the step,
the depthwise-separable student) through the step kd_jax trains with: the
stage's loop and state as train_stage prepares them (its optimiser, connectors
and objective), on random 32x32x3 uint8 images put on the device once and
gathered per step as bench/throughput.py does, crop-and-flip augmented as
configs/cifar.py is. The figure is the median of --steps synchronised steps
after --warmup, with compile_s (trace, lower and compile) beside it. A method
that cannot pair the two networks' features is reported with the one line that
refuses it. The last line printed is one JSON object with every figure.

Usage (from the repository root):
  .venv/bin/python bench/feature_methods.py [--steps=20] [--warmup=3] [--batch=128]
      [--methods=kd,dkd,at,fitnet,crd,reviewkd] [--student=resnet8]
"""

import json
import os
import sys

import jax
from absl import app, flags

# bench/ is not a package: import kd_jax from this checkout, and throughput.py beside this file.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import throughput
from configs import cifar
from kd_jax import methods, parallel, train
from kd_jax.errors import UserInputError
from kd_jax.network import create_network
from kd_jax.teachers import OnlineTeacher

# --steps, --warmup and --batch are bench/throughput.py's flags, shared by importing it.
# pylint: disable-next=protected-access
_STEPS, _WARMUP, _BATCH = throughput._STEPS, throughput._WARMUP, throughput._BATCH
_METHODS = flags.DEFINE_list("methods", list(methods.METHODS), "The methods to time.")
_STUDENT = flags.DEFINE_string(
    "student", "", "Another student model than configs/cifar.py's (reviewkd needs one whose "
    "stages have the teacher's sizes, e.g. resnet8)."
)


def bench_method(method: str, data, mesh, *, batch_size: int, steps: int, warmup: int) -> dict:
  """{"compile_s", "step_ms", "images_s"} of `method`'s student step, or {"refused": why}."""
  config = cifar.get_config()
  config.distill.method = method
  config.student.batch_size = batch_size
  if _STUDENT.value:
    config.student.model = _STUDENT.value
  shapes = dict(num_classes=throughput.NUM_CLASSES, in_channels=3, seed=throughput.SEED)
  teacher, teacher_variables = create_network(config.teacher.model, **shapes)
  teacher_variables = jax.device_put(teacher_variables, parallel.replicated(mesh))
  student, variables = create_network(
      config.student.model, width_multiplier=config.student.width_multiplier, **shapes
  )
  stage = train.Stage(
      "student",
      "",
      student,
      variables,
      config.student,
      throughput.SEED,
      OnlineTeacher(teacher, teacher_variables),
  )
  try:
    loop, state = train._prepare(stage, data, config, mesh)  # pylint: disable=protected-access
  except UserInputError as e:
    return {"refused": str(e)}
  batch_iter = _endless(loop)
  first = next(batch_iter)
  compile_s = throughput.compile_seconds(loop.train_step, state, first, teacher_variables)
  median_s, _ = throughput.median_step_seconds(
      loop.train_step, state, (teacher_variables,), batch_iter, steps=steps, warmup=warmup
  )
  return {
      "compile_s": round(compile_s, 2),
      "step_ms": round(1e3 * median_s, 1),
      "images_s": round(batch_size / median_s, 1),
  }


def _endless(loop):
  """The stage's batches, epoch after epoch."""
  epoch = 0
  while True:
    yield from loop.batches(epoch, 0)
    epoch += 1


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  unknown = sorted(set(_METHODS.value) - set(methods.METHODS))
  if unknown:
    raise app.UsageError(f"--methods: unknown {unknown}; use {', '.join(methods.METHODS)}")
  mesh = parallel.make_mesh()
  data, _ = throughput.random_device_data(_BATCH.value, "crop_flip", mesh)
  results = {}
  for method in _METHODS.value:
    results[method] = bench_method(
        method, data, mesh, batch_size=_BATCH.value, steps=_STEPS.value, warmup=_WARMUP.value
    )
    print(f"{method}: {results[method]}", flush=True)
  kd_ms = results.get("kd", {}).get("step_ms")
  for figures in results.values():
    if kd_ms and "step_ms" in figures:
      figures["vs_kd"] = round(figures["step_ms"] / kd_ms, 2)
  pair = cifar.get_config()
  report = {
      "pair": f"{pair.teacher.model} -> {_STUDENT.value or pair.student.model}",
      "methods": results,
      "batch": _BATCH.value,
      "steps": _STEPS.value,
  }
  print(json.dumps(report), flush=True)


if __name__ == "__main__":
  app.run(main)
