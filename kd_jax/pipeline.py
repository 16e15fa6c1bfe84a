"""The whole run: teacher, distilled student, baseline student, report.

Each stage works in its own folder of the workdir (<workdir>/teacher,
/student, /baseline), so a rerun resumes where the last one stopped.
"""

import dataclasses
import functools
import json
import os
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from kd_jax import (
    checkpoint,
    data,
    evaluate,
    export,
    parallel,
    plots,
    predict,
    pretrained,
    report,
    settings,
    teacher_cache,
    teachers,
    train,
    whitening,
)
from kd_jax.data import in_memory
from kd_jax.data.placement import TrainingData
from kd_jax.errors import UserInputError
from kd_jax.network import CONVOLUTION_NAMES, Network, Variables, resolve_compute_dtype

CONFIG_FILE = "config.json"


def _check_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to resume a workdir that a different config wrote.

  Checkpoints of another model, dataset or method would be restored into the
  wrong run. Evaluation, export and checkpoint settings and the streaming
  threads and prefetch do not change results and may differ; anything else
  needs checkpoint.allow_config_change=true.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  current = json.loads(config.to_json())
  if os.path.exists(path) and not config.checkpoint.allow_config_change:
    with open(path) as f:
      before = settings.flatten(json.load(f))
    now = settings.flatten(current)
    differing = sorted(
        key
        for key in set(before) | set(now)
        if before.get(key) != now.get(key)
        and not key.startswith(("checkpoint.", "eval.", "export."))
        and key not in ("data.workers", "data.prefetch")
    )
    if differing:
      shown = ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in differing[:5])
      raise UserInputError(
          f"workdir {workdir} was written by a different config: {shown}; use another "
          f"workdir, or --config.checkpoint.allow_config_change=true to continue anyway"
      )
  parallel.sync(f"read {path}")  # every process reads it before process 0 rewrites it
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(current, f, indent=2)


def _restore_teacher(
    path: str, variables: Variables, model_name: str, num_classes: int
) -> tuple[Variables, dict]:
  """A trained teacher from another run's stage folder, checked against the data."""

  def check_meta(meta: dict) -> None:
    if meta["model"] != model_name:
      raise UserInputError(
          f"teacher checkpoint {path!r} holds a {meta['model']!r}, not "
          f"teacher.model={model_name!r}; set --config.teacher.model={meta['model']}"
      )
    if meta["num_classes"] != num_classes:
      raise UserInputError(
          f"teacher checkpoint {path!r} predicts {meta['num_classes']} classes but the "
          f"dataset has {num_classes}; use a teacher trained on this dataset"
      )
    if len(meta["history"]) < meta["epochs"]:
      logging.warning(
          "teacher checkpoint %s has %d of its %d epochs done; using it as it is",
          path,
          len(meta["history"]),
          meta["epochs"],
      )

  return checkpoint.restore_variables(path, variables, check_meta)


@dataclasses.dataclass(frozen=True)
class _Run:
  """What every stage of one run shares."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: object
  dataset: data.Dataset | data.StreamedDataset
  data: TrainingData
  may_train: bool

  def network(self, stage: str, seed: int) -> tuple[Network, Variables]:
    """A fresh network of `stage` ("teacher" or "student") for this data, from `seed`.

    Initialised from the stage's weights file if it names one; its whitening
    layers, if it has any, fitted to the training images.
    """
    network, variables = pretrained.create_network(
        stage,
        self.config[stage],
        seed=seed,
        num_classes=self.dataset.num_classes,
        in_channels=self.dataset.image_shape[-1],
        compute_dtype=resolve_compute_dtype(self.config.compute_dtype),
    )
    logging.info("%s: convolutions: %s", stage, CONVOLUTION_NAMES[network.convolutions])
    variables = whitening.fit(network, variables, self.data, self.mesh, self.config.eval.batch_size)
    return network, variables

  def train(self, stage: train.Stage) -> train.StageResult:
    """Trains (or resumes, or restores a finished) `stage` in its folder of the workdir."""
    return train.train_stage(stage, self.data, self.config, self.mesh, self.may_train)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, may_train: bool = True
) -> dict:
  """Runs every stage of `config` in `workdir` and writes the report.

  The stages: the teacher (trained, or restored from teacher.checkpoint; none
  when another tool's logits are given), then for each seed the distilled
  student and the baseline. With `may_train` false (launch.py --mode=evaluate),
  the stages must be finished already: their checkpoints are evaluated again
  and the report, plots and export rewritten. Returns the report (also in
  <workdir>/report.json and report.md).
  """
  mesh = parallel.make_mesh()
  settings.check(config, mesh)
  os.makedirs(workdir, exist_ok=True)
  _check_workdir_config(config, workdir)
  run = _Run(config, workdir, mesh, *_load_data(config, mesh), may_train)
  settings.check_against_data(config, run.data.num_train)
  if jax.process_index() == 0:
    predict.write_dataset_info(
        workdir, run.dataset.class_names, run.dataset.image_shape, run.data.mean_C, run.data.std_C
    )
  stages, online = {}, None
  if not config.data.teacher_logits_dir:  # else another tool's logits: no teacher here
    stages["teacher"] = teacher, teacher_run = _teacher_stage(run)
    online = teachers.OnlineTeacher(teacher, teacher_run.variables)
  teacher_for, stored_logits = _student_teachers(run, online)
  seed_runs = _student_stages(run, teacher_for)
  stages.update({name: runs[0] for name, runs in seed_runs.items()})
  results = _report(run, stages, seed_runs, stored_logits)
  if jax.process_index() == 0:
    _write_outputs(run, results, stages)
  return results


def _load_data(config, mesh) -> tuple[data.Dataset | data.StreamedDataset, TrainingData]:
  """This process's share of the dataset, and the training data placed for the devices."""
  streamed = data.streams(config.data, jax.process_count())
  if config.data.eval_crop < 1 and not streamed:
    raise UserInputError(
        f"data.eval_crop={config.data.eval_crop} below 1 works only for streamed data, and "
        "data.in_memory=auto holds this dataset in memory; set data.in_memory=false"
    )
  if streamed:
    # Imported only to stream: it needs grain, which an in-memory run can go without.
    from kd_jax.data import streaming  # pylint: disable=g-import-not-at-top

    dataset = data.open_dataset(config.data, jax.process_index(), jax.process_count())
  else:
    dataset = data.load_dataset(config.data, jax.process_index(), jax.process_count())
  logging.info(
      "process %d %s %d training and %d test examples",
      jax.process_index(),
      "streams" if streamed else "holds",
      *dataset.split_sizes,
  )
  shapes = parallel.allgather(np.array([dataset.image_shape]))
  if (shapes != shapes[0]).any():
    raise UserInputError(
        f"the processes' shares of the images differ in size ({', '.join(map(str, shapes))}); "
        "set data.image_size"
    )
  for stage in ("student",) if config.data.teacher_logits_dir else ("teacher", "student"):
    pretrained.check_stage(
        stage, config[stage], num_classes=dataset.num_classes, image_shape=dataset.image_shape
    )
  settings.check_feature_method(
      config, num_classes=dataset.num_classes, image_shape=dataset.image_shape
  )
  logging.info(
      "devices: %d x %s; global batch teacher %d, student %d (per device %d, %d)",
      mesh.size,
      jax.devices()[0].platform,
      config.teacher.batch_size,
      config.student.batch_size,
      config.teacher.batch_size // mesh.size,
      config.student.batch_size // mesh.size,
  )
  if streamed:
    return dataset, streaming.StreamedData(dataset, mesh, config.data)
  return dataset, in_memory.put_on_device(dataset, mesh, config.data)


def _teacher_stage(run: _Run) -> tuple[Network, train.StageResult]:
  """The teacher network and its trained state: restored from teacher.checkpoint, or trained.

  With teacher.epochs=0, its weights (teacher.weights) are used as they are.
  """
  config = run.config
  teacher, variables = run.network("teacher", config.seed)
  if config.teacher.epochs == 0 and not config.teacher.checkpoint:
    variables = jax.device_put(variables, parallel.replicated(run.mesh))
    stage_settings = {"devices": run.mesh.size, "compute_dtype": teacher.compute_dtype}
    return teacher, train.StageResult(variables, [], 0.0, stage_settings)
  if not config.teacher.checkpoint:
    directory = os.path.join(run.workdir, "teacher")
    stage = train.Stage("teacher", directory, teacher, variables, config.teacher, config.seed)
    return teacher, run.train(stage)
  variables = jax.device_put(variables, parallel.replicated(run.mesh))
  variables, meta = _restore_teacher(
      config.teacher.checkpoint, variables, config.teacher.model, run.dataset.num_classes
  )
  return teacher, train.StageResult(
      variables, meta["history"], meta["wall_time_s"], meta["settings"]
  )


def _student_teachers(
    run: _Run, online: teachers.OnlineTeacher | None
) -> tuple[Callable[[int], teachers.Teacher], dict | None]:
  """seed -> the teacher that seed's student distils from; and the report's stored-logits entry.

  Online distillation runs `online` in every student's step. Offline, the
  students share one set of stored logits (plain cache, or another tool's),
  or each seed has the logits of its own views (consistent cache). The
  report describes the first seed's, timed as it is computed or loaded.
  """
  config = run.config
  if online is not None and config.distill.mode == "online":
    return lambda seed: online, None
  started = time.perf_counter()
  if config.data.teacher_logits_dir:
    shared = _foreign_teacher_logits(run)
    stored_for = lambda seed: shared
  else:
    cache = teachers.CacheSpec(
        root=teacher_cache.cache_root(run.workdir, config.teacher.checkpoint),
        dtype=config.distill.cache_dtype,
        top_k=config.distill.cache_top_k,
        data_digest=run.dataset.digest(),
        augment=config.data.augment,
    )
    if config.distill.cache == "plain":
      shared = teachers.plain_logits(online, run.data, cache, config.eval.batch_size, run.mesh)
      stored_for = lambda seed: shared
    elif config.distill.cache == "consistent":
      stored_for = functools.cache(
          lambda seed: teachers.consistent_views(
              online, run.data, cache, seed, config.student, run.mesh
          )
      )
    else:
      raise UserInputError(
          f"unknown distill.cache {config.distill.cache!r}; use 'plain' or 'consistent'"
      )
  folder = stored_for(config.seed)[1]
  entry = {
      "folder": folder,
      "bytes": teacher_cache.size_on_disk(folder),
      "dtype": config.distill.cache_dtype,
      "top_k": config.distill.cache_top_k,
      "kind": "foreign" if config.data.teacher_logits_dir else config.distill.cache,
      "time_s": time.perf_counter() - started,  # to compute (or just load) them
  }
  return lambda seed: stored_for(seed)[0], entry


def _foreign_teacher_logits(run: _Run) -> tuple[teachers.StoredLogits, str]:
  """Offline distillation from data.teacher_logits_dir: logits another tool wrote.

  Returns the students' teacher and the folder read.
  """
  config = run.config
  # Each process reads the files of its share of the images.
  logits = teacher_cache.load_foreign(
      config.data.teacher_logits_dir, run.dataset.train_files, run.dataset.num_classes
  )
  stored = teacher_cache.encode(logits, config.distill.cache_top_k, config.distill.cache_dtype)
  logging.info(
      "distilling from %d teacher-logit files in %s", len(logits), config.data.teacher_logits_dir
  )
  every_example = jax.tree.map(run.data.train_layout.every_example, stored)
  folder = os.path.abspath(config.data.teacher_logits_dir)
  return teachers.StoredLogits.place(run.data, every_example), folder


def _student_stages(
    run: _Run, teacher_for: Callable[[int], teachers.Teacher]
) -> dict[str, list[tuple[Network, train.StageResult]]]:
  """The distilled student and the baseline (if enabled), once per seed: stage name -> runs.

  Published KD results are means over runs: with seeds = N, student and
  baseline train N times (seed, seed + 1, ...), the teacher once. The first
  run of each keeps the plain stage name and feeds the comparison.
  """
  config = run.config
  distilled = {"student": True, "baseline": False} if config.baseline.enabled else {"student": True}
  runs = {name: [] for name in distilled}
  for index in range(config.seeds):
    seed = config.seed + index
    for name, distils in distilled.items():
      stage_name = name if index == 0 else f"{name}_seed{seed}"
      # A fresh network each time: the same seed gives the baseline the very same
      # initial weights, and the first stage's arrays are donated to its steps.
      network, variables = run.network("student", seed)
      stage = train.Stage(
          stage_name,
          os.path.join(run.workdir, stage_name),
          network,
          variables,
          config.student,
          seed,
          teacher_for(seed) if distils else None,
      )
      runs[name].append((network, run.train(stage)))
  return runs


def _report(run: _Run, stages: dict, seed_runs: dict, stored_logits: dict | None) -> dict:
  """The report: every stage's test results and costs, stored logits, seeds, comparison."""
  config = run.config
  models, predictions = {}, {}
  for name, (network, stage_run) in stages.items():
    # The student's entry also times its export, which a user ships.
    logits, summary = _summarise(network, stage_run.variables, run, exported=name == "student")
    predictions[name] = logits.argmax(-1)
    models[name] = report.model_entry(summary, stage_run, network.name)
  agreement = None
  if "teacher" in predictions:
    agreement = float((predictions["student"] == predictions["teacher"]).mean())
  seeds = None
  if config.seeds > 1:
    seeds = report.seed_summaries(
        {name: [stage_run for _, stage_run in runs] for name, runs in seed_runs.items()},
        [config.seed + index for index in range(config.seeds)],
    )
  dataset = {
      "name": config.data.name if config.data.source == "tfds" else config.data.source,
      "num_train": run.data.num_train,
      "num_test": len(run.data.test_layout.rows),
      "num_classes": run.dataset.num_classes,
  }
  devices = f"{run.mesh.size} x {jax.devices()[0].device_kind}"
  return report.assemble(dataset, devices, models, agreement, stored_logits, seeds)


def _summarise(
    network: Network, variables: Variables, run: _Run, *, exported: bool
) -> tuple[np.ndarray, dict]:
  """Test logits, and the test results and costs of one trained model (and of its export)."""
  training, config = run.data, run.config
  logits, labels = training.predict(
      evaluate.jit_forward(
          network, training.mean_C, training.std_C, run.mesh, tta=config.eval.tta
      ),
      variables,
      "test",
      config.eval.batch_size,
  )
  summary = {
      "top1": evaluate.topk_accuracy(logits, labels, 1),
      "top5": evaluate.topk_accuracy(logits, labels, 5),
      "tta": config.eval.tta,
  }
  summary.update(
      evaluate.measure_efficiency(
          network,
          variables,
          training.image_shape,
          config.eval,
          mean_C=training.mean_C,
          std_C=training.std_C,
          exported=exported,
      )
  )
  return logits, summary


def _write_outputs(run: _Run, results: dict, stages: dict) -> None:
  """report.json and .md, the plots and (if enabled) the exported student, in the workdir."""
  report.write_report(results, run.workdir)
  plots.plot_training_curves(
      {name: stage_run.history for name, (_, stage_run) in stages.items()},
      os.path.join(run.workdir, "training_curves.png"),
  )
  plots.plot_tradeoffs(results, os.path.join(run.workdir, "tradeoffs.png"))
  if run.config.export.enabled:
    student, student_run = stages["student"]
    export.export_model(  # on process 0 alone: from its own copy of the weights
        student,
        student_run.variables,
        image_shape=run.dataset.image_shape,
        mean_C=run.data.mean_C,
        std_C=run.data.std_C,
        class_names=run.dataset.class_names,
        out_dir=os.path.join(run.workdir, "export", "student"),
    )
