"""The checks that only an accelerator makes meaningful, run on JAX's default device.

  bfloat16  resnet20 (--smoke: resnet8) computing in bfloat16 keeps float32 weights, logits and
            gradients, its logits within bfloat16 rounding of the float32
            model's; counts the bfloat16 convolutions in the compiled program
  training  a short quickstart run (digits) through kd_jax's pipeline, with
            compute_dtype 'auto' (bfloat16 on a GPU), reaching well above chance
  export    that run's exported student (model.jax, lowered for CPU and CUDA)
            loaded and run on the default device, giving the trained student's
            logits

bench/accelerator.sh runs it on a GPU, and with --smoke on the CPU at tiny
sizes, so that it cannot rot. A plain script rather than tests: the suite runs
on CPUs, and the GPU machine has no pytest.

Prints a line per check and, last, one JSON object with every figure; exits 1
if any check failed.

Usage (from the repository root):
  python bench/gpu_checks.py --workdir=DIR [--smoke]
"""

import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

# bench/ is not a package and kd_jax is not installed: import it from the
# checkout this script lives in, whatever the working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import quickstart
from kd_jax import checkpoint, export, pipeline
from kd_jax.network import Variables, create_network, resolve_compute_dtype

# pylint: enable=g-import-not-at-top,wrong-import-position

_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for the training run.", required=True)
_SMOKE = flags.DEFINE_bool(
    "smoke", False, "Tiny sizes, for the CPU: checks the script, not the device."
)

# Within bfloat16 rounding (8 significant bits), accumulated over resnet20's layers.
BFLOAT16_TOLERANCE = 0.05
# The exported model and the model itself, compiled apart: float32 agrees to rounding;
# bfloat16 to a few of its least significant bits.
EXPORT_TOLERANCE = {"float32": 1e-4, "bfloat16": 2**-5}


def check_bfloat16(smoke: bool) -> dict:
  """resnet20 (resnet8 for --smoke) in bfloat16 against itself in float32, forward and backward."""
  model, batch = ("resnet8", 2) if smoke else ("resnet20", 64)
  shapes = dict(num_classes=10, in_channels=3, seed=0)
  full, variables = create_network(model, **shapes)
  mixed, mixed_variables = create_network(model, compute_dtype="bfloat16", **shapes)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(mixed_variables))
  images_BxHxWxC = jax.device_put(
      np.random.default_rng(0).standard_normal((batch, 32, 32, 3), np.float32)
  )

  # Compiled ahead of time, to read the program XLA made for the device.
  forward = jax.jit(lambda v: mixed.apply(v, images_BxHxWxC, train=False)[0])
  compiled = forward.lower(variables).compile()
  logits_BxC = compiled(variables)
  reference_BxC = jax.jit(lambda v: full.apply(v, images_BxHxWxC, train=False)[0])(variables)
  assert logits_BxC.dtype == jnp.float32, f"bfloat16 model's logits are {logits_BxC.dtype}"
  np.testing.assert_allclose(
      logits_BxC, reference_BxC, rtol=BFLOAT16_TOLERANCE, atol=BFLOAT16_TOLERANCE
  )

  def loss(params):
    current = Variables(params, variables.batch_stats)
    return mixed.apply(current, images_BxHxWxC, train=True)[0].sum()

  grads = jax.jit(jax.grad(loss))(variables.params)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads)), "gradients not float32"
  # XLA's own convolutions, and cuDNN's custom calls on a GPU.
  bf16_convolutions = [
      line
      for line in compiled.as_text().splitlines()
      if "bf16" in line and ("convolution(" in line or "$conv" in line)
  ]
  return {
      "max_abs_logit_diff": float(jnp.abs(logits_BxC - reference_BxC).max()),
      "bf16_convolution_lines_in_compiled_forward": len(bf16_convolutions),
  }


def quickstart_config(smoke: bool):
  """The quickstart shortened: a couple of epochs (one each for --smoke), export on."""
  config = quickstart.get_config()
  config.teacher.epochs = config.student.epochs = 1 if smoke else 3
  config.baseline.enabled = not smoke
  config.eval.latency_repeats = config.eval.throughput_repeats = 2
  config.export.enabled = True
  return config


def check_training(workdir: str, smoke: bool) -> dict:
  """The shortened quickstart, timed whole (data, compiles, evaluation, export)."""
  start = time.perf_counter()
  report = pipeline.train_and_evaluate(quickstart_config(smoke), workdir)
  wall_s = time.perf_counter() - start
  auto = resolve_compute_dtype("auto")
  assert report["teacher"]["compute_dtype"] == auto, report["teacher"]["compute_dtype"]
  # Ten classes: chance is 0.1, and one epoch of the teacher reaches about 0.9.
  assert report["teacher"]["top1"] > 0.5, f"teacher top-1 {report['teacher']['top1']}"
  figures = {"wall_s": round(wall_s, 2), "compute_dtype": auto, "devices": report["devices"]}
  for stage in ("teacher", "student"):
    figures.update({f"{stage}_{key}": report[stage][key] for key in ("top1", "epoch_time_s")})
  return figures


def check_export(workdir: str, smoke: bool) -> dict:
  """The run's model.jax on the default device against the restored student."""
  folder = os.path.join(workdir, "export", "student")
  with open(os.path.join(folder, export.MODEL_FILE), "rb") as f:
    platforms = jax.export.deserialize(bytearray(f.read())).platforms
  student = quickstart_config(smoke).student
  compute_dtype = resolve_compute_dtype("auto")
  network, template = create_network(
      student.model,
      num_classes=10,
      in_channels=1,
      seed=0,
      width_multiplier=student.width_multiplier,
      compute_dtype=compute_dtype,
  )
  variables, _ = checkpoint.restore_variables(
      os.path.join(workdir, "student"), template, lambda meta: None
  )
  images_BxHxWxC = jax.device_put(
      np.random.default_rng(1).standard_normal((32, 8, 8, 1), np.float32)
  )
  served_BxC = export.load_exported(os.path.join(folder, export.MODEL_FILE))(images_BxHxWxC)
  want_BxC = jax.jit(lambda v: network.apply(v, images_BxHxWxC, train=False)[0])(variables)
  ran_on = {device.platform for device in served_BxC.devices()}
  assert ran_on == {jax.devices()[0].platform}, f"the export ran on {ran_on}"
  tolerance = EXPORT_TOLERANCE[compute_dtype]
  np.testing.assert_allclose(served_BxC, want_BxC, rtol=tolerance, atol=tolerance)
  return {
      "platforms": list(platforms),
      "ran_on": sorted(ran_on),
      "max_abs_logit_diff": float(jnp.abs(served_BxC - want_BxC).max()),
  }


def run_check(name: str, check, *args) -> dict:
  """Runs one check; its figures, how long it took and whether it passed (with why not)."""
  start = time.perf_counter()
  try:
    result = {"passed": True, **check(*args)}
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    result = {"passed": False, "error": f"{type(e).__name__}: {str(e).strip()[:2000]}"}
  result["seconds"] = round(time.perf_counter() - start, 2)
  print(f"{name}: {'passed' if result['passed'] else 'FAILED'} {result}", flush=True)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # The checks print what they found; Orbax and the pipeline would narrate every step.
  logging.set_verbosity(logging.WARNING)
  smoke, workdir = _SMOKE.value, os.path.abspath(_WORKDIR.value)
  # The GPU machine has no TensorFlow; hidden here too, so that a run on a CPU where it is
  # installed exports as the GPU run does (model.jax alone) rather than spend seconds on
  # a SavedModel no check reads.
  sys.modules["tensorflow"] = None
  results = {
      "device": {"kind": jax.devices()[0].device_kind, "platform": jax.default_backend()},
      "bfloat16": run_check("bfloat16", check_bfloat16, smoke),
      "training": run_check("training", check_training, workdir, smoke),
  }
  if results["training"]["passed"]:
    results["export"] = run_check("export", check_export, workdir, smoke)
  else:
    results["export"] = {"passed": False, "error": "no trained student: the training check failed"}
  print(json.dumps(results), flush=True)
  if not all(results[name]["passed"] for name in ("bfloat16", "training", "export")):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
