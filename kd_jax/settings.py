"""Every setting of a run checked at once, before data loads or any stage starts.

A misspelt name or an out-of-range value would otherwise surface only in the
stage that reads it, on ImageNet hours after the teacher began. `check` walks
the whole config tree: each key's type and range (RULES), the rules their
owners keep (methods.check, teacher_cache.check_settings, ...) and the
combinations that cannot work together. What needs the data itself (a batch
larger than the training set) is `check_against_data`, run as soon as the data
is known, still before the teacher trains. A bad value is one line naming the
key, the value and what is allowed.
"""

from typing import Any, Callable

import ml_collections

from kd_jax import (
    data,
    evaluate,
    methods,
    models,
    optim,
    parallel,
    pretrained,
    schedules,
    teacher_cache,
)
from kd_jax.data import augment
from kd_jax.errors import UserInputError
from kd_jax.network import resolve_compute_dtype, split_model

DISTILL_MODES = ("online", "offline")

Rule = tuple[Callable[[Any], bool], str]  # (accepts(value), what is allowed)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_whole(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _number(allowed: str = "", accepts: Callable[[float], bool] = lambda v: True) -> Rule:
  return (lambda v: _is_number(v) and accepts(v)), f"a number {allowed}".strip()


def _whole(allowed: str = "", accepts: Callable[[int], bool] = lambda v: True) -> Rule:
  return (lambda v: _is_whole(v) and accepts(v)), f"a whole number {allowed}".strip()


def _one_of(choices) -> Rule:
  choices = tuple(choices)
  return (lambda v: isinstance(v, str) and v in choices), f"one of {', '.join(choices)}"


_TEXT = (lambda v: isinstance(v, str)), "a string"
_NAME = (lambda v: isinstance(v, str) and v != ""), "a non-empty string"
_FLAG = (lambda v: isinstance(v, bool)), "true or false"
_POSITIVE = _number("> 0", lambda v: v > 0)
_NON_NEGATIVE = _number(">= 0", lambda v: v >= 0)
_FRACTION = _number("in [0, 1]", lambda v: 0 <= v <= 1)
_CHANNEL_VALUES = (
    lambda v: isinstance(v, (tuple, list)) and all(_is_number(e) and 0 <= e <= 1 for e in v),
    "per-channel values on the 0..1 scale, e.g. (0.485, 0.456, 0.406), or () to compute them",
)
_EPOCH_LIST = (
    lambda v: isinstance(v, (tuple, list))
    and all(_is_whole(e) and e >= 1 for e in v)
    and list(v) == sorted(set(v)),
    "a rising list of whole epochs >= 1, e.g. (150, 180, 210)",
)


def _optimizer_rules(stage: str) -> dict[str, Rule]:
  rules = {
      "name": _one_of(optim.OPTIMIZERS),
      "learning_rate": _POSITIVE,
      "reference_batch_size": _whole(">= 0 (0: no scaling)", lambda v: v >= 0),
      "momentum": _number("in [0, 1)", lambda v: 0 <= v < 1),
      "nesterov": _FLAG,
      "weight_decay": _NON_NEGATIVE,
      "grad_clip_norm": _number(">= 0 (0: no clipping)", lambda v: v >= 0),
      "schedule": _one_of(schedules.LEARNING_RATE_SCHEDULES),
      "warmup_epochs": _NON_NEGATIVE,
      "start_lr_fraction": _FRACTION,
      "end_lr_fraction": _FRACTION,
      "decay_epochs": _EPOCH_LIST,
      "decay_factor": _number("in (0, 1]", lambda v: 0 < v <= 1),
      "norm_bias_lr_multiplier": _POSITIVE,
      "lookahead_steps": _whole(">= 0 (0: no lookahead)", lambda v: v >= 0),
      "lookahead_decay": _number("in (0, 1]", lambda v: 0 < v <= 1),
      "lookahead_start_epochs": _NON_NEGATIVE,
      "whitening_bias_epochs": _NON_NEGATIVE,
  }
  return {f"{stage}.optimizer.{key}": rule for key, rule in rules.items()}


def _stage_rules(stage: str, **extra: Rule) -> dict[str, Rule]:
  rules = {
      "model": (
          lambda v: isinstance(v, str) and (v in models.model_names() or models.is_factory(v)),
          f"one of {', '.join(models.model_names())}, or package.module:function",
      ),
      "weights": _TEXT,  # pretrained.check_settings
      "epochs": _whole(">= 0 (0: the stage does not train)", lambda v: v >= 0),
      "batch_size": _whole(),  # range: parallel.check_batch_size
      **extra,
  }
  return {f"{stage}.{key}": rule for key, rule in rules.items()} | _optimizer_rules(stage)


# Each key's type and range. A key whose values an owner checks (methods.check,
# teacher_cache.check_settings, parallel.check_batch_size, resolve_compute_dtype)
# has its type here and its range there.
RULES: dict[str, Rule] = {
    "seed": _whole(">= 0", lambda v: v >= 0),
    "seeds": _whole(">= 1", lambda v: v >= 1),
    "compute_dtype": _TEXT,
    "data.source": _one_of(data.SOURCES),
    "data.name": _TEXT,
    "data.dir": _TEXT,
    "data.image_size": _whole(">= 0 (0: the images' own size)", lambda v: v >= 0),
    "data.train_split": _NAME,
    "data.test_split": _NAME,
    "data.download": _FLAG,
    "data.tfds_data_dir": _TEXT,
    "data.augment": _one_of(augment.AUGMENTATIONS),
    "data.in_memory": (
        lambda v: isinstance(v, str) and v.lower() in data.IN_MEMORY,
        f"one of {', '.join(data.IN_MEMORY)}",
    ),
    "data.memory_budget_gb": _POSITIVE,
    "data.workers": _whole(">= 0 (0: one per CPU core)", lambda v: v >= 0),
    "data.prefetch": _whole(">= 1", lambda v: v >= 1),
    "data.stats_images": _whole(">= 1", lambda v: v >= 1),
    "data.eval_crop": _number("in (0, 1]", lambda v: 0 < v <= 1),
    "data.teacher_logits_dir": _TEXT,
    "data.mean": _CHANNEL_VALUES,
    "data.std": _CHANNEL_VALUES,  # the channel count and std > 0: augment.given_stats
    **_stage_rules(
        "teacher", checkpoint=_TEXT, label_smoothing=_number("in [0, 1)", lambda v: 0 <= v < 1)
    ),
    **_stage_rules("student", width_multiplier=_POSITIVE),
    "distill.method": _TEXT,
    "distill.mode": _one_of(DISTILL_MODES),
    "distill.cache_dtype": _TEXT,
    "distill.cache": _one_of(teacher_cache.KINDS),
    "distill.cache_top_k": _whole(),
    "distill.temperature": _POSITIVE,
    "distill.alpha": _number(),
    "distill.temperature_schedule": _one_of(schedules.TEMPERATURE_SCHEDULES),
    "distill.temperature_start": _POSITIVE,
    "distill.temperature_end": _POSITIVE,
    "distill.logit_standardization": _FLAG,
    "distill.loss_scale": _POSITIVE,
    "distill.dkd_alpha": _NON_NEGATIVE,
    "distill.dkd_beta": _NON_NEGATIVE,
    "distill.dkd_ce_weight": _NON_NEGATIVE,
    "distill.dkd_warmup_epochs": _POSITIVE,
    "distill.at_weight": _NON_NEGATIVE,
    "distill.fitnet_weight": _NON_NEGATIVE,
    "distill.crd_weight": _NON_NEGATIVE,
    "distill.crd_negatives": _whole(">= 1", lambda v: v >= 1),
    "distill.crd_with_kd": _FLAG,
    "distill.reviewkd_weight": _NON_NEGATIVE,
    "distill.reviewkd_warmup_epochs": _POSITIVE,
    "baseline.enabled": _FLAG,
    "checkpoint.every_steps": _whole(">= 0 (0: only at epoch ends)", lambda v: v >= 0),
    "checkpoint.keep": _whole(">= 1", lambda v: v >= 1),
    "checkpoint.allow_config_change": _FLAG,
    "export.enabled": _FLAG,
    "eval.batch_size": _whole(),
    "eval.tta": _one_of(evaluate.TTA_WEIGHTS),
    "eval.latency_repeats": _whole(">= 1", lambda v: v >= 1),
    "eval.throughput_repeats": _whole(">= 1", lambda v: v >= 1),
}


def flatten(tree: dict, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def check(config: ml_collections.ConfigDict, mesh) -> None:
  """Refuses, in one line, the first setting of `config` that could not run on `mesh`.

  Raises:
    UserInputError: naming the key, its value and what is allowed.
  """
  flat = flatten(config.to_dict())
  missing = sorted(RULES.keys() - flat.keys())
  if missing:
    raise UserInputError(
        f"the config has no {', '.join(missing)}; start it from configs/default.py"
    )
  for key, value in flat.items():
    if key not in RULES:
      raise UserInputError(f"unknown setting {key}={value!r}; configs/default.py lists them all")
    accepts, allowed = RULES[key]
    if not accepts(value):
      raise UserInputError(f"{key}={value!r}: use {allowed}")
  resolve_compute_dtype(config.compute_dtype)
  methods.check(config.distill)
  teacher_cache.check_settings(config.distill.cache_dtype, config.distill.cache_top_k)
  models.check_width_multiplier(config.student.model, config.student.width_multiplier)
  for key in ("teacher.batch_size", "student.batch_size", "eval.batch_size"):
    parallel.check_batch_size(flat[key], key, mesh)
  for stage in ("teacher", "student"):
    try:  # a user's factory: importable, and there?
      models.resolve(config[stage].model)
    except UserInputError as e:
      raise UserInputError(f"{stage}.model: {e}") from None
    pretrained.check_settings(stage, config[stage])
    _check_optimizer(stage, config[stage])
  _check_data(config.data)
  _check_teacher_logits_dir(config)
  teacher = config.teacher
  if teacher.epochs == 0 and not (
      teacher.weights or teacher.checkpoint or config.data.teacher_logits_dir
  ):
    raise UserInputError(
        "teacher.epochs=0 uses the teacher as it is: give its weights (teacher.weights or "
        "teacher.checkpoint), or train it for some epochs"
    )


def _check_optimizer(stage: str, stage_config) -> None:
  """An optimiser or learning-rate schedule whose settings cannot do what they say."""
  optimizer = stage_config.optimizer
  if optimizer.norm_bias_lr_multiplier != 1 and optimizer.name != "sgd":
    raise UserInputError(
        f"{stage}.optimizer.norm_bias_lr_multiplier={optimizer.norm_bias_lr_multiplier} "
        f"works with sgd only, not {optimizer.name!r} (whose steps ignore a gradient's "
        "scale); set it to 1 or use name=sgd"
    )
  warms_up = optimizer.schedule in ("cosine", "linear")
  if warms_up and 0 < stage_config.epochs < optimizer.warmup_epochs:
    raise UserInputError(
        f"{stage}.optimizer.warmup_epochs={optimizer.warmup_epochs} is longer than "
        f"{stage}.epochs={stage_config.epochs}; shorten the warm-up"
    )
  if optimizer.schedule == "step" and not optimizer.decay_epochs:
    raise UserInputError(
        f"{stage}.optimizer.schedule='step' with no {stage}.optimizer.decay_epochs keeps the "
        "rate constant; give decay_epochs, or use schedule=constant"
    )


def _check_data(data_config) -> None:
  """Data settings that contradict each other."""
  needed = {"folder": "dir", "tfds": "name"}.get(data_config.source)
  if needed and not data_config[needed]:
    raise UserInputError(f"data.source={data_config.source!r} needs data.{needed}")
  in_memory = data_config.in_memory.lower()
  if data_config.source == "digits" and in_memory == "false":
    raise UserInputError("data.source='digits' cannot be streamed: use data.in_memory=true or auto")
  if data_config.eval_crop < 1 and (in_memory == "true" or data_config.source == "digits"):
    raise UserInputError(
        f"data.eval_crop={data_config.eval_crop} below 1 works only for streamed data: "
        "set data.in_memory=false or auto"
    )


def _check_teacher_logits_dir(config) -> None:
  """Another tool's logits replace kd_jax's teacher: nothing may ask for one."""
  if not config.data.teacher_logits_dir:
    return
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
        "set distill.mode=offline and distill.cache=plain and no teacher.checkpoint or "
        f"weights (now {', '.join(conflicts)})"
    )


def check_batch_fits(key: str, batch_size: int, num_train: int) -> None:
  """Refuses a global batch larger than the training set."""
  if batch_size > num_train:
    raise UserInputError(
        f"{key}={batch_size} is larger than the {num_train} training examples; lower it"
    )


def check_feature_method(config: ml_collections.ConfigDict, *, num_classes: int, image_shape):
  """A feature method's teacher and student: both give features that the method can pair.

  Builds both models without computing anything, and the method's connectors.

  Raises:
    UserInputError: for a model without features (no `with_features` method), or
      features the method cannot pair.
  """
  if config.distill.method not in methods.FEATURE_METHODS:
    return
  networks = []
  for stage in ("student", "teacher"):
    stage_config = config[stage]
    model = pretrained.abstract_model(
        stage_config, num_classes=num_classes, in_channels=image_shape[-1]
    )
    if not hasattr(model, "with_features"):
      raise UserInputError(
          f"{stage}.model={stage_config.model!r} provides no features, which "
          f"distill.method={config.distill.method} needs: give it a with_features method "
          "(docs/own_models.md) or use distill.method=kd"
      )
    networks.append(split_model(stage_config.model, model))
  # The run's size does not change whether the features pair.
  methods.make_feature_method(
      config.distill, *networks, image_shape, seed=0, num_train=1, steps_per_epoch=1, epochs=1
  )


def check_against_data(config: ml_collections.ConfigDict, num_train: int) -> None:
  """The settings that need the data's size, checked before any stage trains."""
  teacher = config.teacher
  teacher_trains = teacher.epochs > 0 and not (
      teacher.checkpoint or config.data.teacher_logits_dir
  )
  for stage in ("teacher", "student") if teacher_trains else ("student",):
    check_batch_fits(f"{stage}.batch_size", config[stage].batch_size, num_train)
