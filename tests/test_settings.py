"""Every setting is checked up front: a bad value is one line naming it, before any work."""

import os
import subprocess
import sys

import ml_collections
import pytest
from jax.sharding import AbstractMesh

from configs import cifar, cifar100, cifar_fast, default, imagenet_r34_r18, quickstart
from conftest import ROOT
from kd_jax import settings
from kd_jax.errors import UserInputError

FOUR_DEVICES = AbstractMesh((4,), ("data",))

_OPTIMIZER = {
    "name": ["adma", "Adam", 1],
    "learning_rate": [0, -0.1, "0.1"],
    "reference_batch_size": [-1, 2.5],
    "momentum": [1.0, -0.1, "0.9"],
    "nesterov": ["yes", 1],
    "weight_decay": [-1e-4, "5e-4"],
    "grad_clip_norm": [-1.0, None],
    "schedule": ["cosin", "triangle", None],
    "warmup_epochs": [-1, 11, "1"],
    "start_lr_fraction": [-0.1, 1.5],
    "end_lr_fraction": [-0.1, 1.5],
    "decay_epochs": [(-1,), (0,), (5.5,), (20, 10), "30"],
    "decay_factor": [0, 1.5, -0.1],
    "norm_bias_lr_multiplier": [0, -1.0, "64"],
    "lookahead_steps": [-1, 2.5, "5"],
    "lookahead_decay": [0, 1.5, "0.95"],
    "lookahead_start_epochs": [-1, "3"],
    "whitening_bias_epochs": [-1, "3"],
}
_STAGE = {
    "model": ["resnet21", "", None, "no_such_package.models:make"],
    "weights": [None, 1, "teacher.pth", "missing.safetensors"],
    "epochs": [-1, 2.5, "10"],
    "batch_size": [0, -64, 6, 64.0, "64"],
}
# Values each setting must refuse, against configs/default.py; an entry per key, so a
# new setting without a rule (and a test) fails test_every_setting_has_bad_values.
BAD_VALUES = {
    "seed": [-1, 1.5, "0"],
    "seeds": [0, -1, "2"],
    "compute_dtype": ["fp16", "", 32],
    "data.source": ["tfdss", "", None],
    "data.name": ["", 10],
    "data.dir": [None, 3],
    "data.image_size": [-1, 32.5, "32"],
    "data.train_split": ["", None],
    "data.test_split": ["", 1],
    "data.download": ["false", 0],
    "data.tfds_data_dir": [None, 1],
    "data.augment": ["crop", "", None],
    "data.in_memory": ["yes", "", True],
    "data.memory_budget_gb": [0, -1.0, "16"],
    "data.workers": [-1, 1.5],
    "data.prefetch": [0, "2"],
    "data.stats_images": [0, 1.5],
    "data.eval_crop": [0, 1.5, -0.5, "0.875"],
    "data.teacher_logits_dir": [None, 1],
    "data.mean": ["0.5", (1.5, 0.5, 0.5), (-0.1,)],
    "data.std": [0.2, (0.2, 2.0, 0.2)],
    "teacher.checkpoint": [None, 1],
    "teacher.label_smoothing": [-0.1, 1.0, "0.2"],
    "student.width_multiplier": [0, -0.5, "1"],
    "distill.method": ["contrastive", "", None],
    "distill.mode": ["onlin", "", None],
    "distill.cache_dtype": ["bfloat16", None],
    "distill.cache": ["views", None],
    "distill.cache_top_k": [-1, 2.5, "5"],
    "distill.temperature": [0, -1.0, "4"],
    "distill.alpha": [-0.1, 1.5, "0.5"],
    "distill.temperature_schedule": ["cosin", None],
    "distill.temperature_start": [0, "5"],
    "distill.temperature_end": [0, -1.0],
    "distill.logit_standardization": ["true", 1],
    "distill.loss_scale": [0, -1.0],
    "distill.dkd_alpha": [-1.0, "1"],
    "distill.dkd_beta": [-8.0, None],
    "distill.dkd_ce_weight": [-1.0, "1"],
    "distill.dkd_warmup_epochs": [0, -20],
    "distill.at_weight": [-1.0, "1000"],
    "distill.fitnet_weight": [-100.0, None],
    "distill.crd_weight": [-0.8, "0.8"],
    "distill.crd_negatives": [0, 16.5, "16384"],
    "distill.crd_with_kd": ["true", 1, None],
    "distill.reviewkd_weight": [-1.0, "1"],
    "distill.reviewkd_warmup_epochs": [0, -20],
    "baseline.enabled": ["true", 1],
    "checkpoint.every_steps": [-1, 2.5],
    "checkpoint.keep": [0, -3, "3"],
    "checkpoint.allow_config_change": ["false", 0],
    "export.enabled": ["true", None],
    "eval.batch_size": [0, 6, "256"],
    "eval.tta": ["mirror", "", None],
    "eval.latency_repeats": [0, 2.5],
    "eval.throughput_repeats": [0, -10],
    **{
        f"{stage}.{key}": values
        for stage in ("teacher", "student")
        for key, values in _STAGE.items()
    },
    **{
        f"{stage}.optimizer.{key}": values
        for stage in ("teacher", "student")
        for key, values in _OPTIMIZER.items()
    },
}


def _with(**flat_overrides) -> ml_collections.ConfigDict:
  """configs/default.py with some keys set, types unchecked (as a hand-written config's are)."""
  flat = settings.flatten(default.get_config().to_dict())
  for key, value in flat_overrides.items():
    assert key in flat, key
    flat[key] = value
  tree = {}
  for key, value in flat.items():
    *sections, field = key.split(".")
    holder = tree
    for section in sections:
      holder = holder.setdefault(section, {})
    holder[field] = value
  return ml_collections.ConfigDict(tree)


def test_every_setting_has_bad_values():
  assert set(BAD_VALUES) == set(settings.flatten(default.get_config().to_dict()))


@pytest.mark.parametrize(
    "key,value", [(key, value) for key, values in BAD_VALUES.items() for value in values]
)
def test_each_bad_value_is_refused_in_one_line_naming_it(key, value):
  with pytest.raises(UserInputError) as refused:
    settings.check(_with(**{key: value}), FOUR_DEVICES)
  message = str(refused.value)
  assert key in message and str(value) in message
  assert "\n" not in message


RECIPES = {
    "default": default.get_config,
    "cifar": cifar.get_config,
    "cifar_fast": cifar_fast.get_config,
    "quickstart": quickstart.get_config,
    **{
        f"imagenet_r34_r18:{method}": lambda method=method: imagenet_r34_r18.get_config(method)
        for method in ("kd", "dkd")
    },
    **{
        f"cifar100:{pair},{method}": lambda spec=f"{pair},{method}": cifar100.get_config(spec)
        for pair in cifar100.PAIRS
        for method in cifar100.METHODS
    },
}


def test_every_config_file_is_covered():
  files = {name[:-3] for name in os.listdir(os.path.join(ROOT, "configs")) if name.endswith(".py")}
  assert files - {"__init__"} == {name.split(":")[0] for name in RECIPES}


@pytest.mark.parametrize("name", RECIPES)
def test_every_shipped_config_passes(name):
  settings.check(RECIPES[name](), FOUR_DEVICES)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"student.model": "resnet8", "student.width_multiplier": 0.5}, "fixed widths"),
        ({"teacher.optimizer.schedule": "step"}, "no teacher.optimizer.decay_epochs"),
        ({"student.optimizer.warmup_epochs": 12.5}, "longer than student.epochs=10"),
        ({"data.source": "folder"}, "needs data.dir"),
        ({"data.name": ""}, "needs data.name"),
        ({"data.source": "digits", "data.in_memory": "false"}, "cannot be streamed"),
        ({"data.eval_crop": 0.875, "data.in_memory": "true"}, "only for streamed data"),
        ({"data.teacher_logits_dir": "logits"}, "needs data.source=folder"),
        (
            {"data.teacher_logits_dir": "logits", "data.source": "folder", "data.dir": "tree"},
            "distill.mode='online'",
        ),
        ({"distill.method": "at", "distill.mode": "offline"}, "set distill.mode=online"),
        ({"teacher.optimizer.norm_bias_lr_multiplier": 64.0}, "works with sgd only, not 'adam'"),
    ],
)
def test_settings_that_cannot_work_together_are_refused(overrides, message):
  with pytest.raises(UserInputError, match=message):
    settings.check(_with(**overrides), FOUR_DEVICES)


def test_a_missing_or_unknown_setting_is_named():
  config = default.get_config().to_dict()
  del config["distill"]["temperature"]
  with pytest.raises(UserInputError, match="no distill.temperature"):
    settings.check(ml_collections.ConfigDict(config), FOUR_DEVICES)
  config = default.get_config().to_dict()
  config["distill"]["temprature"] = 4.0
  with pytest.raises(UserInputError, match="unknown setting distill.temprature"):
    settings.check(ml_collections.ConfigDict(config), FOUR_DEVICES)


def test_a_batch_larger_than_the_data_is_refused_for_the_stages_that_train():
  config = _with(**{"teacher.batch_size": 128, "student.batch_size": 64})
  settings.check_against_data(config, num_train=128)
  with pytest.raises(UserInputError, match="teacher.batch_size=128 is larger than the 100 "):
    settings.check_against_data(config, num_train=100)
  config = _with(**{"teacher.checkpoint": "teacher", "student.batch_size": 128})
  with pytest.raises(UserInputError, match="student.batch_size=128"):
    settings.check_against_data(config, num_train=100)
  # A restored teacher does not train: its batch size does not matter.
  settings.check_against_data(_with(**{"teacher.checkpoint": "t", "teacher.batch_size": 512}), 100)


@pytest.mark.slow
def test_launch_refuses_a_misspelt_student_optimizer_before_any_work(tmp_path):
  result = subprocess.run(
      [
          sys.executable,
          "launch.py",
          "--config=configs/quickstart.py",
          f"--workdir={tmp_path}",
          "--config.student.optimizer.name=adma",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert errors == ["error: student.optimizer.name='adma': use one of adam, adamw, sgd"]
  # Refused before the workdir's config.json, the first thing a run writes: no data was
  # read and no teacher trained, only the imports ran (no wall-time bound: shared CI
  # machines stretch those).
  assert os.listdir(tmp_path) == []
