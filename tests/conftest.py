"""A small quickstart run shared by the pipeline and checkpoint tests."""

import os

import pytest

from configs import quickstart
from kd_jax import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The quickstart shrunk to seconds. Labels carry no weight (alpha = 1): whatever
# the student learns, it learns from the teacher. Mid-epoch checkpoints every 5
# steps give resumption something to prove.
SMALL_OVERRIDES = {
    "teacher.epochs": 4,
    "student.epochs": 8,
    "distill.alpha": 1.0,
    "eval.latency_repeats": 3,
    "eval.throughput_repeats": 2,
    "checkpoint.every_steps": 5,
    "export.enabled": False,
}


def small_config(**overrides):
  """The quickstart config with SMALL_OVERRIDES and then `overrides` applied."""
  config = quickstart.get_config()
  for key, value in {**SMALL_OVERRIDES, **overrides}.items():
    *sections, field = key.split(".")
    holder = config
    for section in sections:
      holder = holder[section]
    holder[field] = value
  return config


def small_config_flags(**overrides) -> list[str]:
  """The same config as launch.py flags."""
  return ["--config=configs/quickstart.py"] + [
      f"--config.{key}={value}" for key, value in {**SMALL_OVERRIDES, **overrides}.items()
  ]


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
  """(workdir, report) of one uninterrupted small quickstart run."""
  workdir = str(tmp_path_factory.mktemp("quickstart"))
  return workdir, pipeline.train_and_evaluate(small_config(**{"export.enabled": True}), workdir)
