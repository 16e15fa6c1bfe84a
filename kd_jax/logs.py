"""Per-epoch metrics of a stage: metrics.jsonl and, where tensorboardX is installed, TensorBoard."""

import json
import os

import jax
from absl import logging


class StageLog:
  """Appends one record per epoch to <stage_dir>/metrics.jsonl and TensorBoard.

  Only process 0 writes, so a multi-host run logs once. Without tensorboardX
  (an accelerator machine may lack it) the records go to metrics.jsonl alone.
  """

  def __init__(self, stage_dir: str):
    self._writes = jax.process_index() == 0
    self._dir = stage_dir
    self._jsonl = self._tensorboard = None

  def _open(self) -> None:
    """Opens the files at the first record: a finished stage's rerun leaves no empty ones."""
    os.makedirs(self._dir, exist_ok=True)
    self._jsonl = open(os.path.join(self._dir, "metrics.jsonl"), "a")
    try:
      # Imported here: it takes a while and only a run that logs needs it.
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    except ImportError:
      logging.log_first_n(
          logging.WARNING,
          "tensorboardX is not installed: each stage's metrics go to its metrics.jsonl alone "
          "(pip install tensorboardX for TensorBoard event files)",
          1,
      )
      return
    self._tensorboard = SummaryWriter(os.path.join(self._dir, "tensorboard"))

  def write(self, epoch: int, metrics: dict) -> None:
    """Records one epoch's metrics (flat dict of floats)."""
    if not self._writes:
      return
    if self._jsonl is None:
      self._open()
    self._jsonl.write(json.dumps({"epoch": epoch, **metrics}) + "\n")
    self._jsonl.flush()
    if self._tensorboard:
      for name, value in metrics.items():
        self._tensorboard.add_scalar(name, value, epoch)
      self._tensorboard.flush()

  def close(self) -> None:
    """Flushes and closes the files."""
    if self._jsonl:
      self._jsonl.close()
    if self._tensorboard:
      self._tensorboard.close()
