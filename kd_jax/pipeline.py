"""The whole run: teacher, distilled student, baseline student, report.

Each stage works in its own folder of the workdir (<workdir>/teacher,
/student, /baseline), so a rerun resumes where the last one stopped.
"""

import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from kd_jax import (
    checkpoint,
    data,
    evaluate,
    export,
    methods,
    models,
    parallel,
    plots,
    predict,
    pretrained,
    report,
    streaming,
    teacher_cache,
    train,
)
from kd_jax.errors import UserInputError
from kd_jax.network import Network, Variables, resolve_compute_dtype

CONFIG_FILE = "config.json"


def _check_config(config: ml_collections.ConfigDict, mesh) -> None:
  """Rejects settings that would only fail later, after data loading."""
  methods.check(config.distill)
  resolve_compute_dtype(config.compute_dtype)
  if config.distill.mode not in ("online", "offline"):
    raise UserInputError(f"unknown distill.mode {config.distill.mode!r}; use 'online' or 'offline'")
  teacher_cache.check_settings(config.distill.cache_dtype, config.distill.cache_top_k)
  if config.data.teacher_logits_dir:
    if config.data.source != "folder":
      raise UserInputError(
          "data.teacher_logits_dir pairs logit files with image files: it needs "
          f"data.source=folder, not {config.data.source!r}"
      )
    conflicts = [
        f"{key}={value!r}"
        for key, value, wanted in (
            ("distill.mode", config.distill.mode, "offline"),
            ("distill.cache", config.distill.cache, "plain"),
        )
        if value != wanted
    ]
    for field in ("checkpoint", "weights"):
      if config.teacher[field]:
        conflicts.append(f"teacher.{field}={config.teacher[field]!r}")
    if conflicts:
      raise UserInputError(
          "data.teacher_logits_dir gives the teacher's logits, so kd_jax runs no teacher: "
          f"set distill.mode=offline and distill.cache=plain and no teacher.checkpoint or weights "
          f"(now {', '.join(conflicts)})"
      )
  if config.seeds < 1:
    raise UserInputError(f"seeds={config.seeds} must be at least 1")
  for stage in ("teacher", "student"):
    models.resolve(config[stage].model)
    pretrained.check_settings(stage, config[stage])
    parallel.check_batch_size(config[stage].batch_size, f"{stage}.batch_size", mesh)
  teacher = config.teacher
  if teacher.epochs == 0 and not (
      teacher.weights or teacher.checkpoint or config.data.teacher_logits_dir
  ):
    raise UserInputError(
        "teacher.epochs=0 uses the teacher as it is: give its weights (teacher.weights or "
        "teacher.checkpoint), or train it for some epochs"
    )
  parallel.check_batch_size(config.eval.batch_size, "eval.batch_size", mesh)


def _flatten(tree: dict, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


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
      before = _flatten(json.load(f))
    now = _flatten(current)
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


def _summarise(network: Network, variables: Variables, device_data, mesh, config):
  """Test logits and the report entry of one trained model."""
  logits, labels = device_data.predict(
      evaluate.jit_forward(network, device_data.mean_C, device_data.std_C, mesh),
      variables,
      "test",
      config.eval.batch_size,
  )
  entry = {
      "top1": evaluate.topk_accuracy(logits, labels, 1),
      "top5": evaluate.topk_accuracy(logits, labels, 5),
  }
  entry.update(
      evaluate.measure_efficiency(
          evaluate.make_forward(network, device_data.mean_C, device_data.std_C),
          variables,
          device_data.image_shape,
          batch_size=config.eval.batch_size,
          latency_repeats=config.eval.latency_repeats,
          throughput_repeats=config.eval.throughput_repeats,
      )
  )
  return logits, entry


def _teacher_logits(config, workdir, dataset, device_data, teacher, variables, mesh):
  """Offline distillation's stored teacher predictions, computed if absent.

  Returns (keyword arguments for the student's train_stage, the cache folder):
  `teacher_logits` (plain: one row per unaugmented training image, on the
  devices) or `teacher_views` (consistent: per epoch, the logits of every
  step's augmented batch).
  """
  distill, student = config.distill, config.student
  storage = dict(dtype=distill.cache_dtype, top_k=distill.cache_top_k)
  root = teacher_cache.cache_root(workdir, config.teacher.checkpoint)
  if distill.cache == "plain":
    key = teacher_cache.fingerprint(
        variables,
        dataset.digest(),
        distill.cache_dtype,
        "plain",
        distill.cache_top_k,
        device_data.mean_C.tolist(),
        device_data.std_C.tolist(),
    )
    forward = evaluate.jit_forward(teacher, device_data.mean_C, device_data.std_C, mesh)
    stored, folder = teacher_cache.load_or_compute(
        root,
        key,
        device_data.num_train,
        dataset.num_classes,
        lambda: device_data.predict(forward, variables, "train", config.eval.batch_size)[0],
        **storage,
    )
    return {"teacher_logits": stored}, folder
  if distill.cache != "consistent":
    raise UserInputError(f"unknown distill.cache {distill.cache!r}; use 'plain' or 'consistent'")

  # Each student step's view is a pure function of (seed, step): make them all
  # now, exactly as train_stage will, and keep the teacher's logits for them.
  augmentation = device_data.step_augmentation(config.data.augment)
  steps = device_data.steps_per_epoch(student.batch_size)
  key = teacher_cache.fingerprint(
      variables,
      dataset.digest(),
      distill.cache_dtype,
      "consistent",
      config.data.augment,
      config.seed,
      student.batch_size,
      student.epochs,
      distill.cache_top_k,
      device_data.mean_C.tolist(),
      device_data.std_C.tolist(),
  )

  def view_logits(images_BxHxWxC, step):
    x = train.student_view(augmentation, config.seed, step, images_BxHxWxC, device_data)
    return teacher.apply(variables, x, train=False)[0]

  teacher_on_view = parallel.in_order(jax.jit(view_logits, out_shardings=parallel.replicated(mesh)))

  def compute_epoch(epoch):
    batches = device_data.train_batches(config.seed, epoch, 0, student.batch_size)
    logits = [
        teacher_on_view(batch["image"], epoch * steps + position)
        for position, batch in enumerate(batches)
    ]
    return np.stack(jax.device_get(logits))

  views, folder = teacher_cache.load_or_compute_views(
      root,
      key,
      student.epochs,
      (steps, student.batch_size, dataset.num_classes),
      compute_epoch,
      **storage,
  )
  return {"teacher_views": views}, folder


def _teacher_stage(config, workdir, dataset, network_kwargs, stage_kwargs):
  """The teacher network and its trained state: restored from teacher.checkpoint, or trained.

  With teacher.epochs=0, its weights (teacher.weights) are used as they are.
  """
  teacher, variables = pretrained.create_network(
      "teacher", config.teacher, seed=config.seed, **network_kwargs
  )
  if config.teacher.epochs == 0 and not config.teacher.checkpoint:
    variables = jax.device_put(variables, parallel.replicated(stage_kwargs["mesh"]))
    settings = {"devices": stage_kwargs["mesh"].size, "compute_dtype": teacher.compute_dtype}
    return teacher, train.StageResult(variables, [], 0.0, settings)
  if not config.teacher.checkpoint:
    return teacher, train.train_stage(
        "teacher",
        os.path.join(workdir, "teacher"),
        stage_config=config.teacher,
        network=teacher,
        variables=variables,
        seed=config.seed,
        **stage_kwargs,
    )
  variables = jax.device_put(variables, parallel.replicated(stage_kwargs["mesh"]))
  variables, meta = _restore_teacher(
      config.teacher.checkpoint, variables, config.teacher.model, dataset.num_classes
  )
  return teacher, train.StageResult(
      variables, meta["history"], meta["wall_time_s"], meta["settings"]
  )


def _foreign_teacher_logits(config, dataset, device_data):
  """Offline distillation from data.teacher_logits_dir: logits another tool wrote.

  Returns the student's train_stage keyword arguments and the folder read.
  """
  # Each process reads the files of its share of the images.
  logits = teacher_cache.load_foreign(
      config.data.teacher_logits_dir, dataset.train_files, dataset.num_classes
  )
  stored = teacher_cache.encode(logits, config.distill.cache_top_k, config.distill.cache_dtype)
  logging.info(
      "distilling from %d teacher-logit files in %s", len(logits), config.data.teacher_logits_dir
  )
  layout = device_data.train_layout
  every_example = jax.tree.map(lambda a: layout.gather_all(a)[layout.rows], stored)
  return {"teacher_logits": every_example}, os.path.abspath(config.data.teacher_logits_dir)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, may_train: bool = True
) -> dict:
  """Runs every stage of `config` in `workdir` and writes the report.

  With `may_train` false (launch.py --mode=evaluate), the stages must be
  finished already: their checkpoints are evaluated again and the report,
  plots and export rewritten. Returns the report (also in
  <workdir>/report.json and report.md).
  """
  mesh = parallel.make_mesh()
  _check_config(config, mesh)
  os.makedirs(workdir, exist_ok=True)
  _check_workdir_config(config, workdir)
  streamed = data.streams(config.data, jax.process_count())
  if not 0 < config.data.eval_crop <= 1 or (config.data.eval_crop < 1 and not streamed):
    raise UserInputError(
        f"data.eval_crop={config.data.eval_crop} must be in (0, 1], and below 1 only for "
        "streamed data (data.in_memory=false)"
    )
  if streamed:
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
    device_data = streaming.StreamedData(dataset, mesh, config.data)
  else:
    device_data = train.put_on_device(dataset, mesh, config.data)
  network_kwargs = dict(
      num_classes=dataset.num_classes,
      in_channels=dataset.image_shape[-1],
      compute_dtype=resolve_compute_dtype(config.compute_dtype),
  )
  stage_kwargs = dict(config=config, data=device_data, mesh=mesh, may_train=may_train)
  if jax.process_index() == 0:
    predict.write_dataset_info(
        workdir, dataset.class_names, dataset.image_shape, device_data.mean_C, device_data.std_C
    )

  teacher = teacher_run = None
  if not config.data.teacher_logits_dir:  # else another tool's logits: no teacher here
    teacher, teacher_run = _teacher_stage(config, workdir, dataset, network_kwargs, stage_kwargs)
  offline_kwargs, cache_folder = {}, None
  logits_start = time.perf_counter()
  if config.data.teacher_logits_dir:
    offline_kwargs, cache_folder = _foreign_teacher_logits(config, dataset, device_data)
  elif config.distill.mode == "offline":
    offline_kwargs, cache_folder = _teacher_logits(
        config, workdir, dataset, device_data, teacher, teacher_run.variables, mesh
    )
  logits_time_s = time.perf_counter() - logits_start

  def train_student(name: str, distilled: bool, seed: int) -> tuple[Network, train.StageResult]:
    # A fresh network each time: the same seed gives the baseline the very same
    # initial weights, and the first stage's arrays are donated to its steps.
    student, variables = pretrained.create_network(
        "student", config.student, seed=seed, **network_kwargs
    )
    teacher_kwargs = {}
    if distilled and config.distill.mode == "offline":
      teacher_kwargs = offline_kwargs
    elif distilled:
      teacher_kwargs = dict(teacher=teacher, teacher_variables=teacher_run.variables)
    return student, train.train_stage(
        name,
        os.path.join(workdir, name),
        stage_config=config.student,
        network=student,
        variables=variables,
        seed=seed,
        **teacher_kwargs,
        **stage_kwargs,
    )

  # Published KD results are means over runs: with seeds = N, student and
  # baseline train N times (seed, seed + 1, ...), the teacher once. The first
  # run of each keeps the plain stage name and feeds the comparison.
  stage_names = (
      {"student": True, "baseline": False} if config.baseline.enabled else {"student": True}
  )
  runs = {"teacher": (teacher, teacher_run)} if teacher else {}
  repeats = {name: [] for name in stage_names}
  for index in range(config.seeds):
    for name, distilled in stage_names.items():
      stage = name if index == 0 else f"{name}_seed{config.seed + index}"
      network, run = train_student(stage, distilled, config.seed + index)
      if index == 0:
        runs[name] = (network, run)
      repeats[name].append(run)

  results = {
      "dataset": {
          "name": config.data.name if config.data.source == "tfds" else config.data.source,
          "num_train": device_data.num_train,
          "num_test": len(device_data.test_layout.rows),
          "num_classes": dataset.num_classes,
      },
      "devices": f"{mesh.size} x {jax.devices()[0].device_kind}",
  }
  predictions = {}
  for name, (network, run) in runs.items():
    logits, entry = _summarise(network, run.variables, device_data, mesh, config)
    predictions[name] = logits.argmax(-1)
    # A teacher used as it is (teacher.epochs=0) has no history: its one evaluation is the best.
    history = run.history or [{"test_top1": entry["top1"], "epoch": 0, "epoch_time_s": 0.0}]
    best = max(history, key=lambda epoch: epoch["test_top1"])
    results[name] = {
        **entry,
        "best_top1": best["test_top1"],
        "best_epoch": best["epoch"],
        "epochs": len(run.history),
        "epoch_time_s": float(np.mean([epoch["epoch_time_s"] for epoch in history])),
        "wall_time_s": run.wall_time_s,
        "model": network.name,
        **run.settings,
    }
  if cache_folder is not None:
    results["teacher_logits"] = {
        "folder": cache_folder,
        "bytes": teacher_cache.size_on_disk(cache_folder),
        "dtype": config.distill.cache_dtype,
        "top_k": config.distill.cache_top_k,
        "kind": "foreign" if config.data.teacher_logits_dir else config.distill.cache,
        "time_s": logits_time_s,  # to compute (or just load) them
    }
  if config.seeds > 1:
    results["seeds"] = {
        name: report.summarise_runs(
            [run.history[-1]["test_top1"] for run in stage_runs],
            [max(epoch["test_top1"] for epoch in run.history) for run in stage_runs],
            [config.seed + index for index in range(config.seeds)],
        )
        for name, stage_runs in repeats.items()
    }
  results["comparison"] = report.compare(
      results.get("teacher"),
      results["student"],
      results.get("baseline"),
      float((predictions["student"] == predictions["teacher"]).mean()) if teacher else None,
  )
  if jax.process_index() == 0:
    report.write_report(results, workdir)
    plots.plot_training_curves(
        {name: run.history for name, (_, run) in runs.items()},
        os.path.join(workdir, "training_curves.png"),
    )
    plots.plot_tradeoffs(results, os.path.join(workdir, "tradeoffs.png"))
    if config.export.enabled:
      student, student_run = runs["student"]
      export.export_model(  # on process 0 alone: from its own copy of the weights
          student,
          parallel.local_replica(student_run.variables),
          image_shape=dataset.image_shape,
          mean_C=device_data.mean_C,
          std_C=device_data.std_C,
          class_names=dataset.class_names,
          out_dir=os.path.join(workdir, "export", "student"),
      )
  return results
