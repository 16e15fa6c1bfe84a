"""Runs kd_jax: `python launch.py --config=configs/cifar.py --workdir=/tmp/kd`.

Only parses flags and hands the config to kd_jax.pipeline. A mistake in the
user's input ends with one line naming it and exit status 1, no traceback.
"""

import ast
import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from kd_jax import host, parallel, pipeline, predict
from kd_jax.errors import KDJaxError

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    "configs/default.py",
    "Config file; override fields with --config.KEY=VALUE.",
    lock_config=True,
)
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "evaluate", "predict"],
    "train: run (or resume) every stage and report; evaluate: re-evaluate the finished "
    "checkpoints of --workdir and rewrite the report; predict: classify --images with "
    "the workdir's student.",
)
_IMAGES = flags.DEFINE_list("images", [], "Image files or folders, for --mode=predict.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for checkpoints, logs and the report.", required=True
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "Multi-host: HOST:PORT of process 0, with --num_processes and --process_id. Without "
    "them, a cluster (Cloud TPU, SLURM, ...) is detected, else one process runs.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: how many processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process, 0 to N-1.")


def _fail(message: str, exit_code: int = 1) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(exit_code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a misspelt --config.KEY reported in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e}; see python launch.py --helpfull")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    detail = str(e)
    try:  # ml_collections wraps an unknown field's KeyError: its text is a repr.
      detail = ast.literal_eval(detail)
    except (SyntaxError, ValueError):
      pass
    _fail(f"bad --config override: no such field or value {' '.join(str(detail).split())}")


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  # Orbax narrates every file it writes at INFO; keep its warnings only.
  logging.get_absl_logger().addFilter(
      lambda record: record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname
  )
  host.reuse_freed_memory()  # before the backend starts
  try:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _MODE.value == "predict":
      if not _IMAGES.value:
        _fail("--mode=predict needs --images=FILE_OR_DIR[,...]")
      for result in predict.predict(_WORKDIR.value, _IMAGES.value):
        print(predict.format_prediction(result))
    else:
      pipeline.train_and_evaluate(_CONFIG.value, _WORKDIR.value, _MODE.value == "train")
  except KDJaxError as e:
    _fail(str(e), e.exit_code)
  except KeyboardInterrupt:
    # Outside training (loading data, evaluating) there is nothing to save.
    _fail("interrupted", 130)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
