"""Runs kd_jax: `python launch.py --config=configs/cifar.py --workdir=/tmp/kd`.

Only parses flags and hands the config to kd_jax.pipeline. A mistake in the
user's input ends with one line naming it and exit status 1, no traceback.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from kd_jax import pipeline
from kd_jax.errors import UserInputError

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/default.py", "Config file; override fields with --config.KEY=VALUE.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and the report.",
                               required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  try:
    pipeline.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserInputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
