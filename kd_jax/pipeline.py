"""The whole run: teacher, distilled student, baseline student, report.

Each stage works in its own folder of the workdir (<workdir>/teacher,
/student, /baseline), so a rerun resumes where the last one stopped.
"""

import os

import jax
import ml_collections
from absl import logging

from kd_jax import checkpoint, data, evaluate, models, parallel, report, train
from kd_jax.errors import UserInputError
from kd_jax.network import Network, Variables, create_network

METHODS = ("kd",)


def _check_config(config: ml_collections.ConfigDict, mesh) -> None:
  """Rejects settings that would only fail later, after data loading."""
  if config.distill.method not in METHODS:
    raise UserInputError(
        f"unknown distill.method {config.distill.method!r}; " f"use one of {', '.join(METHODS)}"
    )
  if not 0.0 <= config.distill.alpha <= 1.0:
    raise UserInputError(f"distill.alpha={config.distill.alpha} must lie in [0, 1]")
  for stage in ("teacher", "student"):
    if config[stage].model not in models.model_names():
      raise UserInputError(
          f"unknown {stage}.model {config[stage].model!r}; known models: "
          f"{', '.join(models.model_names())}"
      )
  parallel.check_batch_size(config.eval.batch_size, "eval.batch_size", mesh)
  for stage in ("teacher", "student"):
    parallel.check_batch_size(config[stage].batch_size, f"{stage}.batch_size", mesh)


def _restore_teacher(
    path: str, network: Network, variables: Variables, model_name: str, num_classes: int
) -> tuple[Variables, dict]:
  """A trained teacher from another run's stage folder, checked against the data."""
  _, _, meta = checkpoint.read_meta(path)
  if meta["model"] != model_name:
    raise UserInputError(
        f"teacher checkpoint {path!r} holds a {meta['model']!r}, not "
        f"teacher.model={model_name!r}; set --config.teacher.model="
        f"{meta['model']}"
    )
  if meta["num_classes"] != num_classes:
    raise UserInputError(
        f"teacher checkpoint {path!r} predicts {meta['num_classes']} "
        f"classes but the dataset has {num_classes}; use a teacher "
        f"trained on this dataset"
    )
  return checkpoint.restore_variables(path, variables)


def _summarise(
    forward, variables: Variables, device_data: train.DeviceData, gather, image_shape, eval_config
):
  """Test logits and the report entry of one trained model."""
  logits = evaluate.predict_logits(
      forward, variables, device_data.test_images, eval_config.batch_size, gather
  )
  entry = {
      "top1": evaluate.topk_accuracy(logits, device_data.test_labels, 1),
      "top5": evaluate.topk_accuracy(logits, device_data.test_labels, 5),
  }
  entry.update(
      evaluate.measure_efficiency(
          forward,
          variables,
          image_shape,
          batch_size=eval_config.batch_size,
          latency_repeats=eval_config.latency_repeats,
          throughput_repeats=eval_config.throughput_repeats,
      )
  )
  return logits, entry


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every stage of `config` in `workdir` and writes the report.

  Returns the report (also in <workdir>/report.json and report.md).
  """
  mesh = parallel.make_mesh()
  _check_config(config, mesh)
  os.makedirs(workdir, exist_ok=True)
  dataset = data.load_dataset(config.data)
  logging.info(
      "devices: %d x %s; global batch teacher %d, student %d (per device %d, %d)",
      mesh.size,
      jax.devices()[0].platform,
      config.teacher.batch_size,
      config.student.batch_size,
      config.teacher.batch_size // mesh.size,
      config.student.batch_size // mesh.size,
  )
  device_data = train.put_on_device(dataset, mesh)
  gather = train.make_gather(mesh)
  shape_kwargs = dict(
      num_classes=dataset.num_classes, in_channels=dataset.image_shape[-1], seed=config.seed
  )
  stage_kwargs = dict(config=config, data=device_data, mesh=mesh)

  teacher, teacher_variables = create_network(config.teacher.model, **shape_kwargs)
  if config.teacher.checkpoint:
    teacher_variables = jax.device_put(teacher_variables, parallel.replicated(mesh))
    teacher_variables, meta = _restore_teacher(
        config.teacher.checkpoint,
        teacher,
        teacher_variables,
        config.teacher.model,
        dataset.num_classes,
    )
    teacher_run = train.StageResult(teacher_variables, meta["history"], meta["wall_time_s"])
  else:
    teacher_run = train.train_stage(
        "teacher",
        os.path.join(workdir, "teacher"),
        stage_config=config.teacher,
        network=teacher,
        variables=teacher_variables,
        **stage_kwargs,
    )

  def train_student(name: str, distilled: bool) -> tuple[Network, train.StageResult]:
    # A fresh network each time: the same seed gives the baseline the very same
    # initial weights, and the first stage's arrays are donated to its steps.
    student, variables = create_network(
        config.student.model, width_multiplier=config.student.width_multiplier, **shape_kwargs
    )
    teacher_kwargs = {}
    if distilled:
      teacher_kwargs = dict(
          teacher=teacher, teacher_variables=teacher_run.variables, alpha=config.distill.alpha
      )
    return student, train.train_stage(
        name,
        os.path.join(workdir, name),
        stage_config=config.student,
        network=student,
        variables=variables,
        **teacher_kwargs,
        **stage_kwargs,
    )

  runs = {"teacher": (teacher, teacher_run), "student": train_student("student", True)}
  if config.baseline.enabled:
    runs["baseline"] = train_student("baseline", False)

  results = {
      "dataset": {
          "name": config.data.name if config.data.source == "tfds" else config.data.source,
          "num_train": device_data.num_train,
          "num_test": len(device_data.test_labels),
          "num_classes": dataset.num_classes,
      },
      "devices": f"{mesh.size} x {jax.devices()[0].device_kind}",
  }
  predictions = {}
  for name, (network, run) in runs.items():
    forward = evaluate.make_forward(network, device_data.mean_C, device_data.std_C)
    logits, entry = _summarise(
        jax.jit(forward), run.variables, device_data, gather, dataset.image_shape, config.eval
    )
    predictions[name] = logits.argmax(-1)
    results[name] = {
        **entry,
        "epochs": len(run.history),
        "wall_time_s": run.wall_time_s,
        "model": network.name,
    }
  agreement = float((predictions["student"] == predictions["teacher"]).mean())
  results["comparison"] = report.compare(
      results["teacher"], results["student"], results.get("baseline"), agreement
  )
  if jax.process_index() == 0:
    report.write_report(results, workdir)
  return results
